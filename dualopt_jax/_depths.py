"""Layer depths from what parameter paths mean, or from the model's forward pass.

Depth 0 is the input side (embeddings), 1 the output side (final norm, head).
A depth is a pure function of the tree's paths, its leaves' shapes and the
settings (``granularity``, ``order``, ``stacked``): never of the order of a
dict's keys (JAX rebuilds dicts sorted: checkpoints, ``jax.tree``, ``jit``,
``nnx.state``, ``optax.masked``), never of what ran earlier.

The rules (``granularity="block"``), applied at every level of the tree from
the root: embeddings (``embed*``, ``wte``, ``pos*``, ``patch*``, ``cls``,
``stem``, a module holding only an ``embedding``) and ``pre_*`` norms come
first and share one depth; numbered children (``layers/3``, ``h/"3"``,
``Block_3``, ``layers_10``, ``stage1_block0``; numbers compared as numbers)
follow in number order, one depth each, and a stacked subtree (``nn.scan``,
``nnx.vmap``) one depth per slice; the final norm (``norm``, ``ln_f``,
``final_*``, ``*_norm``, ``layernorm``), the ``pooler`` and the heads
(``head``, ``*_head``, ``classifier``, ``lm_head``, ``score``, ``fc``) come
last and share one depth. An unnumbered submodule is laid out by the same
rules, in place (T5's encoder final norm ends the encoder, not the model).
Several groups at one level are ordered only where the names say so:
convolutions before dense layers (``Conv_*`` then ``Dense_*``, ``conv1`` then
``linear1``), encoder before decoder; a numbered batch/group norm joins the
same-numbered convolution (``bn1`` with ``conv1``). Anything else raises an
error that names the groups and prints the line that fixes it.
"""

from __future__ import annotations

import hashlib
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualopt_jax import _masks, _paths

Granularity = Literal["block", "tensor"]
GRANULARITIES = ("block", "tensor")

Path = _paths.Path
Member = tuple[Path, int | None]  # a leaf, or one slice (axis 0) of a stacked leaf

# --- what names mean ----------------------------------------------------------------------------

_HEAD = re.compile(
  r"^(head|heads|lm_head|classifier|logits|score|scores|fc|out|output|readout)$|_head$|^head_|"
  r"classifier$|^classifier|^unembed"
)
_POOLER = re.compile(r"^pooler$")
_NORM = re.compile(r"norm|^(ln|bn|gn)(_|#|$)|(_|^)(ln|bn|gn)$")
_PRE = re.compile(r"^(pre|input)|_pre$|^(ln|norm)_pre")
_BATCH_NORM = re.compile(r"batchnorm|groupnorm|^(bn|gn)(_|#|$)")
_FINAL = re.compile(r"^final|_final$")
_EMBED = re.compile(
  r"embed|^(wte|wpe)$|^tok(_|$)|_tok$|^token|^patch|^pos$|^pos_|posemb|^position|^stem|"
  r"^(cls|cls_token|class_token)$"
)
_TOKEN_LEAVES = ("cls", "cls_token", "class_token")
_ONE_D = frozenset({"bias", "scale", "b", "g", "gamma", "beta"})
_ROLE_RANK = types.MappingProxyType({
  "embedding": 0, "kernel": 1, "weight": 1, "w": 1, "lora_a": 1, "scale": 1, "gamma": 1,
  "g": 1, "lora_b": 2, "bias": 3, "b": 3, "beta": 3,
})
_STACK_STEMS = frozenset(
  {"layers", "blocks", "h", "encoderblock", "decoderblock", "encoder", "decoder", "stack"}
)

# Body groups at one level are ordered only within one family whose ranks differ.
_LAYER_FAMILY = "layer type (conv < block < dense)"
_TOWER_FAMILY = "tower (encoder < middle < decoder)"


def _stem(base: str) -> str:
  return re.sub(r"[#_]+", "", base).lower()


