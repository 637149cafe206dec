"""Masks: which leaves a transformation (or one of its roles) applies to.

One mechanism for every argument that selects leaves (``mask``, ``head``,
``decay_to_zero``, FixNorm's ``normalized``/``classifier``): Optax's
``masked`` contract -- a pytree of bools that may be a *prefix* of the params
tree (``True`` alone selects everything), or a callable ``params -> pytree
of bools`` -- plus glob patterns over paths (see ``_paths``). Bools are
matched by path, so a mask built from one wrapping (``nnx.state``) applies
to another (``nnx.Optimizer``'s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from dualopt_jax import _paths


def mask_callable(mask: Any, *, name: str = "mask") -> Callable[[Any], Any]:
  """An ``optax.masked``-style mask callable that works across wrappings.

  Accepts glob patterns (``str`` or list of ``str``; each must match a
  parameter), a pytree of bools (matched by path; it may be a prefix of the
  params tree, as in ``optax.masked``), or a callable ``params -> pytree of
  bools`` (also a prefix). The result has ``params``' structure.
  """
  if _paths.is_pattern_spec(mask):
    pats = _paths.patterns(mask, name=name)

    def from_patterns(tree: Any) -> Any:
      _paths.check_patterns_match(pats, tree, name=name)
      return _paths.map_with_path(lambda path, _x: any(p.matches(path) for p in pats), tree)

    return from_patterns
  if callable(mask):
    return lambda tree: bool_tree(mask(tree), tree, name=name)
  return lambda tree: bool_tree(mask, tree, name=name)


def bool_tree(mask_tree: Any, tree: Any, *, name: str) -> Any:
  """``mask_tree`` (a prefix pytree of bools over ``tree``) expanded to ``tree``'s leaves."""
  table = _paths.PathTable(mask_tree, name=name, prefix=True)

  def flag(path: _paths.Path, _x: Any) -> bool:
    value = table.get(path)
    if isinstance(value, (bool, np.bool_)):
      return bool(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and value.dtype == bool:
      try:
        return bool(value)
      except jax.errors.ConcretizationTypeError:
        pass
    raise ValueError(
      f"{name} for '{_paths.path_str(path)}' must be a Python bool (masks are static), "
      f"got {value!r}."
    )

  return _paths.map_with_path(flag, tree)


def named(spec: Any, name: str) -> Callable[[Any], Any]:
  """``mask_callable(spec)`` whose errors start with the argument's name."""
  fn = mask_callable(spec)

  def call(tree: Any) -> Any:
    try:
      return fn(tree)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None

  return call


def flags(spec: Any, tree: Any, *, name: str, default: bool = False) -> Any:
  """``spec`` as a bool per leaf of ``tree``; ``spec=None`` gives ``default`` everywhere."""
  if spec is None:
    return _paths.map_with_path(lambda _p, _x: default, tree)
  return named(spec, name)(tree)


def masked(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """``optax.masked(tx, mask)`` with our mask specs; ``mask=None`` is ``tx`` itself."""
  if mask is None:
    return tx
  return optax.masked(tx, mask_callable(mask))
