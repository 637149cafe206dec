"""dualopt_jax: paradigm-aware optimization (DualOpt, OLOR and peers) as Optax transformations."""

from dualopt_jax._depths import depth_profile, layer_depths
from dualopt_jax._describe import describe
from dualopt_jax._dualopt import dualopt, olor
from dualopt_jax._paths import path_filter
from dualopt_jax._profile import LayerProfile
from dualopt_jax._rollback import (
  LayerwiseDecayState,
  RollbackState,
  layerwise_decay,
  rollback_to,
)

__version__ = "0.1.0"

__all__ = [
  "LayerProfile",
  "LayerwiseDecayState",
  "RollbackState",
  "depth_profile",
  "describe",
  "dualopt",
  "layer_depths",
  "layerwise_decay",
  "olor",
  "path_filter",
  "rollback_to",
]