def _family_rank(base: str) -> tuple[str, int] | None:
  stem = _stem(base)
  if stem.startswith("conv") or stem.endswith("conv"):
    return _LAYER_FAMILY, 1
  if "block" in stem or stem in {"layer", "layers", "stage", "stages", "h", "res", "cell"} or (
    stem.endswith("layer") and "norm" not in stem
  ):
    return _LAYER_FAMILY, 2
  if stem.startswith("dense") or stem.startswith("linear") or stem in {"fc", "mlp", "ffn"}:
    return _LAYER_FAMILY, 3
  if stem.endswith("encoder") or stem in {"backbone", "features", "trunk", "down", "downs"}:
    return _TOWER_FAMILY, 1
  if stem in {"neck", "bottleneck", "mid", "middle", "bridge", "connector"} or stem.endswith(
    "projector"
  ):
    return _TOWER_FAMILY, 2
  if stem.endswith("decoder") or stem in {"up", "ups"}:
    return _TOWER_FAMILY, 3
  return None


def _numbered(key: str | int) -> tuple[str, tuple[int, ...]] | None:
  """``'stage1_block0'`` -> ``('stage#_block#', (1, 0))``; ``3``/``'3'`` -> ``('', (3,))``."""
  if isinstance(key, int):
    return "", (key,)
  text = str(key)
  if text.isdigit():
    return "", (int(text),)
  numbers = tuple(int(n) for n in re.findall(r"\d+", text))
  if not numbers or not re.search(r"[A-Za-z]", text):
    return None
  return re.sub(r"\d+", "#", text), numbers


def _base(key: str | int) -> str:
  numbered = _numbered(key)
  return (numbered[0] if numbered else str(key)).lower()


# --- the tree -----------------------------------------------------------------------------------


@dataclass
class _Node:
  path: Path
  shape: tuple[int, ...] | None = None  # set for leaves
  children: dict[Any, _Node] = field(default_factory=dict)

  @property
  def is_leaf(self) -> bool:
    return self.shape is not None

  def leaves(self) -> list[_Node]:
    if self.is_leaf:
      return [self]
    return [leaf for child in self.children.values() for leaf in child.leaves()]


def _build(leaves: Sequence[tuple[Path, tuple[int, ...]]]) -> _Node:
  root = _Node(())
  for path, shape in leaves:
    node = root
    for i, key in enumerate(path):
      node = node.children.setdefault(key, _Node(path[: i + 1]))
    node.shape = tuple(shape)
  return root


def _sorted_children(node: _Node) -> list[tuple[Any, _Node]]:
  """Children in a canonical order (the order never carries meaning; this only fixes iteration)."""
  return sorted(node.children.items(), key=lambda kv: (str(type(kv[0])), str(kv[0])))


# --- stacked layers -----------------------------------------------------------------------------


def _bias_is_layer_axis(leaf: _Node, siblings: dict[Any, _Node]) -> bool:
  """A bias/scale with a leading axis that its sibling kernel's output dims do not explain."""
  assert leaf.shape is not None
  kernel = next(
    (s for k, s in siblings.items() if str(k) in ("kernel", "weight", "w") and s.is_leaf), None
  )
  if kernel is None or kernel.shape is None:
    return True
  n = len(leaf.shape)
  return kernel.shape[-n:] != leaf.shape


def _auto_stack_length(node: _Node) -> int | None:
  """The layer count if ``node`` looks like an ``nn.scan``/``nnx.vmap`` stack, else None."""
  if not node.path or node.is_leaf:
    return None
  if any(isinstance(k, int) or str(k).isdigit() for k in node.children):
    return None
  leaves = node.leaves()
  if any(len(leaf.shape or ()) == 0 for leaf in leaves):
    return None
  leading = {leaf.shape[0] for leaf in leaves if leaf.shape}
  if len(leading) != 1:
    return None
  one_d = [leaf for leaf in leaves if str(leaf.path[-1]) in _ONE_D]
  if any(len(leaf.shape or ()) <= 1 for leaf in one_d):
    return None
  parents = {id(leaf): _parent_children(node, leaf.path) for leaf in one_d}
  evidence = any(_bias_is_layer_axis(leaf, parents[id(leaf)]) for leaf in one_d)
  named = _stem(_base(node.path[-1])) in _STACK_STEMS or re.match(
    r"^(scan|vmap|stack)", _stem(_base(node.path[-1]))
  )
  if not evidence and named:
    evidence = all(len(leaf.shape or ()) >= 2 for leaf in leaves) and any(
      len(leaf.shape or ()) >= 3 for leaf in leaves
    )
  return leading.pop() if evidence else None


def _parent_children(root: _Node, path: Path) -> dict[Any, _Node]:
  node = root
  for key in path[len(root.path) : -1]:
    node = node.children[key]
  return node.children


