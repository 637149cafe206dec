"""Projection of the weights onto a ball around the anchor (the optimizer-side TPGM/FTP step).

Also holds the per-tensor norm helpers shared by the peer methods (SPD, FixNorm,
drift): norms over a whole tensor, per output channel, or per layer of a
stacked (``nn.scan`` / ``nnx.vmap``) leaf.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base

from dualopt_jax import _paths, _rollback

ScalarOrSchedule = optax.ScalarOrSchedule

_NORMS = ("l2", "mars")


# ----------------------------------------------------------------------------
# Shared helpers: stacked leaves and per-tensor / per-channel norms.
# ----------------------------------------------------------------------------


def stacked_flags(stacked: Any, tree: Any, *, name: str = "stacked") -> Any:
  """A tree of Python bools: which leaves carry stacked layers on axis 0.

  ``stacked`` is ``None`` (no stacked leaves), ``"auto"`` (the subtrees
  ``layer_depths`` detects as stacked: named ``layers``/``blocks``/``Scan*``
  with a shared leading axis), ``True`` (every leaf with at least one axis),
  glob patterns over ``'a/b/c'`` paths, a callable ``(path, leaf) -> bool``,
  or a pytree of bools over the same parameters.
  """
  if stacked is None or stacked is False:
    return _paths.map_with_path(lambda _p, _x: False, tree)
  if isinstance(stacked, str) and stacked == "auto":
    from dualopt_jax import _depths

    try:
      table = _depths.depth_table(tree, granularity="block")
    except ValueError:  # no depth rule fits this model: nothing is detected as stacked
      table = {}
    return _paths.map_with_path(lambda path, _x: np.ndim(table.get(path, 0.0)) > 0, tree)
  if stacked is True:
    return _paths.map_with_path(lambda _p, x: np.ndim(x) >= 1, tree)
  if isinstance(stacked, str) or (
    isinstance(stacked, (list, tuple)) and stacked and all(isinstance(s, str) for s in stacked)
  ):
    selects = _paths.path_filter(stacked)
    flag = lambda path, _x: selects(path)
  elif callable(stacked):
    flag = lambda path, x: bool(stacked(path, x))
  else:
    table = _paths.PathTable(stacked, name=name)
    flag = lambda path, _x: bool(table.get(path))

  def checked(path: _paths.Path, x: Any) -> bool:
    is_stacked = flag(path, x)
    if is_stacked and np.ndim(x) < 1:
      raise ValueError(
        f"{name}: '{_paths.path_str(path)}' is marked stacked but is a scalar; a stacked leaf "
        f"needs a leading layer axis."
      )
    return is_stacked

  return _paths.map_with_path(checked, tree)


def static_axis(channel_axis: Any) -> int:
  """``channel_axis`` as a Python int (``None`` means -1); a traced value is refused."""
  if channel_axis is None:
    return -1
  if isinstance(channel_axis, jax.core.Tracer):
    raise ValueError(
      "channel_axis must be a static Python int; under optax.inject_hyperparams pass "
      "static_args=('channel_axis',)."
    )
  return int(channel_axis)


def reduce_axes(ndim: int, *, stacked: bool, per: str, channel_axis: Any = None) -> tuple[int, ...]:
  """Axes to reduce for a norm of a leaf with ``ndim`` axes.

  ``per="tensor"``: every axis (but the stacked layer axis). ``per="channel"``:
  every axis but ``channel_axis`` (Flax kernels keep their output features on
  the last axis); tensors with at most one axis besides the stacked one are
  reduced entirely, as PyTorch's ``sum(dim=())`` does in the reference code.
  """
  first = 1 if stacked else 0
  axes = tuple(range(first, ndim))
  channel_axis = static_axis(channel_axis)
  if per == "tensor" or len(axes) <= 1:
    return axes
  if per != "channel":
    raise ValueError(f"per must be 'tensor' or 'channel', got {per!r}.")
  inner_ndim = ndim - first
  if not -inner_ndim <= channel_axis < inner_ndim:
    raise ValueError(f"channel_axis={channel_axis} is out of range for a {inner_ndim}-D tensor.")
  keep = first + (channel_axis % inner_ndim)
  return tuple(a for a in axes if a != keep)


def norm_keepdims(x: chex.Array, axes: tuple[int, ...], *, ord: str = "l2") -> chex.Array:
  """L2 (``ord="l2"``) or L1 (``ord="l1"``) norm over ``axes``, kept as size-1 axes."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if ord == "l1":
    return jnp.sum(jnp.abs(x), axis=axes, keepdims=True)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def _count_required_positional(fn: Callable[..., Any]) -> int | None:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  n = 0
  for p in sig.parameters.values():
    if p.kind in (p.VAR_POSITIONAL,):
      return None
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
      n += 1
  return n


