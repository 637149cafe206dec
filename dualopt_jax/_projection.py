"""Projection of the weights onto a ball around the anchor (the optimizer-side TPGM/FTP step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base

from dualopt_jax import _anchor, _hyperparams, _masks, _norms, _paths, _per_leaf, _profile

ScalarOrSchedule = optax.ScalarOrSchedule

_NORMS = ("l2", "mars")


class ProjectionState(NamedTuple):
  """State of :func:`project_to_anchor`."""

  count: chex.Array  # int32 scalar, the step at which a radius schedule is evaluated.
  anchor: optax.Params  # the centre of the ball, possibly at a lower precision.
  layer_scale: _profile.LayerScaleState  # the per-leaf factor of the radius.
  radius: chex.Array  # float32 scalar: the global radius the next update applies.


def project_to_anchor(
  radius: Any,
  *,
  params0: optax.Params | None = None,
  norm: str = "l2",
  layer_scale: Any = 1.0,
  mask: Any = None,
  channel_axis: int | None = None,
  stacked: str | Sequence[str] | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Projects the post-step weights onto a ball of radius :math:`\gamma_l` around the anchor.

  Place it last in a chain (after the learning-rate scaling). With ``p`` the
  current parameters, ``u`` the incoming update and ``a`` the anchor, per
  tensor ``l``:

  .. math::

    d = p + u - a, \qquad
    \theta_t = a + \min\!\left(1, \frac{\gamma_l}{\lVert d \rVert}\right) d,
    \qquad u' = \theta_t - p,

  (a zero displacement is left as is). This is the projection step of TPGM
  (Tian et al., CVPR 2023) and FTP (Tian et al., NeurIPS 2023) with a given
  radius; TPGM learns :math:`\gamma` by bi-level optimization on held-out
  data and FTP from the next step's gradient, neither of which is an
  optimizer transformation.

  Norms: ``norm="l2"`` is the full-tensor L2 norm. ``norm="mars"`` (the
  reference code's maximum absolute row sum) is the L1 norm of each output
  row with one radius per tensor, i.e. each row is projected separately; the
  row is the ``channel_axis`` of the tensor (``-1``, output features, for Flax
  kernels; use ``0`` for PyTorch-layout weights). A 1-D (or 0-D) tensor is
  reduced over everything, as PyTorch's ``sum(dim=())`` does in the reference
  code (``jnp.sum(axis=())`` would reduce nothing).

  Args:
    radius: :math:`\gamma \ge 0`: a scalar or an Optax schedule ``count ->
      value`` (the same for every leaf, times ``layer_scale``), or per leaf: a
      (prefix) pytree over the params (matched by path; any wrapping) or a
      ``LayerProfile`` -- then it takes the place of ``layer_scale``. A value
      may be an array broadcasting against the norm, e.g. shape ``(L, 1, 1)``
      for ``L`` stacked layers. Under ``optax.inject_hyperparams`` a scalar
      radius is injectable.
    params0: the anchor; ``None`` uses (a copy of) the params given to
      ``init``. Kept in the optimizer state, never in a closure.
    norm: ``"l2"`` or ``"mars"``.
    layer_scale: per-leaf multiplier of the radius (scalar, pytree,
      ``params -> pytree`` callable or ``LayerProfile``), to combine a
      schedule with a profile. Resolved at ``init`` and kept in the state.
    mask: which leaves to project (pytree of bools, callable, or glob
      patterns); masked-out leaves store no anchor.
    channel_axis: the output-row axis for ``norm="mars"`` (``None``: -1, the
      Flax layout). Static: under ``optax.inject_hyperparams`` list it in
      ``static_args`` if you pass it.
    stacked: stacked-layer subtrees (``None``: detected; see the glossary);
      their norms and radii are per layer.
    anchor_dtype: store the anchor at this dtype (e.g. ``jnp.bfloat16``).

  Returns:
    An ``optax.GradientTransformation`` with :class:`ProjectionState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(optax.sgd(1.0), dj.project_to_anchor(0.5))
    >>> updates, _ = tx.update({'w': jnp.array([-3., -4.])}, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)['w']  # (3, 4) -> norm 0.5
    >>> [round(float(v), 4) for v in new]
    [0.3, 0.4]

  References:
    Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning",
    CVPR 2023; Tian et al., "Fast Trainable Projection for Robust
    Fine-tuning", NeurIPS 2023.
  """
  if norm not in _NORMS:
    raise ValueError(f"project_to_anchor: norm must be one of {_NORMS}, got {norm!r}.")
  _anchor.check_dtype(anchor_dtype, name="project_to_anchor")
  global_radius, leaf_radius = _per_leaf.split_global(radius, name="project_to_anchor: radius")
  _hyperparams.check_at_least(global_radius, 0.0, name="project_to_anchor: radius")
  if isinstance(layer_scale, (str, bytes)) or _hyperparams.is_scalar_like(layer_scale):
    _hyperparams.check_at_least(layer_scale, 0.0, name="project_to_anchor: layer_scale")
  if _profile.is_per_leaf(leaf_radius):
    if _profile.is_per_leaf(layer_scale) or not np.all(np.asarray(layer_scale) == 1):
      raise ValueError(
        "project_to_anchor: give the per-leaf factor once, as radius or as layer_scale, and the "
        "global radius (a scalar or schedule) as radius."
      )
    layer_scale = leaf_radius
  scale_name = "radius" if _profile.is_per_leaf(leaf_radius) else "layer_scale"
  per = "channel" if norm == "mars" else "tensor"
  ord_ = "l1" if norm == "mars" else "l2"

  def init_fn(params: optax.Params) -> ProjectionState:
    anchor = _anchor.init(params, params0, anchor_dtype=anchor_dtype)
    scales = _profile.init_layer_scale(layer_scale, params, name=f"project_to_anchor: {scale_name}")
    multipliers = _profile.stored_multipliers(scales)
    _per_leaf.check_nonnegative(
      layer_scale if multipliers is None else multipliers, name=scale_name
    )
    flags = _norms.stacked_flags(stacked, params)
    _paths.map_with_path(  # validates channel_axis early, with the path in the message
      lambda path, x, s: _norms.leaf_axes(path, x, s, per, channel_axis), params, flags
    )
    count = jnp.zeros([], jnp.int32)
    return ProjectionState(count, anchor, scales, _radius_state(global_radius, count))

  def update_fn(updates, state: ProjectionState, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    g, scales = _profile.at_step(
      global_radius, layer_scale, state, updates, name="project_to_anchor", label="radius"
    )
    _anchor.check_restored(state.anchor, params, name="project_to_anchor")
    flags = _norms.stacked_flags(stacked, updates)

    def project(path, u, p, a, s, st):
      if not _paths.is_float_leaf(p):
        return u
      compute = jnp.promote_types(u.dtype, jnp.float32)
      d = p.astype(compute) + u.astype(compute) - a.astype(compute)
      axes = _norms.leaf_axes(path, u, st, per, channel_axis)
      n = _norms.norm_keepdims(d, axes, ord=ord_)
      gamma = jnp.asarray(g, compute) * jnp.asarray(s, compute)
      safe_n = jnp.where(n > 0, n, 1.0)
      keep = jnp.where(n > gamma, gamma / safe_n, 1.0)
      return (u.astype(compute) - (1.0 - keep) * d).astype(u.dtype)

    new_updates = _paths.map_with_path(project, updates, params, state.anchor, scales, flags)
    count = _hyperparams.increment(state.count)
    new_state = ProjectionState(
      count, state.anchor, _profile.refreshed(layer_scale, state.layer_scale),
      _radius_state(global_radius, count),
    )
    return new_updates, new_state

  # update_fn takes this transformation's own state; Optax's protocol types it OptState.
  return _masks.masked(optax.GradientTransformation(init_fn, update_fn), mask)  # pyright: ignore[reportArgumentType]


def _radius_state(radius: Any, count: chex.Array) -> chex.Array:
  return _hyperparams.state_value(radius, count, name="project_to_anchor: radius")
