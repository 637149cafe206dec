"""Parameter-tree paths: normalization, glob patterns and tables of values keyed by path.

Optimizers see the same parameters in several wrappings: Linen dicts with or
without the ``params`` collection, NNX ``State`` whose leaves are ``Variable``
objects (``nnx.Optimizer`` passes those to ``init`` and plain arrays to
``update``), trees rebuilt by ``jax.tree`` (dicts sorted by key), and
``optax.masked`` subtrees with ``MaskedNode`` placeholders. Everything here
works on *normalized paths* -- tuples of ``str``/``int`` with the ``Variable``
``.value`` step dropped -- so a spec built from one wrapping applies to
another. Nothing here depends on the order of a dict's keys.

Glob patterns (``head=``, ``mask=``, ``order=``, ``stacked=``, ...) have one
meaning everywhere: a pattern is ``/``-separated components, each an
``fnmatch`` glob over one path component (``*`` within a component, ``**``
any number of components); it is anchored at the root and selects the subtree
under every path it matches (``'head'`` selects ``head/kernel`` and
``head/bias``, not ``encoder/head/kernel``; ``'**/bias'`` every bias). A
leading ``params`` component (Linen's variable collection) is optional. A
pattern that matches no parameter is an error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Path = tuple[str | int, ...]
PathFilter = Callable[[Path], bool]

_VARIABLE_VALUE_KEYS = ("value", "raw_value")
_COLLECTION = "params"


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


def canonical(path: Path) -> Path:
  """``path`` without a leading ``params`` collection key (Linen variables)."""
  return path[1:] if path and path[0] == _COLLECTION else path


def is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def leaves_with_paths(tree: Any) -> list[tuple[Path, Any]]:
  """Leaves of ``tree`` with normalized paths, in ``jax.tree`` order.

  ``optax.MaskedNode`` placeholders (what ``optax.masked`` passes for
  masked-out leaves) are returned as leaves so callers can skip them.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked_node)
  return [(normalize_path(kp), leaf) for kp, leaf in flat]


