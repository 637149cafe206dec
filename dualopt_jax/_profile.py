"""``LayerProfile``: a per-layer strength profile resolved from a parameter tree."""

from __future__ import annotations

from collections.abc import Sequence
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
    """Depths of ``tree``'s leaves, from the model's definition order where it is known.

    Only an eager ``init`` on concrete Linen/dict params sees the definition
    order (dicts keep insertion order). ``jax.jit``/``jax.eval_shape`` hand
    ``init`` a key-sorted tree, ``update`` always gets one, and ``nnx.state``
    is sorted: those reuse the table cached from the eager ``init`` (keyed by
    the depth settings and the leaves' paths and shapes). Without one, depths
    that do not depend on key order are computed (NNX trees order tensors by
    block, module, then kernel/scale before bias); anything else raises.
    """
    key = (self.granularity, self.order, self.stacked, _signature(tree))
    kwargs = {"granularity": self.granularity, "order": self.order, "stacked": self.stacked}
    if at_init:
      hinted = _paths.in_hinted_order(tree)
      source = hinted if hinted is not None else tree
      if hinted is not None or _paths.order_is_definition(tree):
        _TABLES[key] = _depths.depth_table(source, trust_order=True, **kwargs)
        return _TABLES[key]
    if key in _TABLES:
      return _TABLES[key]
    if self.granularity == "tensor" and self.order is None and not _paths.has_variables(tree):
      raise self._order_error()
    try:
      _TABLES[key] = _depths.depth_table(tree, trust_order=False, **kwargs)
    except ValueError as error:
      if "definition order" in str(error):
        raise self._order_error() from error
      raise
    return _TABLES[key]

  def _order_error(self) -> ValueError:
    return ValueError(
      f"LayerProfile(granularity={self.granularity!r}) needs the model's definition order, and "
      "this tree's key order is not it (jax.jit, jax.vmap and jax.eval_shape hand tx.init a "
      "key-sorted tree; update always gets one). Call tx.init(params) or dj.describe(params, tx) "
      "once, un-jitted, with the params as the model created them (e.g. "
      "model.init(...)['params']) -- the depths are then remembered for every later jitted "
      "init/update in this process -- or pass order=[...] patterns."
    )

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


def as_tuple(patterns: str | Sequence[str] | None) -> tuple[str, ...] | str | None:
  if patterns is None or isinstance(patterns, str):
    return patterns
  return tuple(patterns)
