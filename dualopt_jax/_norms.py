"""Tensor norms of the peer methods: which axes a norm reduces, and the norm itself.

A leaf that stacks layers on axis 0 (``nn.scan``, ``nnx.vmap``) gets one
norm per layer. ``stacked`` means one thing everywhere (as in
``layer_depths``): ``None`` detects stacked subtrees from the tree (names
such as ``layers``/``blocks``/``Scan*`` whose leaves share a leading axis);
glob patterns name them; ``()`` says there are none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from dualopt_jax import _depths, _paths

PER = ("tensor", "channel")


def stacked_flags(stacked: str | Sequence[str] | None, tree: Any, *, name: str = "stacked") -> Any:
  """A tree of Python bools over ``tree``: which leaves stack layers on axis 0."""
  if stacked is not None:
    pats = _paths.patterns(stacked, name=name)
    _paths.check_patterns_match(pats, tree, name=name)
  found = _depths.stacked_leaves(tree, stacked)
  return _paths.map_with_path(lambda path, _x: path in found, tree)


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
  if per not in PER:
    raise ValueError(f"per must be one of {PER}, got {per!r}.")
  first = 1 if stacked else 0
  axes = tuple(range(first, ndim))
  channel_axis = static_axis(channel_axis)
  if per == "tensor" or len(axes) <= 1:
    return axes
  inner_ndim = ndim - first
  if not -inner_ndim <= channel_axis < inner_ndim:
    raise ValueError(f"channel_axis={channel_axis} is out of range for a {inner_ndim}-D tensor.")
  keep = first + (channel_axis % inner_ndim)
  return tuple(a for a in axes if a != keep)


def leaf_axes(path: _paths.Path, x: Any, is_stacked: bool, per: str,
              channel_axis: Any) -> tuple[int, ...]:
  """``reduce_axes`` for one leaf, with its path and shape in any error."""
  try:
    return reduce_axes(np.ndim(x), stacked=bool(is_stacked), per=per, channel_axis=channel_axis)
  except ValueError as e:
    raise ValueError(f"'{_paths.path_str(path)}' (shape {np.shape(x)}): {e}") from None


def squared_magnitude(x: chex.Array) -> jax.Array:
  """:math:`|x|^2` elementwise, real (``x * conj(x)`` for complex ``x``)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x))
  return jnp.square(x)


def real_inner(a: chex.Array, b: chex.Array, axes: tuple[int, ...]) -> jax.Array:
  """The real part of the Hermitian product of ``a`` and ``b`` over ``axes`` (kept)."""
  if jnp.issubdtype(a.dtype, jnp.complexfloating) or jnp.issubdtype(b.dtype, jnp.complexfloating):
    return jnp.sum(jnp.real(jnp.conj(a) * b), axis=axes, keepdims=True)
  return jnp.sum(a * b, axis=axes, keepdims=True)


def norm_keepdims(x: chex.Array, axes: tuple[int, ...], *, ord: str = "l2") -> jax.Array:
  """L2 (``ord="l2"``) or L1 (``ord="l1"``) norm over ``axes``, kept as size-1 axes (real)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if ord == "l1":
    return jnp.sum(jnp.abs(x), axis=axes, keepdims=True)
  return jnp.sqrt(jnp.sum(squared_magnitude(x), axis=axes, keepdims=True))
