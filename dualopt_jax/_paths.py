"""Parameter-tree paths: normalization, definition order and per-leaf specs.

Optimizers see the same parameters in several wrappings: Linen dicts with or
without the ``params`` collection, NNX ``State`` whose leaves are ``Variable``
objects (``nnx.Optimizer`` passes those to ``init`` and plain arrays to
``update``), and trees rebuilt by ``jax.tree`` whose dicts are sorted by key.
Everything here works on *normalized paths* -- tuples of ``str``/``int`` with
the ``Variable`` ``.value`` step dropped -- so a spec built from one wrapping
applies to another.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Path = tuple[str | int, ...]
PathFilter = Callable[[Path], bool]

_VARIABLE_VALUE_KEYS = ("value", "raw_value")


def normalize_path(key_path: Sequence[Any]) -> Path:
  """Turns a ``jax.tree_util`` key path into a tuple of ``str``/``int`` keys."""
  out: list[str | int] = []
  for key in key_path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name in _VARIABLE_VALUE_KEYS:
        continue
      out.append(key.name)
    elif isinstance(key, jax.tree_util.DictKey):
      out.append(key.key if isinstance(key.key, int) else str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      out.append(key.idx)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      out.append(key.key)
    else:
      out.append(str(key))
  return tuple(out)


def path_str(path: Path) -> str:
  """``('layers', 0, 'kernel')`` -> ``'layers/0/kernel'``."""
  return "/".join(str(k) for k in path) if path else "<root>"


def is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def leaves_with_paths(tree: Any) -> list[tuple[Path, Any]]:
  """Leaves of ``tree`` with normalized paths, in ``jax.tree`` order.

  ``optax.MaskedNode`` placeholders (what ``optax.masked`` passes for
  masked-out leaves) are returned as leaves so callers can skip them.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked_node)
  return [(normalize_path(kp), leaf) for kp, leaf in flat]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` passing the normalized path first; MaskedNodes pass through."""

  def apply(kp: Any, leaf: Any, *others: Any) -> Any:
    if is_masked_node(leaf):
      return leaf
    return fn(normalize_path(kp), leaf, *others)

  return jax.tree_util.tree_map_with_path(apply, tree, *rest, is_leaf=is_masked_node)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def definition_order(tree: Any) -> list[tuple[Path, Any]]:
  """Leaves with normalized paths in the order the model defined them.

  Python dicts (Linen ``init`` output, NNX ``State``) keep insertion order,
  which is the order modules created their parameters; ``jax.tree`` would sort
  the keys instead (``layers_10`` before ``layers_2``, ``bias`` before
  ``kernel``). Sequences keep their index order. Other pytree nodes fall back
  to ``jax.tree`` order.
  """
  out: list[tuple[Path, Any]] = []

  def walk(node: Any, prefix: Path) -> None:
    if node is None or is_masked_node(node):
      return
    if _is_variable(node):
      walk(node.get_value(), prefix)
    elif isinstance(node, Mapping) or hasattr(node, "items") and callable(node.items):
      for key, child in node.items():
        walk(child, (*prefix, key if isinstance(key, int) else str(key)))
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      for i, child in enumerate(node):
        walk(child, (*prefix, i))
    elif isinstance(node, (jax.Array, np.ndarray, np.generic, float, int, bool)) or hasattr(
      node, "shape"
    ):
      out.append((prefix, node))
    else:
      for kp, leaf in jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_variable)[0]:
        walk(leaf, (*prefix, *normalize_path(kp)))

  walk(tree, ())
  return out


def has_variables(tree: Any) -> bool:
  """Whether ``tree`` holds NNX ``Variable``s (``nnx.state`` output, always key-sorted)."""
  return any(_is_variable(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_variable))


def has_abstract_leaves(tree: Any) -> bool:
  """Tracers or ``ShapeDtypeStruct``s: ``init`` under ``jax.jit``/``jax.eval_shape``."""
  return any(
    isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))
    for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_variable)
    if not _is_variable(x)
  ) or any(
    isinstance(x.get_value(), (jax.core.Tracer, jax.ShapeDtypeStruct))
    for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_variable)
    if _is_variable(x)
  )


def reversed_key_order(tree: Any) -> Any:
  """The same leaves with every mapping's keys in reverse insertion order (plain containers)."""
  if _is_variable(tree):
    return tree
  if isinstance(tree, Mapping) or (hasattr(tree, "items") and callable(tree.items)):
    return {k: reversed_key_order(v) for k, v in reversed(list(tree.items()))}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return [reversed_key_order(v) for v in tree]
  return tree


def _mappings_sorted(node: Any) -> bool:
  """Whether every mapping in ``node`` has its keys in sorted order (as ``jax.tree`` rebuilds)."""
  if _is_variable(node):
    return True
  if isinstance(node, Mapping) or (hasattr(node, "items") and callable(node.items)):
    keys = [str(k) for k in node]
    return keys == sorted(keys) and all(_mappings_sorted(v) for v in node.values())
  if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
    return all(_mappings_sorted(v) for v in node)
  return True


def order_is_definition(tree: Any) -> bool:
  """Whether ``tree``'s key order can be taken as the model's definition order.

  Not for trees under ``jax.jit``/``jax.vmap``/``jax.eval_shape`` (abstract
  leaves), NNX state (always sorted), or trees whose every mapping is sorted
  (what any ``jax.tree`` rebuild, ``optax.masked`` included, produces; a real
  Linen tree has ``kernel`` before ``bias``).
  """
  return not (has_variables(tree) or has_abstract_leaves(tree) or _mappings_sorted(tree))


_ORDER_HINT: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar(
  "dualopt_order_hint", default=None
)


@contextlib.contextmanager
def order_hint(tree: Any) -> Iterator[None]:
  """Within the block, profiles may take the definition order from ``tree``.

  Used around ``optax.masked(...).init``, which hands the inner ``init`` a
  key-sorted copy of the params.
  """
  hint = [p for p, _ in definition_order(tree)] if order_is_definition(tree) else None
  token = _ORDER_HINT.set(hint)
  try:
    yield
  finally:
    _ORDER_HINT.reset(token)


def in_hinted_order(tree: Any) -> Any | None:
  """``tree``'s leaves as nested dicts in the active hint's order, or None without a hint."""
  hint = _ORDER_HINT.get()
  if hint is None:
    return None
  leaves = {p: x for p, x in leaves_with_paths(tree) if not is_masked_node(x)}
  if not set(leaves) <= set(hint):
    return None
  out: dict = {}
  for path in hint:
    if path in leaves:
      node = out
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = leaves[path]
  return out


def is_float_leaf(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def path_filter(patterns: str | Sequence[str]) -> PathFilter:
  """A predicate on paths from glob patterns over ``'a/b/c'`` strings.

  A pattern matches when it matches a contiguous run of path components:
  ``'head'`` matches ``head/kernel``; ``'*/bias'`` every bias; ``'layers/0'``
  everything under ``layers/0``.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  patterns = list(patterns)

  def matches(path: Path) -> bool:
    text = path_str(path)
    for pattern in patterns:
      for candidate in (pattern, pattern + "/*", "*/" + pattern, "*/" + pattern + "/*"):
        if fnmatch.fnmatchcase(text, candidate):
          return True
    return False

  return matches


class PathTable:
  """Values of a pytree keyed by normalized path, for wrapping-independent lookup."""

  def __init__(self, tree: Any, *, name: str):
    self.name = name
    self.entries: dict[Path, Any] = {}
    for path, leaf in leaves_with_paths(tree):
      if not is_masked_node(leaf):
        self.entries[path] = leaf

  def __iter__(self) -> Iterator[Path]:
    return iter(self.entries)

  def get(self, path: Path) -> Any:
    try:
      return self.entries[path]
    except KeyError:
      known = ", ".join(path_str(p) for p in list(self.entries)[:8])
      raise ValueError(
        f"{self.name} has no entry for parameter path '{path_str(path)}'; "
        f"its paths are: {known}{', ...' if len(self.entries) > 8 else ''}."
      ) from None


def resolve_per_leaf(spec: Any, tree: Any, *, name: str, at_init: bool = False) -> Any:
  """Maps a per-leaf spec onto ``tree``: a tree of values with ``tree``'s structure.

  ``spec`` is a scalar/array (the same for every leaf), a callable
  ``(path, leaf) -> value``, or a pytree over the same parameters (any
  wrapping; matched by normalized path). Values must broadcast against their
  leaf without changing its shape (e.g. shape ``(L, 1, 1)`` for ``L`` stacked
  layers). An object with a ``per_leaf_values(tree, at_init=...)`` method (a
  :class:`~dualopt_jax.LayerProfile`) computes values from the whole tree;
  ``at_init`` says whether ``tree`` is the one given to ``init``, which still
  has the model's definition order.
  """
  if hasattr(spec, "per_leaf_values"):
    table = PathTable(spec.per_leaf_values(tree, at_init=at_init), name=name)
    fn = lambda path, _leaf: table.get(path)
  elif callable(spec) and not hasattr(spec, "shape"):
    fn = spec
  elif _is_scalar_like(spec):
    return map_with_path(lambda _p, _x: spec, tree)
  else:
    table = PathTable(spec, name=name)
    fn = lambda path, _leaf: table.get(path)

  def value_for(path: Path, leaf: Any) -> Any:
    value = fn(path, leaf)
    _check_broadcasts(value, leaf, path, name)
    return value

  return map_with_path(value_for, tree)


def _is_scalar_like(x: Any) -> bool:
  return isinstance(x, (int, float, np.number)) or (hasattr(x, "shape") and not isinstance(
    x, Mapping
  ) and hasattr(x, "dtype"))


def _check_broadcasts(value: Any, leaf: Any, path: Path, name: str) -> None:
  value_shape = np.shape(value)
  leaf_shape = np.shape(leaf)
  try:
    ok = np.broadcast_shapes(value_shape, leaf_shape) == tuple(leaf_shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
      f"{name} for '{path_str(path)}' has shape {value_shape}, which does not broadcast "
      f"against the parameter's shape {tuple(leaf_shape)}; use a scalar, or an array "
      f"such as shape (L, 1, ...) for L stacked layers."
    )


def mask_callable(mask: Any) -> Callable[[Any], Any]:
  """An ``optax.masked``-style mask callable that works across wrappings.

  Accepts a pytree of bools (matched by path, so one built from ``nnx.state``
  works inside ``nnx.Optimizer``), a callable ``params -> pytree of bools``,
  or glob patterns (``str`` or list of ``str``, see :func:`path_filter`).
  """
  if isinstance(mask, str) or (
    isinstance(mask, (list, tuple)) and mask and all(isinstance(m, str) for m in mask)
  ):
    selects = path_filter(mask)
    return lambda tree: map_with_path(lambda path, _x: selects(path), tree)
  if callable(mask):
    return lambda tree: _as_bool_tree(mask(tree), tree)
  return lambda tree: _as_bool_tree(mask, tree)


def _as_bool_tree(mask_tree: Any, tree: Any) -> Any:
  table = PathTable(mask_tree, name="mask")
  return map_with_path(lambda path, _x: bool(table.get(path)), tree)