def _find_stacks(
  root: _Node, stacked: tuple[_paths.Pattern, ...] | None, forward: dict[Path, Any] | None
) -> dict[Path, int]:
  stacks: dict[Path, int] = {}

  def visit(node: _Node) -> None:
    if node.is_leaf and stacked is None and forward is None:
      return
    length = _stack_length(node, stacked, forward)
    if length is not None:
      stacks[node.path] = length
      return
    for _, child in _sorted_children(node):
      visit(child)

  visit(root)
  return stacks


def _stack_length(
  node: _Node, stacked: tuple[_paths.Pattern, ...] | None, forward: dict[Path, Any] | None
) -> int | None:
  if stacked is not None:
    if not node.path or not any(p.matches(node.path) for p in stacked):
      return None
    leading = {leaf.shape[0] if leaf.shape else None for leaf in node.leaves()}
    if len(leading) != 1 or None in leading:
      raise ValueError(
        f"layer_depths: the leaves under the stacked subtree '{_paths.path_str(node.path)}' do "
        f"not share one leading layer axis (leading sizes {sorted(map(str, leading))}); "
        "stacked layers (nn.scan, nnx.vmap) share one leading axis."
      )
    return leading.pop()
  if forward is not None:
    positions = [forward.get(leaf.path) for leaf in node.leaves()]
    lengths = {len(p) if isinstance(p, tuple) else None for p in positions}
    return lengths.pop() if len(lengths) == 1 and None not in lengths else None
  return _auto_stack_length(node)


# --- layout: units in forward order -------------------------------------------------------------


class AmbiguousOrderError(ValueError):
  """The names do not say in which order some groups of parameters come."""

  def __init__(self, prefix: Path, groups: list[str], reason: str):
    self.prefix, self.groups, self.reason = prefix, groups, reason
    super().__init__(reason)


@dataclass
class _Item:
  """A child of a node, classified: kind in input/body/output; sub orders within a kind."""

  key: Any
  node: _Node
  kind: str
  sub: int = 0
  base: str = ""
  numbers: tuple[int, ...] = ()
  attach_to: tuple[str, tuple[int, ...]] | None = None


@dataclass
class _Context:
  granularity: str
  stacks: dict[Path, int]
  ordered: bool  # False: forward positions will order the units; only group here


def _classify(key: Any, node: _Node, stacks: dict[Path, int]) -> _Item:
  name = str(key)
  lower = name.lower()
  numbered = _numbered(key)
  base = numbered[0].lower() if numbered else lower
  if node.path in stacks:
    return _Item(key, node, "body", base=base, numbers=numbered[1] if numbered else ())
  if numbered and numbered[0] == "":
    return _Item(key, node, "body", base="", numbers=numbered[1])
  if node.is_leaf and lower in _TOKEN_LEAVES:
    return _Item(key, node, "input")
  if _HEAD.search(base) or (lower == "cls" and not node.is_leaf):
    return _Item(key, node, "output", sub=2)
  if _POOLER.search(base):
    return _Item(key, node, "output", sub=1)
  if _NORM.search(base):
    if _PRE.search(base):
      return _Item(key, node, "input", sub=1)
    if numbered:
      item = _Item(key, node, "body", base=base, numbers=numbered[1])
      if _BATCH_NORM.search(base):
        item.attach_to = ("conv", numbered[1])
      return item
    return _Item(key, node, "output", sub=0)
  if _FINAL.search(base):
    return _Item(key, node, "output", sub=0)
  if _EMBED.search(base) or _only_embeddings(node):
    return _Item(key, node, "input", sub=0)
  if node.is_leaf:
    if numbered:
      return _Item(key, node, "leaf", base=base, numbers=numbered[1])
    return _Item(key, node, "self", sub=_ROLE_RANK.get(lower, -1))
  return _Item(key, node, "body", base=base, numbers=numbered[1] if numbered else ())


def _only_embeddings(node: _Node) -> bool:
  return not node.is_leaf and all(str(leaf.path[-1]) == "embedding" for leaf in node.leaves())


def _label(prefix: Path, item: _Item) -> str:
  return _paths.path_str((*prefix, item.key))


def _layout(node: _Node, ctx: _Context) -> list[list[Member]]:
  """The units under ``node`` (each a list of members sharing one depth), input to output."""
  if node.is_leaf and node.path not in ctx.stacks:
    return [[(node.path, None)]]
  if node.path in ctx.stacks:
    return _stack_units(node, ctx)
  return _layout_children(node, ctx)