def present_leaves(tree: Any) -> list[tuple[Path, Any]]:
  """``leaves_with_paths`` without the ``MaskedNode`` placeholders."""
  return [(p, x) for p, x in leaves_with_paths(tree) if not is_masked_node(x)]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` passing the normalized path first; MaskedNodes pass through."""

  def apply(kp: Any, leaf: Any, *others: Any) -> Any:
    if is_masked_node(leaf):
      return leaf
    return fn(normalize_path(kp), leaf, *others)

  return jax.tree_util.tree_map_with_path(apply, tree, *rest, is_leaf=is_masked_node)


def on_value(fn: Callable[[Any], Any], x: Any) -> Any:
  """``fn(x)``, or its abstract result when ``x`` is a ``jax.ShapeDtypeStruct`` (no value).

  ``tx.init`` on a tree of ``ShapeDtypeStruct`` s (as Optax's sharding tests
  call it) then gives the state's shapes and dtypes where a value would be
  needed, instead of failing.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.eval_shape(fn, x)
  return fn(x)


def operand(value: Any, dtype: Any = jnp.float32) -> jax.Array:
  """``value`` (a Python or NumPy number/array) as a state array, built by a JAX op.

  ``jnp.asarray(numpy_array)`` lands on the default device even under
  ``jax.set_mesh``, while the same line inside ``jax.jit(tx.init)`` gives a
  mesh array; an op on ``jnp.zeros`` gives the same type eagerly and jitted
  (Optax's sharding tests compare them).
  """
  return jnp.zeros(np.shape(value), dtype) + jnp.asarray(value, dtype)


def is_float_leaf(x: Any) -> bool:
  """An array (or abstract array) of a floating or complex dtype."""
  arrays = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
  return isinstance(x, arrays) and jnp.issubdtype(x.dtype, jnp.inexact)


# --- glob patterns ------------------------------------------------------------------------------


def _match_prefix(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
  if not pattern:
    return True
  head, rest = pattern[0], pattern[1:]
  if head == "**":
    return any(_match_prefix(rest, path[i:]) for i in range(len(path) + 1))
  return bool(path) and fnmatch.fnmatchcase(path[0], head) and _match_prefix(rest, path[1:])


@dataclass(frozen=True)
class Pattern:
  """One anchored glob pattern over normalized paths (see the module docstring)."""

  text: str

  def __post_init__(self) -> None:
    if not isinstance(self.text, str) or not self.text.strip("/"):
      raise ValueError(f"a path pattern must be a non-empty string, got {self.text!r}.")

  @property
  def parts(self) -> tuple[str, ...]:
    return tuple(p for p in self.text.split("/") if p)

  def matches(self, path: Path) -> bool:
    keys = tuple(str(k) for k in path)
    stripped = tuple(str(k) for k in canonical(path))
    return _match_prefix(self.parts, keys) or _match_prefix(self.parts, stripped)


def is_pattern_spec(spec: Any) -> bool:
  """A glob pattern or a non-empty list/tuple of them."""
  return isinstance(spec, str) or (
    isinstance(spec, (list, tuple)) and bool(spec) and all(isinstance(s, str) for s in spec)
  )


def patterns(spec: str | Sequence[str], *, name: str) -> tuple[Pattern, ...]:
  """Glob patterns from a string or a sequence of strings (empty: none)."""
  if isinstance(spec, (list, tuple)) and not spec:
    return ()
  if not is_pattern_spec(spec):
    raise ValueError(f"{name} must be a glob pattern or a list of them, got {spec!r}.")
  items = [spec] if isinstance(spec, str) else list(spec)
  return tuple(Pattern(p) for p in items)


def check_patterns_match(pats: Sequence[Pattern], tree: Any, *, name: str) -> None:
  """Raises naming the first pattern that matches no path of ``tree`` (MaskedNodes count).

  A tree without leaves (``optax.tree_map_params``' placeholder) is not checked.
  """
  paths = [p for p, _ in leaves_with_paths(tree)]
  if not paths:
    return
  for pattern in pats:
    if not any(pattern.matches(p) for p in paths):
      shown = ", ".join(path_str(p) for p in paths[:6]) + (", ..." if len(paths) > 6 else "")
      raise ValueError(
        f"{name}: pattern {pattern.text!r} matches no parameter. Patterns are anchored at the "
        f"root ('head' selects head/...; '**/bias' every bias); the paths are: {shown}."
      )


def path_filter(spec: str | Sequence[str]) -> PathFilter:
  """A predicate on normalized paths from glob patterns.

  Patterns are anchored at the root and select whole subtrees: ``'head'``
  matches ``head/kernel`` (and ``params/head/kernel``), ``'**/bias'`` every
  bias, ``'layers/0'`` everything under ``layers/0``.

  Example:
    >>> import dualopt_jax as dj
    >>> selects = dj.path_filter(['head', '**/bias'])
    >>> selects(('head', 'kernel')), selects(('encoder', 'head', 'kernel')), selects(('a', 'bias'))
    (True, False, True)
  """
  pats = patterns(spec, name="path_filter")
  return lambda path: any(p.matches(path) for p in pats)


# --- per-leaf lookups ---------------------------------------------------------------------------


class PathTable:
  """Values of a pytree keyed by canonical path, for wrapping-independent lookup.

  With ``prefix=True`` an entry also covers every path below it (Optax's
  mask contract: a mask or value tree may be a prefix of the params tree).
  """

  def __init__(self, tree: Any, *, name: str, prefix: bool = False):
    self.name = name
    self.prefix = prefix
    self.entries: dict[Path, Any] = {}
    for path, leaf in leaves_with_paths(tree):
      if not is_masked_node(leaf):
        self.entries[canonical(path)] = leaf

  def __iter__(self) -> Iterator[Path]:
    return iter(self.entries)

  def lookup(self, path: Path) -> tuple[bool, Any]:
    key = canonical(path)
    if key in self.entries:
      return True, self.entries[key]
    if self.prefix:
      for n in range(len(key) - 1, -1, -1):
        if key[:n] in self.entries:
          return True, self.entries[key[:n]]
    return False, None

  def get(self, path: Path) -> Any:
    found, value = self.lookup(path)
    if not found:
      known = ", ".join(path_str(p) for p in list(self.entries)[:8])
      raise ValueError(
        f"{self.name} has no entry for parameter path '{path_str(path)}'; "
        f"its paths are: {known}{', ...' if len(self.entries) > 8 else ''}."
      )
    return value
