"""Helpers shared by the peer methods: stacked-layer flags, per-tensor/per-channel norms,
named masks and scalar-or-schedule values."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualopt_jax import _depths, _paths, _rollback

ScalarOrSchedule = optax.ScalarOrSchedule




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
    found = _depths.stacked_leaves(tree)
    return _paths.map_with_path(lambda path, _x: path in found, tree)
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
  if _paths.is_scalar_like(spec):
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


def axes_for(path, x, is_stacked, per, channel_axis) -> tuple[int, ...]:
  try:
    return reduce_axes(np.ndim(x), stacked=bool(is_stacked), per=per, channel_axis=channel_axis)
  except ValueError as e:
    raise ValueError(f"'{_paths.path_str(path)}' (shape {np.shape(x)}): {e}") from None