def _stack_units(node: _Node, ctx: _Context) -> list[list[Member]]:
  length = ctx.stacks[node.path]
  if ctx.granularity == "block":
    paths = [leaf.path for leaf in node.leaves()]
    return [[(p, j) for p in paths] for j in range(length)]
  inner = _Context(ctx.granularity, {}, ctx.ordered)
  per_layer = [m for unit in _layout_children_or_leaf(node, inner) for m in unit]
  return [[(p, j)] for j in range(length) for p, _ in per_layer]


def _layout_children_or_leaf(node: _Node, ctx: _Context) -> list[list[Member]]:
  return [[(node.path, None)]] if node.is_leaf else _layout_children(node, ctx)


def _layout_children(node: _Node, ctx: _Context) -> list[list[Member]]:
  items = [_classify(k, child, ctx.stacks) for k, child in _sorted_children(node)]
  inputs = [i for i in items if i.kind == "input"]
  outputs = [i for i in items if i.kind == "output"]
  body = [i for i in items if i.kind in ("body", "self", "leaf")]
  block = ctx.granularity == "block"
  units: list[list[Member]] = []
  if inputs:
    units += _class_units(node, inputs, ctx, merge=block)
  units += _body_units(node, body, ctx)
  if outputs:
    units += _class_units(node, outputs, ctx, merge=block)
  return units


def _members(item: _Item, ctx: _Context) -> list[list[Member]]:
  return _layout(item.node, ctx)


def _block_members(item: _Item, ctx: _Context) -> list[list[Member]]:
  """A numbered block: one unit (``granularity="block"``), or its tensors in order."""
  if ctx.granularity == "block" and item.node.path not in ctx.stacks:
    return [[(leaf.path, None) for leaf in item.node.leaves()]]
  return _members(item, ctx)


def _class_units(
  node: _Node, items: list[_Item], ctx: _Context, *, merge: bool
) -> list[list[Member]]:
  if merge:  # one unit: no need to order what is inside
    return [[(leaf.path, None) for item in items for leaf in item.node.leaves()]]
  ordered = _by_sub_rank(node, items, ctx, what="these")
  return [unit for item in ordered for unit in _members(item, ctx)]


def _by_sub_rank(node: _Node, items: list[_Item], ctx: _Context, *, what: str) -> list[_Item]:
  if not ctx.ordered or len(items) <= 1:
    return items
  subs = [i.sub for i in items]
  if -1 in subs or len(set(subs)) != len(subs):
    raise AmbiguousOrderError(
      node.path,
      [_label(node.path, i) for i in items],
      f"the names do not say in which order {what} parameters are used",
    )
  return sorted(items, key=lambda i: i.sub)


def _body_units(node: _Node, items: list[_Item], ctx: _Context) -> list[list[Member]]:
  if not items:
    return []
  selves = [i for i in items if i.kind == "self"]
  numbered_leaves = [i for i in items if i.kind == "leaf"]
  modules = [i for i in items if i.kind == "body"]
  groups: list[tuple[str, list[_Item]]] = []
  by_base: dict[str, list[_Item]] = {}
  attached: list[_Item] = []
  for item in modules:
    if item.attach_to is not None:
      attached.append(item)
    elif item.numbers:
      by_base.setdefault(item.base, []).append(item)
    else:
      groups.append((item.base or str(item.key), [item]))
  partner = _attach(node, attached, by_base, ctx)
  groups += sorted(by_base.items())
  if numbered_leaves:
    groups.append(("<numbered tensors>", numbered_leaves))
  if selves:
    groups.append(("<own tensors>", selves))
  ordered_groups = _order_groups(node, groups, ctx)
  units: list[list[Member]] = []
  for base, group in ordered_groups:
    if base == "<own tensors>":
      units += _self_units(node, group, ctx)
    elif base == "<numbered tensors>":
      units += _numbered_leaf_units(node, group, ctx)
    else:
      for item in sorted(group, key=lambda i: i.numbers):
        item_units = _block_members(item, ctx) if item.numbers else _members(item, ctx)
        for norm in partner.get(id(item), []):
          norm_units = _members(norm, ctx)
          if ctx.granularity == "block":
            item_units = [[m for u in item_units + norm_units for m in u]]
          else:
            item_units = item_units + norm_units
        units += item_units
  return units