def split_spec(spec: Any, *, name: str) -> tuple[Any, Any]:
  """Splits a hyper-parameter spec into ``(schedule_or_scalar, per_leaf_spec)``.

  A scalar or a one-argument callable (an Optax schedule of the step count)
  is global; a two-argument callable ``(path, leaf)`` or a pytree is per leaf.
  """
  if callable(spec) and not hasattr(spec, "shape"):
    n = _count_required_positional(spec)
    if n == 1:
      return spec, 1.0
    if n == 2:
      return 1.0, spec
    raise ValueError(
      f"{name}: a callable must be a schedule ``count -> value`` (one argument) or a per-leaf "
      f"function ``(path, leaf) -> value`` (two arguments); got {spec!r}."
    )
  if _paths._is_scalar_like(spec):
    return spec, 1.0
  return 1.0, spec


def check_nonnegative(tree: Any, *, name: str) -> None:
  """Raises naming the path when a concrete leaf of ``tree`` is negative."""
  for path, value in _paths.leaves_with_paths(tree):
    v = _rollback._concrete_float(value)
    if v is not None and np.any(v < 0):
      raise ValueError(f"{name} for '{_paths.path_str(path)}' must be >= 0, got {value!r}.")


def named_mask(spec: Any, name: str) -> Callable[[Any], Any]:
  """``_paths.mask_callable(spec)`` whose errors start with the argument's name."""
  fn = _paths.mask_callable(spec)

  def call(tree: Any) -> Any:
    try:
      return fn(tree)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None

  return call


def value_at(spec: ScalarOrSchedule, count: chex.Array) -> Any:
  return spec(count) if callable(spec) else spec


# ----------------------------------------------------------------------------
# project_to_anchor
# ----------------------------------------------------------------------------


class ProjectionState(NamedTuple):
  """State of :func:`project_to_anchor`."""

  count: chex.Array  # int32 scalar, the step at which a radius schedule is evaluated.
  anchor: optax.Params  # the centre of the ball, possibly at a lower precision.


