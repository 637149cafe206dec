"""Selective Projection Decay (SPD): decay toward the anchor only when the step is inconsistent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base

from dualopt_jax import _anchor, _hyperparams, _masks, _norms, _paths

ScalarOrSchedule = optax.ScalarOrSchedule


class SPDState(NamedTuple):
  """State of :func:`spd`."""

  count: chex.Array  # int32 scalar: the step at which a strength schedule is evaluated.
  inner_state: optax.OptState  # the wrapped transformation's state.
  anchor: optax.Params  # the anchor; MaskedNode where nothing is stored (zero anchor, masked out).


def spd(
  inner: optax.GradientTransformation,
  *,
  strength: ScalarOrSchedule,
  params0: optax.Params | None = None,
  mask: Any = None,
  decay_to_zero: Any = None,
  stacked: str | Sequence[str] | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Selective Projection Decay wrapping an inner optimizer (which includes the lr).

  With ``g`` the raw gradient given to this transformation, ``p`` =
  :math:`\theta_{t-1}`, the inner update ``u`` (so the candidate is
  :math:`\tilde\theta = \theta_{t-1} + u`) and the anchor :math:`\theta_0`,
  per parameter tensor:

  .. math::

    c_t = -\langle g, \theta_{t-1} - \theta_0 \rangle, \qquad
    r_t = \mathrm{clip}\!\left(
      \frac{\lVert\tilde\theta - \theta_0\rVert - \lVert\theta_{t-1} - \theta_0\rVert}
           {\lVert\tilde\theta - \theta_0\rVert}, 0, 1\right),

    \theta_t = \tilde\theta - \lambda\, r_t\, (\tilde\theta - \theta_0)
    \quad \text{if } c_t < 0, \qquad \theta_t = \tilde\theta \text{ otherwise}.

  :math:`\lambda` (``strength``) is not multiplied by the learning rate. When
  :math:`\lVert\tilde\theta - \theta_0\rVert = 0` the ratio is taken as 0 (the
  reference code would divide by zero). At the first step
  :math:`\theta_{t-1} = \theta_0`, so :math:`c = 0` and nothing is decayed.

  LoRA: ``decay_to_zero`` on the adapter factors (e.g. ``"**/lora_*"``) is the
  SPD authors' PEFT mode: each factor is gated and decayed on its own toward
  0, with no anchor stored. It is not SPD of the merged weight
  :math:`W = W_0 + AB`. That one has exact adapter forms (the gate
  :math:`-\langle g_W, AB\rangle = -\langle g_B, B\rangle`, since
  :math:`AB` is linear in :math:`B`; :math:`\lVert AB\rVert_F^2 =
  \langle A^\top A, BB^\top\rangle`; the decay scales :math:`\tilde B`),
  but needs each adapter's A-B pairing and contraction layout, and is not
  implemented (BUILD_NOTES.md, "LoRA"). For the exact merged-weight rollback
  use ``dualopt(..., lora=...)``.

  Args:
    inner: the optimizer producing the candidate step, *including* the
      learning rate (e.g. ``optax.adam(1e-4)``); it receives the gradients
      unchanged and all parameters.
    strength: :math:`\lambda \ge 0`, a scalar or an Optax schedule of the step
      count. The reference default is 0 (off); it is tuned by validation.
    params0: the anchor; ``None`` uses (a copy of) the params given to
      ``init``. Kept in the optimizer state, never in a closure.
    mask: which leaves SPD decays (pytree of bools, callable, or glob
      patterns); the inner optimizer still updates every leaf. Leaves not
      decayed store no anchor (e.g. exclude a new head with ``mask``).
    decay_to_zero: leaves decayed toward 0 instead of the anchor (pytree of
      bools, ``params -> bools`` callable or glob patterns; ``True`` for every
      leaf, the mode for adapters such as LoRA, whose pre-trained value is 0);
      they store no anchor. To leave a new head alone, exclude it with
      ``mask``.
    stacked: stacked-layer subtrees (``None``: detected; see the glossary);
      their gates and norms are per layer.
    anchor_dtype: the dtype the anchor is kept at (``None``: the params').

  Returns:
    An ``optax.GradientTransformation`` with :class:`SPDState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> tx = dj.spd(optax.adam(1e-3), strength=1.0)
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)

  References:
    Tian, Huang, Kira, "Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models" (Selective Projection Decay), NeurIPS 2024.
  """
  _hyperparams.check_at_least(strength, 0.0, name="spd: strength")
  if decay_to_zero is True and params0 is not None:
    raise ValueError(
      "spd: params0 is given but decay_to_zero=True decays every leaf toward 0; give one, "
      "not both."
    )

  _anchor.check_dtype(anchor_dtype, name="spd")

  def decayed(params: Any) -> Any:
    return _masks.flags(mask, params, name="spd: mask", default=True)

  def stored(params: Any) -> Any:
    return _paths.map_with_path(
      lambda _p, x, d, zero: d and not zero and _paths.is_float_leaf(x),
      params, decayed(params), _masks.flags(decay_to_zero, params, name="spd: decay_to_zero"),
    )

  def init_fn(params: optax.Params) -> SPDState:
    _norms.stacked_flags(stacked, params)  # raises early on a bad spec
    anchor = _anchor.init(params, params0, anchor_dtype=anchor_dtype, stored=stored)
    return SPDState(
      count=jnp.zeros([], jnp.int32), inner_state=inner.init(params), anchor=anchor
    )

  def update_fn(updates, state: SPDState, params=None, **extra_args):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    inner_updates, inner_state = optax.with_extra_args_support(inner).update(
      updates, state.inner_state, params, **extra_args
    )
    _anchor.check_restored(state.anchor, params, name="spd", stored=stored(params))
    lam = _hyperparams.value_at(strength, state.count, name="spd: strength")
    flags = decayed(params)
    st_flags = _norms.stacked_flags(stacked, params)

    def leaf(path, u, g, p, a, d, st):
      if not d or not _paths.is_float_leaf(p):
        return u
      compute = jnp.promote_types(u.dtype, jnp.float32)
      uf = u.astype(compute)
      prev = p.astype(compute)
      if not _paths.is_masked_node(a):
        prev = prev - a.astype(compute)
      cand = prev + uf
      axes = _norms.reduce_axes(np.ndim(u), stacked=bool(st), per="tensor")
      c = -_norms.real_inner(g.astype(compute), prev, axes)
      n_cand = _norms.norm_keepdims(cand, axes)
      n_prev = _norms.norm_keepdims(prev, axes)
      ratio = jnp.where(n_cand > 0, (n_cand - n_prev) / jnp.where(n_cand > 0, n_cand, 1.0), 0.0)
      r = jnp.clip(ratio, 0.0, 1.0)
      factor = jnp.where(c < 0, jnp.asarray(lam, compute) * r, 0.0)
      return (uf - factor * cand).astype(u.dtype)

    new_updates = _paths.map_with_path(
      leaf, inner_updates, updates, params, state.anchor, flags, st_flags
    )
    return new_updates, SPDState(_hyperparams.increment(state.count), inner_state, state.anchor)

  # update_fn takes this transformation's own state; Optax's protocol types it OptState.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]