def _attach(
  node: _Node, attached: list[_Item], by_base: dict[str, list[_Item]], ctx: _Context
) -> dict[int, list[_Item]]:
  """A numbered batch/group norm joins the convolution with the same number."""
  partner: dict[int, list[_Item]] = {}
  convs = [
    item for base, members in by_base.items() if _family_rank(base) == (_LAYER_FAMILY, 1)
    for item in members
  ]
  for norm in attached:
    match = [c for c in convs if c.numbers == norm.numbers]
    if len(match) != 1:
      if not ctx.ordered:
        by_base.setdefault(norm.base, []).append(norm)
        continue
      raise AmbiguousOrderError(
        node.path,
        [_label(node.path, norm)],
        f"the norm '{_label(node.path, norm)}' has no convolution with the same number to follow",
      )
    partner.setdefault(id(match[0]), []).append(norm)
  return partner


def _order_groups(
  node: _Node, groups: list[tuple[str, list[_Item]]], ctx: _Context
) -> list[tuple[str, list[_Item]]]:
  if not ctx.ordered or len(groups) <= 1:
    return groups
  ranks = [None if base.startswith("<") else _family_rank(base) for base, _ in groups]
  known = [r for r in ranks if r is not None]
  if len(known) == len(ranks) and len({f for f, _ in known}) == 1 and len(
    {n for _, n in known}
  ) == len(known):
    return [g for _, g in sorted(zip(known, groups, strict=True), key=lambda rg: rg[0][1])]
  labels = []
  for base, members in groups:
    if len(members) == 1 or base.startswith("<"):
      labels += [_label(node.path, m) for m in members]
    else:
      original = re.sub(r"\d+", "*", str(members[0].key))
      labels.append(_paths.path_str((*node.path, original)))
  raise AmbiguousOrderError(
    node.path, labels, "the names do not say in which order these groups come in the forward pass"
  )


def _self_units(node: _Node, items: list[_Item], ctx: _Context) -> list[list[Member]]:
  if ctx.granularity == "block":
    return [[(i.node.path, None) for i in items]]
  return [[(i.node.path, None)] for i in _by_sub_rank(node, items, ctx, what="these")]


def _numbered_leaf_units(node: _Node, items: list[_Item], ctx: _Context) -> list[list[Member]]:
  by_number: dict[tuple[int, ...], list[_Item]] = {}
  for item in items:
    by_number.setdefault(item.numbers, []).append(item)
  units: list[list[Member]] = []
  for _, members in sorted(by_number.items()):
    for item in members:
      item.sub = _ROLE_RANK.get(re.sub(r"\d+", "", str(item.key)).lower(), -1)
    units += _self_units(node, members, ctx)
  return units


# --- order specs --------------------------------------------------------------------------------


def _forward_positions(order: Mapping[str, Any]) -> dict[Path, Any]:
  """Validates a ``forward_order`` result: path string -> int, or tuple of ints per slice."""
  out: dict[Path, Any] = {}
  for key, value in order.items():
    if not isinstance(key, str):
      raise ValueError(
        f"order: a forward order maps path strings to positions; got the key {key!r}."
      )
    if isinstance(value, (tuple, list)):
      if not value or not all(_is_int(v) for v in value):
        raise ValueError(
          f"order: the position of '{key}' must be an int or a tuple of ints (one per stacked "
          f"layer), got {value!r}."
        )
      value = tuple(int(v) for v in value)
    elif _is_int(value):
      value = int(value)
    else:
      raise ValueError(
        f"order: the position of '{key}' must be an int or a tuple of ints, got {value!r}."
      )
    path = () if key in ("", _paths.path_str(())) else tuple(key.split("/"))
    out[_paths.canonical(path)] = value
  return out


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_forward_order(order: Any) -> bool:
  return isinstance(order, Mapping)


def order_key(order: Any) -> tuple | None:
  """A hashable, canonical form of an ``order`` setting (patterns or forward positions)."""
  if order is None:
    return None
  if is_forward_order(order):
    return ("forward", tuple(sorted((str(k), _hashable(v)) for k, v in order.items())))
  return ("patterns", tuple(p.text for p in _paths.patterns(order, name="order")))


def _hashable(v: Any) -> Any:
  return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else int(v)


