"""Per-layer strengths as data: ``LayerProfile`` and the per-leaf state that carries it.

A ``layer_scale`` (the per-leaf multiplier of a rollback, decay, radius, ...)
is resolved once, at ``init``, into float32 operands stored in the optimizer
state -- heights ``1 - depth`` for a :class:`LayerProfile`, the values
themselves for a pytree or a ``params -> pytree`` callable -- one per distinct
value, with the paths that use it (:class:`SharedValue`). ``update`` combines them with the
transformation's *current* numbers (``start``, ``end``, ``power``, ``flip``),
so ``optax.inject_hyperparams`` of ``power`` takes effect and a state restored
into a transformation with other numbers follows the new ones. Operands, not
Python constants, let XLA share one fused kernel across all leaves of a shape;
one operand per distinct value (per block, not per leaf) keeps the step's
argument count and compile time close to the base optimizer's.

The stored operands sit under a key naming the settings that produced them
(``'block'``, ``'tensor'``, ``'block_<hash of order/stacked>'``,
``'scale_<hash of the values>'``), so a state restored into a transformation
whose depth settings differ fails to restore (a structure mismatch naming the
key) instead of training with the old depths; ``update`` checks the key too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from dualopt_jax import _depths, _hyperparams, _lora, _paths, _per_leaf


@dataclass(frozen=True)
class LayerProfile:
  """Per-layer multipliers ``end + (1 - depth)^power * (start - end)``.

  Usable wherever a ``layer_scale`` is accepted. The depths come from
  :func:`~dualopt_jax.layer_depths` (``granularity``, ``order``, ``stacked``)
  of the tree given to ``init`` -- a pure function of its paths and shapes --
  and are kept in the optimizer state; ``start``, ``end``, ``power`` and
  ``flip`` are read at every update.

  Attributes:
    start: multiplier at depth 0 (input side).
    end: multiplier at depth 1 (output side).
    power: exponent of the profile (1 linear, 2 quadratic).
    granularity: ``"block"`` or ``"tensor"`` (see ``layer_depths``).
    order: the model's forward order (from :func:`~dualopt_jax.forward_order`)
      or glob patterns, input to output (see ``layer_depths``).
    stacked: glob patterns naming stacked-layer subtrees.
    flip: measure depth from the output side (``d -> 1 - d``), so ``start``
      applies to the deepest layer.
    lora: glob patterns selecting LoRA ``B`` factors: each factor (and its
      ``A`` factor) takes the depth of the base weight it adapts, computed
      with the adapters left out of the tree (see ``dualopt``'s ``lora``).
    full: the tree the depths come from, as ``((path, shape), ...)`` (from
      ``dualopt``'s ``full_params``); ``None``: the tree given to ``init``.
      Every leaf given to ``init`` must be in it.

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> profile = dj.LayerProfile(start=1.0, end=0.0, power=2.0)
    >>> params = {'embed': {'w': jnp.ones(2)}, 'layers_0': {'w': jnp.ones(2)},
    ...           'head': {'w': jnp.ones(2)}}
    >>> profile.values(params)
    {'embed': {'w': 1.0}, 'head': {'w': 0.0}, 'layers_0': {'w': 0.25}}
  """

  start: Any = 1.0
  end: Any = 0.0
  power: Any = 1.0
  granularity: _depths.Granularity = "block"
  order: Any = None
  stacked: Any = None
  flip: bool = False
  lora: tuple[str, ...] | None = None
  full: tuple[tuple[tuple[str | int, ...], tuple[int, ...]], ...] | None = None

  def __post_init__(self) -> None:
    for label in ("start", "end", "power"):
      _hyperparams.check_at_least(getattr(self, label), 0.0, name=f"LayerProfile: {label}")
    if self.granularity not in _depths.GRANULARITIES:
      raise ValueError(
        f"granularity must be one of {_depths.GRANULARITIES}, got {self.granularity!r}."
      )
    if isinstance(self.order, list):
      object.__setattr__(self, "order", tuple(self.order))
    if isinstance(self.stacked, list):
      object.__setattr__(self, "stacked", tuple(self.stacked))
    if self.order is not None and not isinstance(self.order, Mapping):
      _paths.patterns(self.order, name="order")
    if self.stacked is not None:
      _paths.patterns(self.stacked, name="stacked")
    if self.lora is not None:
      texts = tuple(p.text for p in _paths.patterns(self.lora, name="lora"))
      object.__setattr__(self, "lora", texts)
    if self.full is not None:
      object.__setattr__(self, "full", tuple(self.full))

  @property
  def tag(self) -> str:
    """The name of the depth settings (the key of the depths in the optimizer state)."""
    tag = _depths.settings_tag(self.granularity, self.order, self.stacked)
    if self.lora is None and self.full is None:
      return tag
    digest = hashlib.sha1(repr((self.lora, self.full)).encode()).hexdigest()[:8]
    return f"{tag}_lora_{digest}" if self.lora is not None else f"{tag}_full_{digest}"

  def depths(self, tree: Any) -> dict[_paths.Path, Any]:
    """Depth per path of ``tree``'s present leaves (see ``layer_depths``)."""
    if self.lora is None and self.full is None:
      return _depths.depth_table(
        tree, granularity=self.granularity, order=self.order, stacked=self.stacked
      )
    return self._depths_from_base_weights(tree)

  def _depths_from_base_weights(self, tree: Any) -> dict[_paths.Path, Any]:
    """Depths from ``full`` (or ``tree``) without the adapters; an adapter gets its base's."""
    source = _lora.nested(self.full) if self.full is not None else tree
    adapters: set[_paths.Path] = set()
    if self.lora is not None:
      pats = _paths.patterns(self.lora, name="lora")
      bs = _lora.b_paths(pats, source, name="lora")
      adapters = set(bs) | {_lora.a_path(b) for b in bs}
    weights = {p: s for p, s in _lora.shapes(source) if p not in adapters}
    if not weights:
      raise ValueError(
        "lora: the tree the depths come from holds only adapters; pass the full-weight tree "
        "(full_params=nnx.state(model, nnx.Param)) so that each adapter takes its base "
        "weight's depth."
      )
    table = _depths.depth_table(
      _lora.nested(tuple(weights.items())), granularity=self.granularity, order=self.order,
      stacked=self.stacked,
    )
    out: dict[_paths.Path, Any] = {}
    for path, _ in _paths.present_leaves(tree):
      key_ = _paths.canonical(path)
      if key_ in adapters:
        out[path] = table[_lora.base_weight(key_, weights, name="lora")]
      elif key_ in table:
        out[path] = table[key_]
      else:
        raise ValueError(
          f"full_params has no parameter '{_paths.path_str(path)}', which the optimizer "
          "updates; full_params must hold every parameter the optimizer sees (with the "
          "frozen base weights)."
        )
    return out

  def multiplier(self, depth: Any) -> Any:
    """The profile's value at ``depth`` in [0, 1] (float32; traceable)."""
    return self.at_height(1.0 - jnp.asarray(depth, jnp.float32))

  def at_height(self, height: Any) -> Any:
    """The profile's value at ``height = 1 - depth`` (what optimizer states store).

    Python-number settings fold at trace time: the default (``start=1,
    end=0, power=1``, no flip) is the height itself, no op in the update.
    """
    h = jnp.asarray(height, jnp.float32)
    remaining = 1.0 - h if self.flip else h  # in [0, 1]: depths are ours
    numbers = (self.start, self.end, self.power)
    if not all(isinstance(v, (int, float)) for v in numbers):
      return self.end + remaining**self.power * (self.start - self.end)
    start, end, power = (float(v) for v in numbers)
    shaped = remaining if power == 1.0 else remaining**power
    scaled = shaped if start - end == 1.0 else shaped * (start - end)
    return scaled if end == 0.0 else scaled + end

  def values(self, tree: Any) -> Any:
    """The multipliers for ``tree``'s leaves, as Python floats / NumPy arrays."""
    table = self.depths(tree)

    def value(path: _paths.Path, _x: Any) -> Any:
      out = np.asarray(self.multiplier(table[path]), np.float64)
      return float(out) if out.ndim == 0 else out.astype(np.float32)

    return _paths.map_with_path(value, tree)


class SharedValue(NamedTuple):
  """One per-leaf operand and the leaves that use it.

  ``paths`` is ``{path: None}``: structure only, no buffer. Leaves with the
  same value (all leaves of a block, under ``granularity="block"``) share one
  operand, so a step carries one scalar per block instead of one per leaf.
  """

  value: jax.Array
  paths: dict[str, None]


class LayerScaleState(NamedTuple):
  """A ``layer_scale`` as the optimizer state holds it.

  ``per_leaf`` maps one settings key to the per-leaf data of every leaf the
  transformation covers (paths ``'a/b/0/c'``, a leading ``params`` collection
  dropped): ``{group: SharedValue}``, one float32 operand per distinct value
  with the paths that use it -- for a :class:`LayerProfile` the leaves'
  height ``1 - depth`` (keys ``'block'``/``'tensor'``/``'block_…'``; the
  default profile multiplies by it directly, so the update needs no op for
  it), or the scales themselves (``'scale…'``) -- or ``{path: None}`` marking
  coverage (``'constant'``); it is empty for a scalar scale on an anchored
  transformation. ``numbers``
  holds ``(start, end, power, flip)`` of the last ``init``/``update`` (what
  :func:`~dualopt_jax.describe` shows; a scalar scale ``s`` is the constant
  profile ``start = end = s``), one array so the step carries one buffer.
  """

  per_leaf: dict[str, Any]
  numbers: jax.Array

  @property
  def start(self) -> jax.Array:
    return self.numbers[0]

  @property
  def end(self) -> jax.Array:
    return self.numbers[1]

  @property
  def power(self) -> jax.Array:
    return self.numbers[2]

  @property
  def flip(self) -> jax.Array:
    return self.numbers[3] > 0.5


def _numbers(spec: Any) -> tuple[Any, Any, Any, Any]:
  if isinstance(spec, LayerProfile):
    return spec.start, spec.end, spec.power, spec.flip
  if _hyperparams.is_scalar_like(spec):
    return spec, spec, 1.0, False
  return 1.0, 0.0, 1.0, False


def _numbers_state(spec: Any, per_leaf: dict[str, Any]) -> LayerScaleState:
  numbers = jnp.stack([jnp.asarray(v, jnp.float32) for v in _numbers(spec)])
  return LayerScaleState(per_leaf, numbers + _paths.operand(np.zeros(4)))


def is_per_leaf(spec: Any) -> bool:
  """Whether ``spec`` gives leaves different values (a profile, a pytree, a callable)."""
  return isinstance(spec, LayerProfile) or not _hyperparams.is_scalar_like(spec)


def values_tag(values: Any) -> str:
  """``'scale_<hash>'`` of a pytree of per-leaf values (paths, shapes, numbers where known)."""
  digest = hashlib.sha1()
  for path, value in _paths.present_leaves(values):
    digest.update(repr((_paths.path_str(path), np.shape(value))).encode())
    concrete = None if isinstance(value, jax.core.Tracer) else np.asarray(value, np.float32)
    if concrete is not None:
      digest.update(concrete.tobytes())
  return f"scale_{digest.hexdigest()[:8]}"


def spec_tag(spec: Any) -> str:
  """The key of ``spec``'s per-leaf data in the state, from the spec alone (never the tree).

  A profile's depth settings, or a hash of a pytree's values; a ``params ->
  pytree`` callable is ``'scale'`` (its values are known only at ``init``).
  """
  if isinstance(spec, LayerProfile):
    return spec.tag
  if not is_per_leaf(spec):
    return "constant"
  if callable(spec):
    return "scale"
  return values_tag(spec)


def key(path: _paths.Path) -> str:
  """A leaf's key in ``LayerScaleState.per_leaf``: its canonical path as ``'a/b/0/c'``."""
  return _paths.path_str(_paths.canonical(path))


def init_layer_scale(
  spec: Any, params: Any, *, name: str, mark_coverage: bool = False
) -> LayerScaleState:
  """The state of ``spec`` for ``params`` (its present leaves; MaskedNodes are not covered).

  A scalar ``spec`` stores nothing per leaf, unless ``mark_coverage``: then
  ``{path: None}`` for the covered leaves (for a transformation with no
  anchor, whose state would not otherwise say which leaves an
  ``optax.masked`` left it); ``None`` is no array, so the step carries no
  extra buffer.
  """
  if not is_per_leaf(spec) and not mark_coverage:
    return _numbers_state(spec, {})
  tag = spec_tag(spec)
  present = _paths.present_leaves(params)
  if not present:
    # No leaves (e.g. optax.tree_map_params' placeholder): one leaf, so that the per-leaf data
    # is never mistaken for a params-shaped subtree of the state.
    return _numbers_state(spec, {tag: jnp.zeros((), jnp.float32)})
  if isinstance(spec, LayerProfile):
    table = spec.depths(params)
    values = _shared({key(p): 1.0 - np.asarray(table[p], np.float32) for p, _ in present})
  elif not is_per_leaf(spec):
    values = dict.fromkeys((key(p) for p, _ in present), None)  # structure only: no buffers
  else:
    resolved = dict(_paths.present_leaves(_per_leaf.resolve(spec, params, name=name)))
    values = _shared({key(p): resolved[p] for p, _ in present})
  return _numbers_state(spec, {tag: values})


def _shared(by_path: dict[str, Any]) -> dict[str, SharedValue]:
  """``{group: SharedValue}``: one operand per distinct known value (shape and float32 bits).

  A value not known at ``init`` (traced) gets an operand of its own. Groups
  are numbered in the order of their first path, so the keys follow from
  the paths alone.
  """
  groups: dict[Any, tuple[Any, dict[str, None]]] = {}
  for path in sorted(by_path):
    value = by_path[path]
    global_array = isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and (
      not value.is_fully_addressable
    )
    concrete = None if global_array else _hyperparams.concrete(value)
    ident = ("path", path) if concrete is None else (
      np.shape(concrete), np.asarray(concrete, np.float32).tobytes()
    )
    groups.setdefault(ident, (value, {}))[1][path] = None
  return {
    f"{i:05d}": SharedValue(_paths.operand(value), members)
    for i, (value, members) in enumerate(groups.values())
  }


def _by_path(values: dict[str, Any], per_group: Any) -> dict[str, Any]:
  """``{path: per_group(operand)}`` from a ``per_leaf`` entry, computing once per group."""
  out: dict[str, Any] = {}
  for shared in values.values():
    if shared is None:  # {path: None}: coverage, no values
      return {}
    if not isinstance(shared, SharedValue):
      raise ValueError(
        "the optimizer state holds per-leaf layer data in another layout (a state saved by an "
        "earlier dualopt_jax, keyed by path); initialise the state with tx.init and restore only "
        "the parameters."
      )
    value = per_group(shared.value)
    out.update(dict.fromkeys(shared.paths, value))
  return out


def check_layer_scale(spec: Any, state: LayerScaleState, *, name: str) -> None:
  """Raises when ``state`` was made under other depth settings (or scales) than ``spec``'s."""
  keys = list(state.per_leaf)
  if keys and keys != [spec_tag(spec)]:
    raise ValueError(
      f"{name}: the optimizer state holds per-layer data made with the settings {keys[0]!r}, "
      f"but this transformation uses {spec_tag(spec)!r} (granularity/order/stacked or the "
      "layer scales changed). Initialise a new state (tx.init), or restore with the settings "
      "the run started with."
    )


def layer_multipliers(spec: Any, state: LayerScaleState, updates: Any, *, name: str) -> Any:
  """Per-leaf multipliers aligned with ``updates`` (MaskedNodes where ``updates`` has them).

  From the state's operands and ``spec``'s current numbers (possibly traced,
  under ``optax.inject_hyperparams``).
  """
  if not is_per_leaf(spec):
    return _paths.map_with_path(lambda _p, _u: spec, updates)
  check_layer_scale(spec, state, name=name)
  (stored,) = state.per_leaf.values()
  per_group = spec.at_height if isinstance(spec, LayerProfile) else (lambda v: v)
  by_path = _by_path(stored, per_group) if isinstance(stored, dict) else {}
  return _paths.map_with_path(lambda p, _u: by_path[key(p)], updates)


def at_step(
  value: Any, layer_scale: Any, state: Any, updates: Any, *, name: str, label: str,
  fraction: bool = False,
) -> tuple[Any, Any]:
  """What an update applies: ``value`` (a schedule) at ``state.count``, and per-leaf multipliers.

  ``state`` has ``count`` and ``layer_scale`` (a :class:`LayerScaleState`);
  ``fraction``: ``value`` is a per-step fraction (``_hyperparams.fraction_at``).
  """
  at = _hyperparams.fraction_at if fraction else _hyperparams.value_at
  current = at(value, state.count, name=f"{name}: {label}")
  return current, layer_multipliers(layer_scale, state.layer_scale, updates, name=name)


def refreshed(spec: Any, state: LayerScaleState) -> LayerScaleState:
  """``state`` with the numbers ``spec`` has now (what the next update will use)."""
  return _numbers_state(spec, state.per_leaf)


def stored_multipliers(state: LayerScaleState) -> dict[str, Any] | None:
  """``{path: multiplier}`` from the state alone (for describe/drift); None if it has none."""
  if not state.per_leaf:
    return None
  ((tag, values),) = state.per_leaf.items()
  if not isinstance(values, dict):  # the placeholder of a tree without leaves
    return {}
  if tag == "constant":
    return dict.fromkeys(values, state.start)
  if tag.startswith("scale"):
    return _by_path(values, lambda v: v)
  flip = state.flip

  def multiplier(height: Any) -> Any:
    h = jnp.asarray(height, jnp.float32)
    return _depths.profile_value(jnp.where(flip, h, 1.0 - h), state.start, state.end, state.power)

  return _by_path(values, multiplier)


def stored_depths(state: LayerScaleState) -> dict[str, Any] | None:
  """``{path: depth}`` from the state, or None (scalar or explicit scales)."""
  if not state.per_leaf:
    return None
  ((tag, values),) = state.per_leaf.items()
  if tag.startswith("scale") or tag == "constant" or not isinstance(values, dict):
    return None
  return _by_path(values, lambda h: 1.0 - jnp.asarray(h, jnp.float32))


def as_tuple(spec: Any) -> Any:
  """Lists of patterns as tuples (hashable settings); strings, mappings and None as given."""
  if spec is None or isinstance(spec, (str, Mapping)):
    return spec
  return tuple(spec)