def project_to_anchor(
  radius: Any,
  *,
  params0: optax.Params | None = None,
  norm: str = "l2",
  layer_scale: Any = 1.0,
  mask: Any = None,
  channel_axis: int | None = None,
  stacked: Any = None,
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
    radius: :math:`\gamma \ge 0`: a scalar, an Optax schedule ``count -> value``, a
      pytree over the params (matched by path; any wrapping), or a callable
      ``(path, leaf) -> value`` (e.g. a depth profile built from
      ``layer_depths``, or a ``LayerProfile``). A value may be an array
      broadcasting against the norm, e.g. shape ``(L, 1, 1)`` for ``L`` stacked layers.
      Under ``optax.inject_hyperparams`` a scalar radius is injectable; list
      a ``(path, leaf)`` callable in ``static_args`` (it would be taken for
      a schedule).
    params0: the anchor; ``None`` uses (a copy of) the params given to
      ``init``. Kept in the optimizer state, never in a closure.
    norm: ``"l2"`` or ``"mars"``.
    layer_scale: per-leaf multiplier of the radius (scalar, pytree or
      ``(path, leaf)`` callable), to combine a schedule with a profile.
    mask: which leaves to project (pytree of bools, callable, or glob
      patterns); masked-out leaves store no anchor.
    channel_axis: the output-row axis for ``norm="mars"`` (``None``: -1, the
      Flax layout). Static: under ``optax.inject_hyperparams`` list it in
      ``static_args`` if you pass it.
    stacked: which leaves stack layers on axis 0 (``None``, ``"auto"``,
      ``True``, glob patterns, ``(path, leaf)`` callable or pytree of bools); their norms and
      radii are per layer.
    anchor_dtype: store the anchor at this dtype (e.g. ``jnp.bfloat16``).

  Returns:
    An ``optax.GradientTransformation`` with :class:`ProjectionState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from dualopt_jax._projection import project_to_anchor
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(optax.sgd(1.0), project_to_anchor(0.5))
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
  global_radius, leaf_radius = split_spec(radius, name="project_to_anchor: radius")
  if not callable(global_radius):
    check_nonnegative(global_radius, name="radius")
  per = "channel" if norm == "mars" else "tensor"
  ord_ = "l1" if norm == "mars" else "l2"

  def init_fn(params: optax.Params) -> ProjectionState:
    if params0 is None:
      anchor = _paths.map_with_path(lambda _p, x: _rollback._store_anchor(x, anchor_dtype), params)
    else:
      table = _rollback.check_anchor_matches(params0, params)
      anchor = _paths.map_with_path(
        lambda path, _x: _rollback._store_anchor(table.entries[path], anchor_dtype), params
      )
    check_nonnegative(
      _paths.resolve_per_leaf(leaf_radius, params, name="radius", at_init=True), name="radius"
    )
    check_nonnegative(
      _paths.resolve_per_leaf(layer_scale, params, name="layer_scale", at_init=True),
      name="layer_scale",
    )
    flags = stacked_flags(stacked, params)
    _paths.map_with_path(  # validates channel_axis early, with the path in the message
      lambda path, x, s: _axes_for(path, x, s, per, channel_axis), params, flags
    )
    return ProjectionState(count=jnp.zeros([], jnp.int32), anchor=anchor)

  def update_fn(updates, state: ProjectionState, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    g = value_at(global_radius, state.count)
    radii = _paths.resolve_per_leaf(leaf_radius, updates, name="radius")
    scales = _paths.resolve_per_leaf(layer_scale, updates, name="layer_scale")
    flags = stacked_flags(stacked, updates)

    def project(path, u, p, a, r, s, st):
      if not _paths.is_float_leaf(u):
        return u
      compute = jnp.promote_types(u.dtype, jnp.float32)
      d = p.astype(compute) + u.astype(compute) - a.astype(compute)
      n = norm_keepdims(d, _axes_for(path, u, st, per, channel_axis), ord=ord_)
      gamma = jnp.asarray(g, compute) * jnp.asarray(r, compute) * jnp.asarray(s, compute)
      safe_n = jnp.where(n > 0, n, 1.0)
      keep = jnp.where(n > gamma, gamma / safe_n, 1.0)
      return (u.astype(compute) - (1.0 - keep) * d).astype(u.dtype)

    new_updates = _paths.map_with_path(
      project, updates, params, state.anchor, radii, scales, flags
    )
    return new_updates, ProjectionState(optax.safe_increment(state.count), state.anchor)

  return _rollback._masked(optax.GradientTransformation(init_fn, update_fn), mask)


def _axes_for(path, x, is_stacked, per, channel_axis) -> tuple[int, ...]:
  try:
    return reduce_axes(np.ndim(x), stacked=bool(is_stacked), per=per, channel_axis=channel_axis)
  except ValueError as e:
    raise ValueError(f"'{_paths.path_str(path)}' (shape {np.shape(x)}): {e}") from None