def settings_tag(granularity: str, order: Any, stacked: Any) -> str:
  """A short, stable name for the depth settings (keys the depths stored in optimizer states)."""
  extra = (order_key(order), None if stacked is None else _stacked_key(stacked))
  if extra == (None, None):
    return granularity
  digest = hashlib.sha1(repr(extra).encode()).hexdigest()[:8]
  return f"{granularity}_{digest}"


def _stacked_key(stacked: Any) -> tuple[str, ...]:
  return tuple(p.text for p in _paths.patterns(stacked, name="stacked"))


# --- public ---------------------------------------------------------------------------------------


def depth_table(
  params: Any,
  *,
  granularity: Granularity = "block",
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
) -> dict[Path, Any]:
  """Depth per normalized path of the present (non-``MaskedNode``) leaves of ``params``.

  Floats for plain leaves, float32 arrays of shape ``(L, 1, ..., 1)`` for
  stacked ones. See :func:`layer_depths`.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  present = _paths.present_leaves(params)
  leaves = [(p, tuple(np.shape(x))) for p, x in present]
  if not leaves:
    return {}
  stacked_pats = None if stacked is None else _paths.patterns(stacked, name="stacked")
  if stacked_pats is not None:
    _paths.check_patterns_match(stacked_pats, params, name="stacked")
  if order is not None and is_forward_order(order):
    units = _forward_units(leaves, _forward_positions(order), granularity, stacked_pats)
  else:
    root = _build(leaves)
    stacks = _find_stacks(root, stacked_pats, None)
    if order is not None:
      units = _pattern_units(params, leaves, _paths.patterns(order, name="order"), granularity,
                             stacks)
    else:
      units = _ordered_units(root, _Context(granularity, stacks, True))
  return _depths_from_units(units, dict(leaves))


def stacked_leaves(params: Any, stacked: str | Sequence[str] | None = None) -> dict[Path, int]:
  """The leaves of ``params`` that stack layers on axis 0, with their layer counts.

  ``stacked=None`` detects stacks automatically (as ``layer_depths`` does);
  glob patterns name the stacked subtrees.
  """
  leaves = [(p, tuple(np.shape(x))) for p, x in _paths.present_leaves(params)]
  if not leaves:
    return {}
  pats = None if stacked is None else _paths.patterns(stacked, name="stacked")
  root = _build(leaves)
  out: dict[Path, int] = {}
  for prefix, length in _find_stacks(root, pats, None).items():
    for leaf in _subtree(root, prefix).leaves():
      out[leaf.path] = length
  return out


def _ordered_units(root: _Node, ctx: _Context) -> list[list[Member]]:
  try:
    return _layout(root, ctx)
  except AmbiguousOrderError as e:
    raise ValueError(_ambiguity_message(root, e, ctx)) from None


def _pattern_units(
  params: Any,
  leaves: list[tuple[Path, tuple[int, ...]]],
  pats: tuple[_paths.Pattern, ...],
  granularity: str,
  stacks: dict[Path, int],
) -> list[list[Member]]:
  _paths.check_patterns_match(pats, params, name="order")
  groups: list[list[tuple[Path, tuple[int, ...]]]] = [[] for _ in pats]
  for path, shape in leaves:
    hits = [i for i, p in enumerate(pats) if p.matches(path)]
    if not hits:
      raise ValueError(
        f"layer_depths: parameter '{_paths.path_str(path)}' matches none of the order patterns "
        f"{[p.text for p in pats]}; add a pattern for it (patterns are anchored at the root)."
      )
    if len(hits) > 1:
      raise ValueError(
        f"layer_depths: parameter '{_paths.path_str(path)}' matches more than one order pattern "
        f"({', '.join(repr(pats[i].text) for i in hits)}); each parameter belongs to one group."
      )
    groups[hits[0]].append((path, shape))
  units: list[list[Member]] = []
  for pattern, members in zip(pats, groups, strict=True):
    root = _build(members)
    group_stacks = {p: n for p, n in stacks.items() if any(m[0][: len(p)] == p for m in members)}
    try:
      units += _layout(root, _Context(granularity, group_stacks, True))
    except AmbiguousOrderError as e:
      raise ValueError(
        f"layer_depths: inside the order group {pattern.text!r}, {e.reason}: "
        f"{', '.join(e.groups)}. Split the group into one pattern per part (input to output), "
        "or give the forward order: order=dj.forward_order(...)."
      ) from None
  return units


def _forward_units(
  leaves: list[tuple[Path, tuple[int, ...]]],
  positions: dict[Path, Any],
  granularity: str,
  stacked: tuple[_paths.Pattern, ...] | None,
) -> list[list[Member]]:
  missing = [p for p, _ in leaves if _paths.canonical(tuple(str(k) for k in p)) not in positions]
  if missing:
    raise ValueError(
      "order: the forward order has no position for "
      + ", ".join(f"'{_paths.path_str(p)}'" for p in missing[:6])
      + (", ..." if len(missing) > 6 else "")
      + "; compute it with dj.forward_order for this model's parameters."
    )
  at = {p: positions[_paths.canonical(tuple(str(k) for k in p))] for p, _ in leaves}
  for path, shape in leaves:
    pos = at[path]
    if isinstance(pos, tuple) and (not shape or shape[0] != len(pos)):
      raise ValueError(
        f"order: '{_paths.path_str(path)}' has {len(pos)} stacked positions but shape {shape}; "
        "stacked positions need one per slice along axis 0."
      )
  root = _build(leaves)
  stacks = _find_stacks(root, stacked, at)
  for prefix in stacks:
    for leaf in _subtree(root, prefix).leaves():
      if not isinstance(at[leaf.path], tuple):
        raise ValueError(
          f"order: '{_paths.path_str(leaf.path)}' is under the stacked subtree "
          f"'{_paths.path_str(prefix)}' but the forward pass reads it whole, not slice by slice."
        )
  if granularity == "tensor":
    members = [
      (path, j) for path, _ in leaves
      for j in (range(len(at[path])) if isinstance(at[path], tuple) else [None])
    ]
    units = [[m] for m in members]
  else:
    units = _layout(root, _Context(granularity, stacks, False))

  def position(member: Member) -> int:
    pos = at[member[0]]
    if isinstance(pos, tuple):
      return pos[member[1] if member[1] is not None else 0]
    return pos

  return sorted(units, key=lambda unit: min(position(m) for m in unit))


def _subtree(root: _Node, prefix: Path) -> _Node:
  node = root
  for key in prefix:
    node = node.children[key]
  return node


def _depths_from_units(
  units: list[list[Member]], shapes: dict[Path, tuple[int, ...]]
) -> dict[Path, Any]:
  denominator = max(len(units) - 1, 1)
  ranks: dict[Path, dict[int | None, int]] = {}
  for rank, unit in enumerate(units):
    for path, j in unit:
      ranks.setdefault(path, {})[j] = rank
  out: dict[Path, Any] = {}
  for path, shape in shapes.items():
    slot = ranks[path]
    if None in slot:
      out[path] = slot[None] / denominator
    else:
      values = np.asarray([slot[j] for j in range(len(slot))], np.float32) / denominator
      out[path] = values.reshape((len(slot),) + (1,) * (len(shape) - 1))
  return out


def _ambiguity_message(root: _Node, error: AmbiguousOrderError, ctx: _Context) -> str:
  where = f" under '{_paths.path_str(error.prefix)}'" if error.prefix else ""
  suggestion = _suggested_order(root, error.prefix)
  return (
    f"layer_depths(granularity={ctx.granularity!r}): {error.reason}{where}: "
    f"{', '.join(repr(g) for g in error.groups)}. Depths are never guessed from key order. "
    "Give the forward order, traced from the model (no computation):\n"
    "    order=dj.forward_order(model.apply, variables, *example_inputs)   # Linen\n"
    "    order=dj.forward_order(nnx_module, *example_inputs)                # NNX\n"
    f"or list the groups yourself, input to output:\n    order={suggestion!r}"
  )


def _suggested_order(root: _Node, prefix: Path) -> list[str]:
  """Anchored patterns covering every leaf, with the ambiguous level expanded."""
  out: list[str] = []

  def visit(node: _Node) -> None:
    for child in _best_effort_order(node):
      on_chain = len(child.path) <= len(prefix) and child.path == prefix[: len(child.path)]
      if on_chain and child.path != prefix and not child.is_leaf:
        visit(child)
      elif child.path == prefix and not child.is_leaf:
        out.extend(_paths.path_str(c.path) for c in _best_effort_order(child))
      else:
        out.append(_paths.path_str(child.path))

  if prefix == ():
    out = [_paths.path_str(c.path) for c in _best_effort_order(root)]
  else:
    visit(root)
  return out


def _best_effort_order(node: _Node) -> list[_Node]:
  """``node``'s children: inputs, then body groups (rule order where known), then outputs."""
  items = [_classify(k, child, {}) for k, child in _sorted_children(node)]
  kinds = {"input": 0, "body": 1, "self": 1, "leaf": 1, "output": 2}

  def key(item: _Item) -> tuple:
    rank = _family_rank(item.base) if item.kind == "body" else None
    return (kinds[item.kind], item.sub, rank[1] if rank else 9, item.numbers, str(item.key))

  return [item.node for item in sorted(items, key=key)]


