"""Per-leaf values: a hyper-parameter that differs between parameters.

A per-leaf value is a scalar/array (the same for every leaf), a pytree over
the params (matched by path, any wrapping; it may be a prefix of the params
tree, as Optax's masks may), or a callable ``params -> pytree`` (as Optax's
mask callables). A callable is never a function of a path: callables of
one argument given where a number is expected are schedules of the step
count (``_hyperparams``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dualopt_jax import _hyperparams, _paths


def resolve(spec: Any, tree: Any, *, name: str) -> Any:
  """``spec`` mapped onto ``tree``: a tree of values with ``tree``'s structure.

  Values must broadcast against their leaf without changing its shape (e.g.
  shape ``(L, 1, 1)`` for ``L`` stacked layers).
  """
  if isinstance(spec, (str, bytes)):
    raise ValueError(
      f"{name} must be a number, a pytree over the params or a params -> pytree function, got "
      f"the string {spec!r}."
    )
  if _hyperparams.is_scalar_like(spec):
    check_number(spec, (), name)
    return _paths.map_with_path(lambda _p, _x: spec, tree)
  table = _paths.PathTable(spec(tree) if callable(spec) else spec, name=name, prefix=True)

  def value_for(path: _paths.Path, leaf: Any) -> Any:
    value = table.get(path)
    check_number(value, path, name)
    check_broadcasts(value, leaf, path, name)
    return value

  return _paths.map_with_path(value_for, tree)


def check_number(value: Any, path: _paths.Path, name: str) -> None:
  """Raises unless ``value`` is a number or array of finite numbers (or not known yet)."""
  where = f" for '{_paths.path_str(path)}'" if path else ""
  if not _hyperparams.is_scalar_like(value):
    raise ValueError(f"{name}{where} must be a number or an array, got {value!r}.")
  v = _hyperparams.concrete(value)
  if v is not None and not np.all(np.isfinite(v)):
    raise ValueError(f"{name}{where} must be finite, got {value!r}.")


def check_broadcasts(value: Any, leaf: Any, path: _paths.Path, name: str) -> None:
  """Raises unless ``value`` broadcasts against ``leaf`` without changing its shape."""
  value_shape = np.shape(value)
  leaf_shape = np.shape(leaf)
  try:
    ok = np.broadcast_shapes(value_shape, leaf_shape) == tuple(leaf_shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
      f"{name} for '{_paths.path_str(path)}' has shape {value_shape}, which does not broadcast "
      f"against the parameter's shape {tuple(leaf_shape)}; use a scalar, or an array "
      f"such as shape (L, 1, ...) for L stacked layers."
    )


def check_nonnegative(tree: Any, *, name: str) -> None:
  """Raises naming the path when a known leaf of ``tree`` is negative."""
  for path, value in _paths.leaves_with_paths(tree):
    v = _hyperparams.concrete(value)
    if v is not None and np.any(v < 0):
      raise ValueError(f"{name} for '{_paths.path_str(path)}' must be >= 0, got {value!r}.")


def split_global(spec: Any, *, name: str) -> tuple[Any, Any]:
  """``(global value or schedule, per-leaf factor)`` of a hyper-parameter such as a radius.

  A scalar or a callable (a schedule of the step count) is global, the same
  for every leaf; a pytree or a ``LayerProfile`` is per leaf.
  """
  if isinstance(spec, (str, bytes)):
    raise ValueError(
      f"{name} must be a number, a schedule, a pytree or a LayerProfile, got the string {spec!r}."
    )
  if callable(spec) or _hyperparams.is_scalar_like(spec):
    return spec, 1.0
  return 1.0, spec
