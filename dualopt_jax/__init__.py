"""dualopt_jax: paradigm-aware optimization (DualOpt, OLOR and peers) as Optax transformations."""

from dualopt_jax._paths import path_filter
from dualopt_jax._rollback import (
  LayerwiseDecayState,
  RollbackState,
  layerwise_decay,
  rollback_to,
)

__version__ = "0.1.0"

__all__ = [
  "LayerwiseDecayState",
  "RollbackState",
  "layerwise_decay",
  "path_filter",
  "rollback_to",
]