def layer_depths(
  params: Any,
  *,
  granularity: Granularity = "block",
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
  head: Any = None,
) -> Any:
  """Normalized depth in [0, 1] of every parameter, as a pytree matching ``params``.

  0 is the input side, 1 the output side. The depths are a pure function of
  the tree's paths, its leaves' shapes and these settings: the same for the
  tree as the model created it, a restored checkpoint (keys sorted), an
  ``nnx.state``, the tree ``jax.jit``/``jax.eval_shape``/``optax.masked``
  hand to ``init``, or a tree of ``jax.ShapeDtypeStruct`` s.

  * ``granularity="block"``: leaves of one block share a depth (the rules
    are in this module's docstring: embeddings first, numbered blocks in
    number order, final norm and heads last, one depth per slice of a stacked
    subtree). A tree with no layer structure (``{'w', 'b'}``, one
    ``nn.Dense``, an ``nnx.LoRA``, a bare array) is one block: depth 0.
  * ``granularity="tensor"``: every tensor (every slice of a stacked one) its
    own index, OLOR's reference behaviour; within a module kernel/scale come
    before bias. Where the names do not fix the order of the tensors (most
    transformer blocks), pass the forward order.

  When names cannot tell the order (groups such as ``vision`` and ``text``,
  or ``LayerNorm_0`` beside ``Dense_0``), this raises an error that names the
  groups and prints the line to add; it never falls back to alphabetical or
  insertion order.

  Args:
    params: Linen params (with or without the ``params`` key), NNX state
      (``Variable``-wrapped or pure), nested dicts, ``ShapeDtypeStruct`` s.
    granularity: ``"block"`` or ``"tensor"``.
    order: the forward order of the model, from
      :func:`~dualopt_jax.forward_order` (a mapping path -> position), or
      glob patterns (anchored at the root), input to output: each pattern is
      a group laid out in place by the rules (``order=['stem', 'encoder',
      'decoder', 'head']``). Every parameter must belong to exactly one group.
    stacked: glob patterns naming subtrees whose leaves are layers stacked on
      the leading axis (instead of the automatic detection: a subtree whose
      leaves share a leading axis and whose biases/scales carry it).
    head: the newly initialised parameters (glob patterns, pytree of bools
      or callable), left out: they get ``None`` and do not count.

  Returns:
    A pytree with the structure of ``params`` of depths (floats, or float32
    arrays of shape ``(L, 1, ..., 1)`` for stacked leaves; ``None`` for the
    ``head``).

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
  body = params if head is None else without(params, head, name="head")
  table = depth_table(body, granularity=granularity, order=order, stacked=stacked)
  return _paths.map_with_path(lambda path, _x: table.get(path), params)


def without(params: Any, selected: Any, *, name: str) -> Any:
  """``params`` with the leaves ``selected`` (a mask spec) replaced by ``optax.MaskedNode``."""
  flags = _masks.mask_callable(selected, name=name)(params)
  return jax.tree.map(
    lambda x, s: optax.MaskedNode() if s else x, params, flags, is_leaf=_paths.is_masked_node
  )


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
  traced = any(isinstance(v, jax.Array) for v in (start, end, power))

  def one(d: Any) -> Any:
    if traced:
      return profile_value(jnp.asarray(d, jnp.float32), start, end, power)
    remaining = np.clip(1.0 - np.asarray(d, np.float64), 0.0, None)
    value = end + remaining**power * (start - end)
    return float(value) if np.ndim(value) == 0 else value.astype(np.float32)

  return jax.tree.map(one, depths)


def profile_value(depth: Any, start: Any, end: Any, power: Any) -> Any:
  """``end + clip(1 - depth, 0)^power * (start - end)`` in float32 (traceable)."""
  remaining = jnp.clip(1.0 - jnp.asarray(depth, jnp.float32), 0.0, None)
  return end + remaining**power * (start - end)
