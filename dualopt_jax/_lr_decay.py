"""Layer-wise learning-rate decay (ELECTRA / BEiT / MAE) as an Optax scale transformation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import numpy as np
import optax

from dualopt_jax import _depths, _hyperparams, _masks, _paths, _per_leaf, _profile

ScalarOrSchedule = optax.ScalarOrSchedule


class LayerwiseLRDecayState(NamedTuple):
  """State of :func:`layerwise_lr_decay`."""

  count: chex.Array  # int32 scalar: the step at which a decay schedule is evaluated.
  # {key: per-leaf exponents L + 1 - depth} (float32; (L, 1, ..) for stacked leaves); the key
  # names the exponents' values, so a restore under other depth settings is a structure mismatch.
  exponent: dict[str, Any]
  decay: chex.Array  # float32 scalar: the decay the next update applies (for describe/drift).


def lr_decay_exponents(
  params: Any,
  *,
  depths: Any = None,
  num_layers: int | None = None,
  granularity: _depths.Granularity = "block",
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
) -> Any:
  r"""Per-leaf exponents :math:`L + 1 - \mathrm{depth}` of the layer-wise lr decay.

  With ``depths=None`` the depths come from
  :func:`~dualopt_jax.layer_depths` (``granularity``, ``order``, ``stacked``
  as there: from the paths' meaning, or the forward order).
  Without ``num_layers`` a leaf's exponent is the number of distinct depth
  levels above it: embeddings :math:`L + 1`, block :math:`i` (from 0)
  :math:`L - i`, head and final norm 0 -- BEiT's ``layer_id`` convention
  (embeddings 0, block ``i`` at ``i + 1``, the rest at ``L + 1``). With
  ``num_layers`` (:math:`L`) the exponent is :math:`(L + 1)(1 - d)` for depth
  :math:`d \in [0, 1]`, which also allows depths that are not on a grid.

  Returns:
    A pytree like ``params`` of float32 NumPy arrays (shape ``()`` or, for
    stacked leaves, ``(L, 1, ..., 1)``).
  """
  if depths is None:
    table = _depths.depth_table(params, granularity=granularity, order=order, stacked=stacked)
    depth_tree = _paths.map_with_path(lambda path, _x: table[path], params)
  else:
    depth_tree = _per_leaf.resolve(depths, params, name="depths")
  values = []
  for path, d in _paths.leaves_with_paths(depth_tree):
    if _paths.is_masked_node(d):
      continue
    arr = _hyperparams.concrete(d)
    if arr is None:
      raise ValueError(f"depths for '{_paths.path_str(path)}' must be concrete numbers.")
    if np.any(arr < -1e-6) or np.any(arr > 1 + 1e-6):
      raise ValueError(
        f"depths for '{_paths.path_str(path)}' must lie in [0, 1] (0 input side, 1 output "
        f"side), got {d!r}."
      )
    values.append(arr.ravel())
  if num_layers is not None:
    if int(num_layers) != num_layers or num_layers < 0:
      raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}.")

    def exponent(d: Any) -> np.ndarray:
      e = (num_layers + 1) * (1.0 - np.asarray(d, np.float64))
      return np.where(np.abs(e - np.round(e)) < 1e-4, np.round(e), e)
  else:
    levels = np.unique(np.round(np.concatenate(values) if values else np.zeros(0), 6))

    def exponent(d: Any) -> np.ndarray:
      d = np.round(np.asarray(d, np.float64), 6)
      return (levels.size - 1 - np.searchsorted(levels, d)).astype(np.float64)

  return _paths.map_with_path(
    lambda _p, _x, d: np.asarray(exponent(d), np.float32), params, depth_tree
  )


def layerwise_lr_decay(
  decay: ScalarOrSchedule,
  *,
  depths: Any = None,
  num_layers: int | None = None,
  granularity: _depths.Granularity = "block",
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
  mask: Any = None,
) -> optax.GradientTransformation:
  r"""Scales each leaf's update by :math:`\mathrm{decay}^{L + 1 - \mathrm{depth}}`.

  The layer-wise learning-rate decay of ELECTRA, BEiT and MAE: embeddings at
  depth 0, block :math:`i` at :math:`i + 1`, the head at :math:`L + 1`, so the
  head trains at the full learning rate and each block below at ``decay``
  times the one above. The exponents are computed once, at ``init``, from the
  parameter paths (or the forward order; see :func:`lr_decay_exponents`) and
  kept in the state. Typical ``decay``: 0.65--0.9 (BEiT ViT-B 0.65/0.9, MAE 0.75,
  ELECTRA 0.8).

  Scaling is multiplicative, so it may go anywhere after the preconditioner.
  **Weight decay** follows the chain order: an ``add_decayed_weights`` placed
  *before* this transformation is scaled too -- what BEiT/MAE/timm do, since
  their per-group learning rate multiplies AdamW's decay -- and one placed
  after it is not. :func:`layerwise_lr_decay_adamw` exposes this as
  ``scale_weight_decay``.

  Args:
    decay: the per-layer factor in (0, 1], a scalar or a schedule of the step
      count.
    depths: ``None`` (from ``layer_depths``), or depths in [0, 1] as a pytree
      over the params or a ``params -> pytree`` callable.
    num_layers: :math:`L`; see :func:`lr_decay_exponents` for when it matters.
    granularity: ``"block"`` or ``"tensor"``, as in ``layer_depths``.
    order: the forward order or glob patterns, as in ``layer_depths``.
    stacked: the stacked-layer subtrees, as in ``layer_depths``.
    mask: which leaves to scale (pytree of bools, callable or glob patterns);
      the others keep the full learning rate. Depths are still computed from
      every leaf.

  Returns:
    An ``optax.GradientTransformation`` with :class:`LayerwiseLRDecayState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> w = {'w': jnp.ones(2)}
    >>> params = {'embed': w, 'layers_0': w, 'layers_1': w, 'head': w}
    >>> tx = optax.chain(optax.scale_by_adam(), dj.layerwise_lr_decay(0.5),
    ...                  optax.scale_by_learning_rate(1.0))
    >>> state = tx.init(params)
    >>> (exponents,) = state[1].exponent.values()
    >>> {k: float(v['w']) for k, v in exponents.items()}
    {'embed': 3.0, 'head': 0.0, 'layers_0': 2.0, 'layers_1': 1.0}

  References:
    Clark et al., "ELECTRA", ICLR 2020; Bao et al., "BEiT", ICLR 2022; He et
    al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
  """
  _hyperparams.check_in_range(decay, 0.0, 1.0, name="layerwise_lr_decay: decay", low_open=True)

  def init_fn(params: optax.Params) -> LayerwiseLRDecayState:
    exps = lr_decay_exponents(
      params, depths=depths, num_layers=num_layers, granularity=granularity, order=order,
      stacked=stacked,
    )
    if mask is not None:
      scaled = _masks.flags(mask, params, name="layerwise_lr_decay: mask")
      exps = _paths.map_with_path(lambda _p, e, m: e if m else optax.MaskedNode(), exps, scaled)
    count = jnp.zeros([], jnp.int32)
    key = _exponent_key(depths, num_layers, granularity, order, stacked)
    exps = _paths.map_with_path(lambda _p, e: _paths.operand(e), exps)
    return LayerwiseLRDecayState(count, {key: exps}, _decay_state(decay, count))

  def update_fn(updates, state: LayerwiseLRDecayState, params=None):
    del params
    d = _hyperparams.value_at(decay, state.count, name="layerwise_lr_decay: decay")
    (exponents,) = state.exponent.values()

    def leaf(_path, u, e):
      if _paths.is_masked_node(e) or not _paths.is_float_leaf(u):
        return u
      compute = jnp.promote_types(u.dtype, jnp.float32)
      return (u.astype(compute) * jnp.power(jnp.asarray(d, compute), e)).astype(u.dtype)

    new_updates = _paths.map_with_path(leaf, updates, exponents)
    count = _hyperparams.increment(state.count)
    return new_updates, LayerwiseLRDecayState(count, state.exponent, _decay_state(decay, count))

  # update_fn takes this transformation's own state; Optax's protocol types it OptState.
  return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def _exponent_key(
  depths: Any, num_layers: Any, granularity: _depths.Granularity, order: Any, stacked: Any
) -> str:
  """The key of the exponents in the state: the settings that produced them, hashed."""
  depths_key = None if depths is None else _profile.spec_tag(depths)
  settings = (granularity, _depths.order_key(order), _profile.as_tuple(stacked), num_layers,
              depths_key)
  return "exponent_" + hashlib.sha1(repr(settings).encode()).hexdigest()[:8]


def _decay_state(decay: ScalarOrSchedule, count: chex.Array) -> chex.Array:
  return _hyperparams.state_value(decay, count, name="layerwise_lr_decay: decay")


def layerwise_lr_decay_adamw(
  learning_rate: ScalarOrSchedule,
  *,
  decay: ScalarOrSchedule,
  weight_decay: float = 0.0,
  scale_weight_decay: bool = True,
  weight_decay_mask: Any = None,
  depths: Any = None,
  num_layers: int | None = None,
  granularity: _depths.Granularity = "block",
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformation:
  r"""AdamW with layer-wise learning-rate decay (the BEiT/MAE fine-tuning optimizer).

  Per leaf with scale :math:`s = \mathrm{decay}^{L + 1 - \mathrm{depth}}`:

  .. math::

    u = -\eta_t\,(s\,\hat a + s\,w\,\theta) \;\; (\texttt{scale\_weight\_decay=True}),
    \qquad u = -\eta_t\,(s\,\hat a + w\,\theta) \;\; (\texttt{False}).

  ``True`` (default) is what BEiT, MAE and timm do: the per-group learning
  rate multiplies AdamW's decay too.

  Args:
    learning_rate: scalar or schedule.
    decay: layer-wise factor (see :func:`layerwise_lr_decay`).
    weight_decay: AdamW's decoupled weight decay :math:`w`.
    scale_weight_decay: whether the layer scale multiplies the weight decay.
    weight_decay_mask: which leaves get weight decay (as ``optax.adamw``'s
      ``mask``; BEiT excludes biases, norms and embeddings), also glob
      patterns.
    depths: see :func:`layerwise_lr_decay`.
    num_layers: see :func:`layerwise_lr_decay`.
    granularity: see :func:`layerwise_lr_decay`.
    order: see :func:`layerwise_lr_decay`.
    stacked: see :func:`layerwise_lr_decay`.
    b1: Adam's decay rate of the first moment.
    b2: Adam's decay rate of the second moment.
    eps: Adam's term added to the denominator.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> tx = dj.layerwise_lr_decay_adamw(1e-3, decay=0.75, weight_decay=0.05)
    >>> w = {'w': jnp.ones(2)}
    >>> state = tx.init({'embed': w, 'layers_0': w, 'head': w})

  References:
    Bao et al., "BEiT", ICLR 2022; He et al., "MAE", CVPR 2022.
  """
  _hyperparams.check_at_least(weight_decay, 0.0, name="layerwise_lr_decay_adamw: weight_decay")
  lld = layerwise_lr_decay(
    decay, depths=depths, num_layers=num_layers, granularity=granularity, order=order,
    stacked=stacked,
  )
  wd = optax.add_decayed_weights(
    weight_decay, None if weight_decay_mask is None else _masks.mask_callable(weight_decay_mask)
  )
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  lr = optax.scale_by_learning_rate(learning_rate)
  if scale_weight_decay:
    return optax.chain(adam, wd, lld, lr)
  return optax.chain(adam, lld, wd, lr)
