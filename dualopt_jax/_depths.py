"""Layer depths from parameter paths, and per-layer strength profiles.

Depth 0 is the input side (embeddings), 1 the output side (final norm, head).
Depth comes from what a path *means* -- block numbers compared as numbers, the
model's definition order -- never from ``jax.tree``'s sorted flatten order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dualopt_jax import _paths

Granularity = Literal["block", "tensor"]
GRANULARITIES = ("block", "tensor")

_NUMBERED = re.compile(r"^(.*?[A-Za-z])_?(\d+)$")
_EMBEDDING = re.compile(
  r"^(.*_)?(embed\w*|embedding\w*|wte|wpe|tok_\w*|token\w*|patch\w*|pos\w*|position\w*|cls\w*|"
  r"stem\w*)$",
  re.IGNORECASE,
)
_OUTPUT = re.compile(
  r"^(head|heads|\w+_head|head_\w+|classifier|fc|lm_head|logits|output|out|pooler|norm|ln_f|"
  r"final_\w+|\w+_norm|final)$",
  re.IGNORECASE,
)
_STACK_NAME = re.compile(r"^((scan|vmap|stack)\w*|layers|blocks|h|stacked)$", re.IGNORECASE)


@dataclass(frozen=True)
class _Unit:
  """Where a leaf sits: ``kind`` in embed/block/stacked/output, ``group`` and ``number``."""

  kind: str
  group: tuple = ()
  number: int = 0


def _base_and_number(key: str | int) -> tuple[str, int | None]:
  if isinstance(key, int):
    return "", key
  match = _NUMBERED.match(key)
  if match:
    return match.group(1), int(match.group(2))
  return key, None


def _auto_stacked(prefix: _paths.Path, leaves: list[tuple[_paths.Path, Any]]) -> bool:
  """A subtree named like a layer stack whose leaves share a leading axis, with no index below."""
  below = [(p, x) for p, x in leaves if p[: len(prefix)] == prefix and len(p) > len(prefix)]
  if not below or any(isinstance(p[len(prefix)], int) for p, _ in below):
    return False
  leading = {np.shape(x)[0] if np.ndim(x) >= 1 else None for _, x in below}
  return len(leading) == 1 and None not in leading


def _classify(
  path: _paths.Path,
  leaves: list[tuple[_paths.Path, Any]],
  stacked: _paths.PathFilter | None,
) -> _Unit | None:
  for i, key in enumerate(path):
    prefix = path[: i + 1]
    is_leaf_key = i == len(path) - 1
    base, number = _base_and_number(key)
    name = str(key)
    if not is_leaf_key:
      if stacked is not None:
        if stacked(prefix) and not any(stacked(path[:j]) for j in range(1, i + 1)):
          return _Unit("stacked", prefix)
      elif _STACK_NAME.match(name) and _auto_stacked(prefix, leaves):
        return _Unit("stacked", prefix)
    if isinstance(key, int):
      return _Unit("block", path[:i], key)
    if _EMBEDDING.match(base) or _EMBEDDING.match(name):
      return _Unit("embed")
    if is_leaf_key:
      return _Unit("output") if _OUTPUT.match(name) else None
    if number is not None:
      return _Unit("block", (*path[:i], base), number)
    if _OUTPUT.match(name):
      return _Unit("output")
  return None


def _no_rule_error(path: _paths.Path) -> ValueError:
  return ValueError(
    f"layer_depths(granularity='block'): no depth rule matches '{_paths.path_str(path)}'. "
    "Rules: numbered blocks ('Block_3', 'layers_3', 'layers/3', 'h/3'), embeddings "
    "('embed*', 'wte', 'pos*', 'patch*', 'cls*'), output ('head', 'norm', 'ln_f', 'final_*', "
    "'*_head', 'classifier'), stacked layers ('layers', 'blocks', 'Scan*' with a shared leading "
    "axis, or `stacked=`). Pass order=[pattern, ...] (glob patterns over 'a/b/c' paths, input "
    "to output) to set the order yourself, e.g. order=['embed', 'encoder', 'head']."
  )


def _stack_length(prefix: tuple, leaves: list[tuple[_paths.Path, Any]]) -> int:
  lengths = {
    np.shape(x)[0] for p, x in leaves if p[: len(prefix)] == prefix and np.ndim(x) >= 1
  }
  if len(lengths) != 1:
    raise ValueError(
      f"layer_depths: leaves under the stacked subtree '{_paths.path_str(prefix)}' have "
      f"different leading axes {sorted(lengths)}; stacked layers share one leading axis."
    )
  return lengths.pop()


def _block_depths(
  leaves: list[tuple[_paths.Path, Any]], stacked: _paths.PathFilter | None
) -> dict[_paths.Path, Any]:
  units = {}
  for path, _ in leaves:
    unit = _classify(path, leaves, stacked)
    if unit is None:
      raise _no_rule_error(path)
    units[path] = unit
  group_order: list[tuple] = []
  for unit in units.values():
    if unit.kind in ("block", "stacked") and unit.group not in group_order:
      group_order.append(unit.group)
  positions: list[tuple] = sorted(
    {(group_order.index(u.group), u.number) for u in units.values() if u.kind == "block"}
  )
  # Each stacked subtree occupies one slot per slice, in its group's place.
  slots: list[tuple] = []
  for g, group in enumerate(group_order):
    stacked_here = [u for u in units.values() if u.kind == "stacked" and u.group == group]
    if stacked_here:
      length = _stack_length(group, leaves)
      slots.extend((g, j) for j in range(length))
    else:
      slots.extend(pos for pos in positions if pos[0] == g)
  has_embed = any(u.kind == "embed" for u in units.values())
  has_output = any(u.kind == "output" for u in units.values())
  total = int(has_embed) + len(slots) + int(has_output)
  denominator = max(total - 1, 1)
  slot_rank = {slot: int(has_embed) + r for r, slot in enumerate(slots)}
  depths: dict[_paths.Path, Any] = {}
  for path, leaf in leaves:
    unit = units[path]
    if unit.kind == "embed":
      depths[path] = 0.0
    elif unit.kind == "output":
      depths[path] = (total - 1) / denominator
    elif unit.kind == "block":
      depths[path] = slot_rank[(group_order.index(unit.group), unit.number)] / denominator
    else:
      g = group_order.index(unit.group)
      ranks = [slot_rank[(g, j)] for j in range(np.shape(leaf)[0])]
      shape = (len(ranks),) + (1,) * (np.ndim(leaf) - 1)
      depths[path] = (np.asarray(ranks, np.float32) / denominator).reshape(shape)
  return depths


def _tensor_depths(leaves: list[tuple[_paths.Path, Any]]) -> dict[_paths.Path, Any]:
  denominator = max(len(leaves) - 1, 1)
  return {path: i / denominator for i, (path, _) in enumerate(leaves)}


_ROLE_RANK = {"embedding": 0, "kernel": 1, "weight": 1, "w": 1, "scale": 2, "bias": 3, "b": 3}


def _semantic_order(
  leaves: list[tuple[_paths.Path, Any]], stacked: _paths.PathFilter | None
) -> list[tuple[_paths.Path, Any]]:
  """Tensors ordered by block depth, then module path, then role (kernel/scale before bias).

  Reproduces Linen's creation order for standard layers from a key-sorted tree
  (what ``jax.jit``/``jax.eval_shape`` and ``nnx.state`` hand over).
  """
  block = _block_depths(leaves, stacked)

  def key(item: tuple[_paths.Path, Any]) -> tuple:
    path, _ = item
    depth = float(np.min(block[path]))
    module = tuple(str(k) for k in path[:-1])
    return depth, module, _ROLE_RANK.get(str(path[-1]), 2), str(path[-1])

  return sorted(leaves, key=key)


def _order_depths(
  leaves: list[tuple[_paths.Path, Any]], order: Sequence[str]
) -> dict[_paths.Path, Any]:
  filters = [_paths.path_filter(pattern) for pattern in order]
  denominator = max(len(filters) - 1, 1)
  depths = {}
  for path, _ in leaves:
    index = next((k for k, matches in enumerate(filters) if matches(path)), None)
    if index is None:
      raise ValueError(
        f"layer_depths: parameter '{_paths.path_str(path)}' matches none of the order "
        f"patterns {list(order)}; add a pattern for it."
      )
    depths[path] = index / denominator
  return depths


def depth_table(
  params: Any,
  *,
  granularity: Granularity = "block",
  order: Sequence[str] | None = None,
  stacked: str | Sequence[str] | None = None,
  trust_order: bool | None = None,
) -> dict[_paths.Path, Any]:
  """Depth per normalized path (floats, or arrays for stacked leaves).

  ``trust_order=False`` says ``params``'s key order is not the model's
  definition order (a key-sorted tree, as ``nnx.state`` always is; the
  default for trees of NNX ``Variable``s): tensors are then ordered by
  :func:`_semantic_order`, and depths that would change with the key order
  raise instead of being guessed.
  """
  if trust_order is None:
    trust_order = not _paths.has_variables(params)
  table = _depth_table(params, granularity, order, stacked, trust_order)
  if not trust_order and order is None:
    reordered = _depth_table(
      _paths.reversed_key_order(params), granularity, order, stacked, trust_order
    )
    if table.keys() != reordered.keys() or any(
      not np.array_equal(table[k], reordered[k]) for k in table
    ):
      raise ValueError(
        "layer_depths: these depths depend on the model's definition order, which this "
        "key-sorted tree (nnx.state, or a tree rebuilt by jax.tree/jax.jit) does not carry, "
        f"e.g. at '{_paths.path_str(next(iter(table)))}'. Pass order=[pattern, ...] (input to "
        "output), or the params as the model created them (Linen's model.init output)."
      )
  return table


def _depth_table(
  params: Any,
  granularity: str,
  order: Sequence[str] | None,
  stacked: str | Sequence[str] | None,
  trust_order: bool,
) -> dict[_paths.Path, Any]:
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  leaves = _paths.definition_order(params)
  if order is not None:
    return _order_depths(leaves, order)
  stacked_filter = None if stacked is None else _paths.path_filter(stacked)
  if granularity == "tensor":
    return _tensor_depths(leaves if trust_order else _semantic_order(leaves, stacked_filter))
  return _block_depths(leaves, stacked_filter)


def layer_depths(
  params: Any,
  *,
  granularity: Granularity = "block",
  order: Sequence[str] | None = None,
  stacked: str | Sequence[str] | None = None,
) -> Any:
  """Normalized depth in [0, 1] of every parameter, as a pytree matching ``params``.

  0 is the input side, 1 the output side.

  * ``granularity="tensor"``: every tensor its own index, in the order the
    model defined its parameters (OLOR's reference behaviour: Linen's insertion
    order, kernel before bias -- not ``jax.tree``'s sorted order). Pass the
    params as the model created them (e.g. ``model.init(...)``), not a tree
    rebuilt by ``jax.tree``, which sorts dict keys. (``nnx.state`` is always
    key-sorted: optimizers then order tensors by block, module, and
    kernel/scale before bias; see :class:`~dualopt_jax.LayerProfile`.)
  * ``granularity="block"``: leaves of one block share a depth. Blocks are
    numbered path components (``Block_3``, ``layers_3``, ``layers/3``,
    ``h/3``; numbers compared as numbers); embeddings come first, the head and
    final norm last; several numbered groups (``Conv_*`` then ``Dense_*``)
    follow their definition order. Stacked layers (``nn.scan``,
    ``nnx.vmap``: a subtree named ``layers``/``blocks``/``Scan*`` whose leaves
    share a leading axis, or one named by ``stacked``) get one depth per
    slice: an array of shape ``(L, 1, ..., 1)``.

  Args:
    params: Linen params (with or without the ``params`` key), NNX state
      (``Variable``-wrapped or pure) or nested dicts.
    granularity: ``"block"`` or ``"tensor"``.
    order: glob patterns over ``'a/b/c'`` paths, input to output; a leaf gets
      the position of the first pattern it matches. Overrides the rules.
    stacked: glob patterns naming subtrees whose leaves are layers stacked on
      the leading axis (overrides the automatic detection).

  Returns:
    A pytree with the structure of ``params`` of depths (floats, or arrays for
    stacked leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> params = {'layers_2': {'w': jnp.ones(2)}, 'layers_10': {'w': jnp.ones(2)},
    ...           'embed': {'w': jnp.ones(2)}}
    >>> dj.layer_depths(params)
    {'embed': {'w': 0.0}, 'layers_10': {'w': 1.0}, 'layers_2': {'w': 0.5}}

  References:
    Clark et al., ELECTRA (2020) and Bao et al., BEiT (2022) for the depth
    convention (embeddings 0, block i at i + 1, head last).
  """
  table = depth_table(params, granularity=granularity, order=order, stacked=stacked)
  return _paths.map_with_path(lambda path, _x: table[path], params)


def depth_profile(depths: Any, *, start: float, end: float, power: float = 1.0) -> Any:
  r"""Per-leaf multipliers from depths: :math:`e + (1 - d)^{p}\,(s - e)`.

  With ``start = κ_max`` and ``end = κ_min`` this is OLOR's per-layer
  rollback level: the input side gets ``start``, the output side ``end``;
  ``power=1`` is linear, ``2`` quadratic. ``1 - d`` is clamped at 0, so the
  last layer gets exactly ``end`` (the reference code's ``1e-8`` offset made it
  slightly negative).

  Args:
    depths: pytree of depths in [0, 1] (from :func:`layer_depths`).
    start: multiplier at depth 0.
    end: multiplier at depth 1.
    power: exponent of the profile.

  Returns:
    A pytree with the structure of ``depths``.

  Example:
    >>> import dualopt_jax as dj
    >>> dj.depth_profile({'a': 0.0, 'b': 0.5, 'c': 1.0}, start=1.0, end=0.0, power=2.0)
    {'a': 1.0, 'b': 0.25, 'c': 0.0}
  """

  traced = any(isinstance(v, jax.Array) for v in (start, end, power))  # inject_hyperparams

  def one(d: Any) -> Any:
    if traced:
      remaining = jnp.clip(1.0 - jnp.asarray(d, jnp.float32), 0.0, None)
      return end + remaining**power * (start - end)
    remaining = np.clip(1.0 - np.asarray(d, np.float64), 0.0, None)
    value = end + remaining**power * (start - end)
    return float(value) if np.ndim(value) == 0 else value.astype(np.float32)

  return jax.tree.map(one, depths)
