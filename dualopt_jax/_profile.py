"""``LayerProfile``: a per-layer strength profile resolved from a parameter tree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dualopt_jax import _depths, _paths

# Depth tables computed from the tree given to ``init`` (which has the model's
# definition order), reused by ``update`` (whose trees ``jax`` rebuilt in sorted
# key order). Keyed by the profile and the set of (path, shape) of the leaves.
_TABLES: dict[tuple, dict[_paths.Path, Any]] = {}


def _signature(tree: Any) -> tuple:
  return tuple(
    sorted(
      (_paths.path_str(p), tuple(np.shape(x)))
      for p, x in _paths.leaves_with_paths(tree)
      if not _paths.is_masked_node(x)
    )
  )


def _reversed_order(tree: Any) -> Any:
  """The same leaves with every mapping's keys in reverse insertion order."""
  if isinstance(tree, Mapping) or (hasattr(tree, "items") and callable(tree.items)):
    return {k: _reversed_order(v) for k, v in reversed(list(tree.items()))}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return [_reversed_order(v) for v in tree]
  return tree


@dataclass(frozen=True)
class LayerProfile:
  """Per-layer multipliers ``end + (1 - depth)^power * (start - end)``.

  Usable wherever a ``layer_scale`` is accepted. Depths come from
  :func:`~dualopt_jax.layer_depths` of the tree given to ``init`` (which keeps
  the model's definition order); ``update`` reuses them.

  Attributes:
    start: multiplier at depth 0 (input side).
    end: multiplier at depth 1 (output side).
    power: exponent of the profile (1 linear, 2 quadratic).
    granularity: ``"block"`` or ``"tensor"`` (see ``layer_depths``).
    order: optional glob patterns, input to output (see ``layer_depths``).
    stacked: optional glob patterns naming stacked-layer subtrees.
    flip: measure depth from the output side (``d -> 1 - d``), so ``start``
      applies to the deepest layer.
  """

  start: float
  end: float
  power: float = 1.0
  granularity: str = "block"
  order: tuple[str, ...] | None = None
  stacked: tuple[str, ...] | str | None = None
  flip: bool = False

  def __post_init__(self) -> None:
    if self.granularity not in _depths.GRANULARITIES:
      raise ValueError(
        f"granularity must be one of {_depths.GRANULARITIES}, got {self.granularity!r}."
      )
    if isinstance(self.order, list):
      object.__setattr__(self, "order", tuple(self.order))
    if isinstance(self.stacked, list):
      object.__setattr__(self, "stacked", tuple(self.stacked))

  def _depth_kwargs(self) -> dict[str, Any]:
    return {"granularity": self.granularity, "order": self.order, "stacked": self.stacked}

  def depth_table(self, tree: Any, *, at_init: bool) -> dict[_paths.Path, Any]:
    key = (self, _signature(tree))
    if at_init or key not in _TABLES:
      table = _depths.depth_table(tree, **self._depth_kwargs())
      reordered = None if at_init else _depths.depth_table(
        _reversed_order(tree), **self._depth_kwargs()
      )
      if reordered is not None and not _same_table(table, reordered):
        raise ValueError(
          f"LayerProfile(granularity={self.granularity!r}) needs the model's definition order, "
          "which update's (key-sorted) tree has lost: call tx.init (or "
          "jax.eval_shape(tx.init, params)) with the params as the model created them before "
          "update, or pass order=[...] patterns."
        )
      _TABLES[key] = table
    return _TABLES[key]

  def multiplier(self, depth: Any) -> Any:
    """The profile's value at ``depth`` (a float, or an array for stacked leaves)."""
    if self.flip:
      depth = 1.0 - np.asarray(depth, np.float64)
      depth = float(depth) if depth.ndim == 0 else depth
    return _depths.depth_profile(depth, start=self.start, end=self.end, power=self.power)

  def per_leaf_values(self, tree: Any, *, at_init: bool = False) -> Any:
    table = self.depth_table(tree, at_init=at_init)
    return _paths.map_with_path(
      lambda path, _x: self.multiplier(table[path]),
      tree,
    )


def _same_table(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def as_tuple(patterns: str | Sequence[str] | None) -> tuple[str, ...] | str | None:
  if patterns is None or isinstance(patterns, str):
    return patterns
  return tuple(patterns)
