"""Weight rollback toward an anchor (OLOR/DualOpt fine-tuning) and real-time decay.

Both are the same operator on the *post-step* weights ``p + u``::

  u' = u - lambda * (p + u - anchor)       lambda = rate(t) * layer_scale(leaf)

``rollback_to`` keeps the anchor (pre-trained weights) in its state;
``layerwise_decay`` uses the anchor 0 and stores nothing param-sized.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base

from dualopt_jax import _anchor, _hyperparams, _masks, _paths, _profile

ScalarOrSchedule = optax.ScalarOrSchedule


class RollbackState(NamedTuple):
  """State of :func:`rollback_to`."""

  count: chex.Array  # int32 scalar: number of updates so far; rate is evaluated here.
  anchor: optax.Params  # the weights rolled back to, possibly at a lower precision.
  layer_scale: _profile.LayerScaleState  # per-leaf depths (or scales) and profile numbers.
  rate: chex.Array  # float32 scalar: the rate the next update applies (for describe/drift).


class LayerwiseDecayState(NamedTuple):
  """State of :func:`layerwise_decay`."""

  count: chex.Array  # int32 scalar.
  layer_scale: _profile.LayerScaleState  # as RollbackState.layer_scale
  rate: chex.Array  # float32 scalar, as RollbackState.rate


def _check_scales_in_range(state: _profile.LayerScaleState, rate: Any, *, name: str) -> None:
  """Per-leaf check of the layer scales resolved at init (concrete values only)."""
  multipliers = _profile.stored_multipliers(state)
  if multipliers is None:
    return
  rate_value = None if callable(rate) else _hyperparams.concrete(rate)
  for path, value in _paths.present_leaves(multipliers):
    v = _hyperparams.concrete(value)
    if v is None:
      continue
    if np.any(v < 0) or (rate_value is not None and np.any(rate_value * v > 1)):
      raise ValueError(
        f"{name}: layer_scale for '{_paths.path_str(path)}' is {v!r}; with rate "
        f"{rate!r} the per-step fraction must stay in [0, 1]."
      )


def _rate_state(rate: ScalarOrSchedule, count: chex.Array, name: str) -> chex.Array:
  return _hyperparams.state_value(rate, count, name=f"{name}: rate")


def _pull_toward(u: chex.Array, p: chex.Array, a: chex.Array | None, lam: Any) -> chex.Array:
  """``u - lam * (p + u - a)`` (``a=None`` means 0), computed in at least float32.

  Whether a leaf is pulled is decided by the parameter's dtype (an integer
  step counter kept among the params passes through).
  """
  if not _paths.is_float_leaf(p):
    return u
  compute = jnp.promote_types(u.dtype, jnp.float32)
  cast = lambda x: x if x.dtype == compute else x.astype(compute)  # few ops per leaf to trace
  uc = cast(u)
  post = cast(p) + uc if a is None else cast(p) + uc - cast(a)
  out = uc - cast(jnp.asarray(lam)) * post
  return out if out.dtype == u.dtype else out.astype(u.dtype)


def _pull_all(updates: Any, params: Any, scales: Any, rate_t: Any, anchor: Any = None) -> Any:
  """``_pull_toward`` on every leaf (toward ``anchor``, or 0); MaskedNodes pass through."""
  fractions: dict[int, tuple[Any, Any]] = {}  # per multiplier object: leaves of a block share one

  def fraction(s: Any) -> Any:
    if id(s) not in fractions:
      fractions[id(s)] = (s, rate_t * s)  # s kept alive, so its id is not reused
    return fractions[id(s)][1]

  def one(u: Any, p: Any, s: Any, *a: Any) -> Any:
    if _paths.is_masked_node(u):
      return u
    toward = a[0] if a and not _paths.is_masked_node(a[0]) else None  # MaskedNode: anchor 0
    return _pull_toward(u, p, toward, fraction(s))

  rest = () if anchor is None else (anchor,)
  return jax.tree.map(one, updates, params, scales, *rest, is_leaf=_paths.is_masked_node)


def rollback_to(
  params0: optax.Params | None = None,
  *,
  rate: ScalarOrSchedule,
  layer_scale: Any = 1.0,
  mask: Any = None,
  anchor_dtype: Any = None,
  decay_to_zero: Any = None,
) -> optax.GradientTransformation:
  r"""Pulls the post-step weights back toward an anchor (OLOR weight rollback).

  Place it *after* the learning-rate scaling in a chain. With ``u`` the
  incoming update, ``p`` the current parameters and ``a`` the anchor:

  .. math::

    \lambda_{i,t} = \mathrm{rate}(t)\,s_i, \qquad
    u' = u - \lambda_{i,t}\,(p + u - a),

  so that :math:`p + u' - a = (1 - \lambda_{i,t})(p + u - a)`: the weights
  after the plain optimizer step are moved the fraction :math:`\lambda` of
  the way back to the anchor. ``t`` counts updates from 0, like
  ``optax.scale_by_learning_rate``. Non-float leaves pass through unchanged.

  Args:
    params0: the anchor (pre-trained weights), a pytree over the same
      parameters (any wrapping: Linen dict, NNX ``State``); ``None`` uses the
      params given to ``init`` (copied). Stored in the optimizer state, never
      in a closure, so it is sharded, donated and checkpointed with the state.
    rate: per-step fraction, a scalar in [0, 1] or an Optax schedule of the
      step count (its values are clipped to [0, 1]).
    layer_scale: per-leaf multiplier :math:`s_i`: a scalar, a
      :class:`LayerProfile`, a (prefix) pytree over the params (a leaf may be
      an array broadcasting against the parameter, e.g. shape ``(L, 1, 1)``
      for ``L`` stacked layers) or a callable ``params -> pytree``.
    mask: which leaves to roll back: a pytree of bools, a callable
      ``params -> pytree of bools``, or glob patterns over ``'a/b/c'`` paths.
      Masked-out leaves store no anchor.
    anchor_dtype: store the anchor at this dtype (e.g. ``jnp.bfloat16``).
    decay_to_zero: leaves rolled back toward 0 instead of their anchor (pytree
      of bools, ``params -> bools`` callable or glob patterns); they store no
      anchor. A LoRA ``B`` factor is one: its anchor is 0, and rolling it back
      by :math:`\lambda` rolls the merged weight :math:`W_0 + BA` back toward
      :math:`W_0` by :math:`\lambda` (see ``dualopt``'s ``lora``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`RollbackState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> params = {'w': jnp.ones(3)}
    >>> tx = optax.chain(optax.adam(1e-2), dj.rollback_to(rate=0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    >>> new = optax.apply_updates(params, updates)['w']  # 0.99, then 10% back to 1.0
    >>> print(new.round(4))
    [0.991 0.991 0.991]

  References:
    Huang, Li et al., "One Step Learning, One Step Review" (OLOR), AAAI 2024;
    Ning, Li et al., "DualOpt: decoupled optimization for scratch and
    fine-tuning", 2026.
  """
  _hyperparams.check_fraction_range(rate, layer_scale, name="rollback_to")
  _anchor.check_dtype(anchor_dtype, name="rollback_to")
  if decay_to_zero is True and params0 is not None:
    raise ValueError(
      "rollback_to: params0 is given but decay_to_zero=True rolls every leaf back toward 0; "
      "give one, not both."
    )
  stored = None if decay_to_zero is None else (
    lambda params: jax.tree.map(
      lambda zero: zero if _paths.is_masked_node(zero) else not zero,
      _masks.flags(decay_to_zero, params, name="rollback_to: decay_to_zero"),
      is_leaf=_paths.is_masked_node,
    )
  )

  def init_fn(params: optax.Params) -> RollbackState:
    anchor = _anchor.init(params, params0, anchor_dtype=anchor_dtype, stored=stored)
    scales = _profile.init_layer_scale(
      layer_scale, params, name="rollback_to: layer_scale", mark_coverage=stored is not None
    )
    _check_scales_in_range(scales, rate, name="rollback_to")
    count = jnp.zeros([], jnp.int32)
    return RollbackState(count, anchor, scales, _rate_state(rate, count, "rollback_to"))

  def update_fn(updates, state: RollbackState, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    rate_t, scales = _profile.at_step(
      rate, layer_scale, state, updates, name="rollback_to", label="rate", fraction=True
    )
    _anchor.check_restored(
      state.anchor, params, name="rollback_to", stored=None if stored is None else stored(params)
    )
    new_updates = _pull_all(updates, params, scales, rate_t, state.anchor)
    count = _hyperparams.increment(state.count)
    new_state = RollbackState(
      count, state.anchor, _profile.refreshed(layer_scale, state.layer_scale),
      _rate_state(rate, count, "rollback_to"),
    )
    return new_updates, new_state

  # update_fn takes this transformation's own state; Optax's protocol types it OptState.
  return _masks.masked(optax.GradientTransformation(init_fn, update_fn), mask)  # pyright: ignore[reportArgumentType]


def layerwise_decay(
  *,
  rate: ScalarOrSchedule,
  layer_scale: Any = 1.0,
  mask: Any = None,
) -> optax.GradientTransformation:
  r"""Real-time weight decay of the post-step weights (DualOpt scratch mode).

  The :func:`rollback_to` operator with anchor 0; stores no anchor:

  .. math::

    u' = u - \lambda_{i,t}\,(p + u), \qquad p + u' = (1 - \lambda_{i,t})(p + u).

  Unlike ``optax.add_decayed_weights`` (decay of the *pre*-step weights,
  scaled by the learning rate when placed before it), this shrinks the weights
  after the optimizer step by the fraction :math:`\lambda_{i,t} =
  \mathrm{rate}(t)\,s_i` directly.

  Args:
    rate: per-step fraction, a scalar in [0, 1] or an Optax schedule of the
      step count (its values are clipped to [0, 1]).
    layer_scale: per-leaf multiplier (scalar, ``LayerProfile``, pytree or
      ``params -> pytree``; see :func:`rollback_to`).
    mask: which leaves to decay (pytree of bools, callable, or glob patterns).

  Returns:
    An ``optax.GradientTransformation`` with :class:`LayerwiseDecayState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> tx = optax.chain(optax.sgd(0.0), dj.layerwise_decay(rate=0.5))
    >>> params = {'w': jnp.ones(2)}
    >>> updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)['w']
    Array([0.5, 0.5], dtype=float32)

  References:
    Ning, Li et al., "DualOpt: decoupled optimization for scratch and
    fine-tuning", 2026 (abstract; the operator's exact form is our reading,
    see BUILD_NOTES.md).
  """
  _hyperparams.check_fraction_range(rate, layer_scale, name="layerwise_decay")

  def init_fn(params: optax.Params) -> LayerwiseDecayState:
    scales = _profile.init_layer_scale(
      layer_scale, params, name="layerwise_decay: layer_scale", mark_coverage=True
    )
    _check_scales_in_range(scales, rate, name="layerwise_decay")
    count = jnp.zeros([], jnp.int32)
    return LayerwiseDecayState(count, scales, _rate_state(rate, count, "layerwise_decay"))

  def update_fn(updates, state: LayerwiseDecayState, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    rate_t, scales = _profile.at_step(
      rate, layer_scale, state, updates, name="layerwise_decay", label="rate", fraction=True
    )
    new_updates = _pull_all(updates, params, scales, rate_t)
    count = _hyperparams.increment(state.count)
    new_state = LayerwiseDecayState(
      count, _profile.refreshed(layer_scale, state.layer_scale),
      _rate_state(rate, count, "layerwise_decay"),
    )
    return new_updates, new_state

  # update_fn takes this transformation's own state; Optax's protocol types it OptState.
  return _masks.masked(optax.GradientTransformation(init_fn, update_fn), mask)  # pyright: ignore[reportArgumentType]
