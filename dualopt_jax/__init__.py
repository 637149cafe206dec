"""dualopt_jax: paradigm-aware optimization (DualOpt, OLOR and peers) as Optax transformations."""

from dualopt_jax._depths import depth_profile, layer_depths
from dualopt_jax._describe import describe
from dualopt_jax._drift import anchor_from_state, drift
from dualopt_jax._dualopt import dualopt, olor
from dualopt_jax._fixnorm import FixNormState, fix_norm
from dualopt_jax._forward import forward_order
from dualopt_jax._l2sp import L2SPState, add_l2sp_gradient, decay_to_anchor, l2sp
from dualopt_jax._lr_decay import (
  LayerwiseLRDecayState,
  layerwise_lr_decay,
  layerwise_lr_decay_adamw,
  lr_decay_exponents,
)
from dualopt_jax._paths import path_filter
from dualopt_jax._profile import LayerProfile, LayerScaleState, SharedValue
from dualopt_jax._projection import ProjectionState, project_to_anchor
from dualopt_jax._rollback import (
  LayerwiseDecayState,
  RollbackState,
  layerwise_decay,
  rollback_to,
)
from dualopt_jax._sharding import abstract_state, fsdp_shardings, init_sharded, state_shardings
from dualopt_jax._spd import SPDState, spd

__version__ = "0.1.0"

__all__ = [
  "FixNormState",
  "L2SPState",
  "LayerProfile",
  "LayerScaleState",
  "LayerwiseDecayState",
  "LayerwiseLRDecayState",
  "ProjectionState",
  "RollbackState",
  "SPDState",
  "SharedValue",
  "abstract_state",
  "add_l2sp_gradient",
  "anchor_from_state",
  "decay_to_anchor",
  "depth_profile",
  "describe",
  "drift",
  "dualopt",
  "fix_norm",
  "forward_order",
  "fsdp_shardings",
  "init_sharded",
  "l2sp",
  "layer_depths",
  "layerwise_decay",
  "layerwise_lr_decay",
  "layerwise_lr_decay_adamw",
  "lr_decay_exponents",
  "olor",
  "path_filter",
  "project_to_anchor",
  "rollback_to",
  "spd",
  "state_shardings",
]
