"""``describe``: per-layer depths and the strengths the next update applies, read from the state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualopt_jax import _paths, _profile
from dualopt_jax._lr_decay import LayerwiseLRDecayState
from dualopt_jax._projection import ProjectionState
from dualopt_jax._rollback import LayerwiseDecayState, RollbackState

KINDS = ("rollback", "decay", "radius", "lr_scale")
_STATES = (RollbackState, LayerwiseDecayState, ProjectionState, LayerwiseLRDecayState)


@dataclass(frozen=True)
class Strength:
  """What one transformation's state says about the next update.

  ``values`` maps path keys (``_profile.key``) to the per-step value (rollback/decay
  fraction, projection radius, lr scale) of every leaf the transformation
  covers; ``multipliers`` and ``depths`` the layer-scale multipliers and
  depths where the state holds them.
  """

  kind: str
  values: dict[str, Any]
  multipliers: dict[str, Any]
  depths: dict[str, Any]


def _unwrapped(tree: Any) -> Any:
  """NNX ``Variable`` s (``nnx.Optimizer``'s opt_state) replaced by their values."""
  return jax.tree.map(
    lambda x: x.get_value() if _paths.is_variable(x) else x, tree, is_leaf=_paths.is_variable
  )


def find_states(opt_state: Any, types: tuple[type, ...] = _STATES) -> Iterator[Any]:
  """Every state of ``types`` inside ``opt_state`` (any pytree of Optax wrappers)."""

  def walk(node: Any) -> Iterator[Any]:
    if isinstance(node, types):
      yield node
      return
    children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
    if not (len(children) == 1 and children[0] is node):
      for child in children:
        yield from walk(child)

  yield from walk(_unwrapped(opt_state))


def _table(tree: Any) -> dict[str, Any]:
  return {_profile.key(p): x for p, x in _paths.present_leaves(tree)}


def strengths(opt_state: Any) -> list[Strength]:
  """What every known state inside ``opt_state`` applies on the next update (traceable)."""
  out = []
  for state in find_states(opt_state):
    if isinstance(state, (RollbackState, LayerwiseDecayState)):
      out.append(_pull_strength(state))
    elif isinstance(state, ProjectionState):
      out.append(_projection_strength(state))
    else:
      ((_, exponents),) = state.exponent.items()
      exps = _table(exponents)
      decay = jnp.asarray(state.decay, jnp.float32)
      values = {p: jnp.power(decay, jnp.asarray(e, jnp.float32)) for p, e in exps.items()}
      out.append(Strength("lr_scale", values, {}, {}))
  return out


def _pull_strength(state: Any) -> Strength:
  kind = "rollback" if isinstance(state, RollbackState) else "decay"
  scale = state.layer_scale
  stored = _profile.stored_multipliers(scale)
  depths = _profile.stored_depths(scale)
  rate = jnp.asarray(state.rate, jnp.float32)
  if stored is None:  # a scalar scale: the anchor says which leaves
    stored = {p: scale.start for p in _table(state.anchor)}
  values = {p: rate * m for p, m in stored.items()}
  return Strength(kind, values, stored, depths or {})


def _projection_strength(state: ProjectionState) -> Strength:
  stored = _profile.stored_multipliers(state.layer_scale)
  radius = jnp.asarray(state.radius, jnp.float32)
  if stored is None:
    stored = {p: state.layer_scale.start for p in _table(state.anchor)}
  values = {p: radius * m for p, m in stored.items()}
  return Strength("radius", values, stored, _profile.stored_depths(state.layer_scale) or {})


def _value_for(strength: Strength, table: str, path: _paths.Path) -> Any:
  return getattr(strength, table).get(_profile.key(path))


class LayerTable(list):
  """The rows :func:`~dualopt_jax.describe` returns; ``str()`` formats them as a table."""

  def __str__(self) -> str:
    return format_table(list(self))


def _concrete(value: Any) -> Any:
  if value is None:
    return None
  arr = np.asarray(value, np.float64)
  return float(arr) if arr.ndim == 0 else arr.ravel()


def describe(
  params: Any,
  source: Any,
  *,
  print_fn: Callable[[str], None] | None = None,
) -> LayerTable:
  """Per-parameter table: depth, multiplier and what the next update applies.

  Reads the optimizer state: every :func:`~dualopt_jax.rollback_to`,
  :func:`~dualopt_jax.layerwise_decay` (and so :func:`~dualopt_jax.dualopt`,
  :func:`~dualopt_jax.olor`), :func:`~dualopt_jax.project_to_anchor` and
  :func:`~dualopt_jax.layerwise_lr_decay` state inside any Optax wrapper
  (``chain``, ``named_chain``, ``inject_hyperparams``, ``MultiSteps``,
  ``apply_if_finite``, ``masked``, ``partition``, ``nnx.Optimizer``'s
  ``opt_state``), also after an Orbax restore in a fresh process.

  The values are what the next update applies when it is made by the
  transformation that produced the state. Two cases where the state cannot
  know: under ``optax.inject_hyperparams`` with a *scheduled* hyper-parameter
  (the wrapper evaluates the schedule and passes a scalar in, so the table
  shows the last update's value), and right after restoring into a
  transformation with other profile numbers (until its first update).

  Args:
    params: the model's parameters (any wrapping); one row per leaf.
    source: an optimizer state; a ``GradientTransformation`` (its
      ``init(params)`` is described, which allocates the state); or a
      :class:`~dualopt_jax.LayerProfile` (depths and multipliers only).
    print_fn: where to print the table (e.g. ``print``); by default nothing
      is printed and ``str(table)`` gives the text.

  Returns:
    A :class:`~dualopt_jax._describe.LayerTable` (a list) of dicts, ordered
    by depth then path, with keys ``path``, ``shape``, ``depth`` (``None``
    where the state holds no depth, e.g. the head), ``multiplier`` (the
    layer-scale multiplier) and one key per transformation kind present --
    ``rollback`` and ``decay`` (the fraction of the way to the anchor / to 0
    of the next update), ``radius`` (the projection radius), ``lr_scale``
    (the layer-wise lr factor) -- ``None`` for leaves the transformation
    does not touch.

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))}, 'Dense_1': {'kernel': jnp.ones((2, 2))},
    ...           'head': {'kernel': jnp.ones((2, 1))}}
    >>> tx = dj.dualopt(1e-3, rollback=0.01, head='head')
    >>> table = dj.describe(params, tx.init(params))
    >>> print(table)
    path            shape  depth  multiplier  rollback/step
    --------------  -----  -----  ----------  -------------
    Dense_0/kernel  2x2    0      1           0.01
    Dense_1/kernel  2x2    1      0.25        0.0025
    head/kernel     2x1    -      -           -
  """
  if isinstance(source, _profile.LayerProfile):
    rows = _profile_rows(params, source)
    kinds: tuple[str, ...] = ()
  else:
    if isinstance(source, optax.GradientTransformation):
      source = source.init(params)
    found = strengths(source)
    if not found:
      raise ValueError(
        "describe: the optimizer state holds no rollback_to / layerwise_decay / "
        "project_to_anchor / layerwise_lr_decay state (dualopt and olor hold one)."
      )
    kinds = tuple(k for k in KINDS if any(s.kind == k for s in found))
    rows = _state_rows(params, found, kinds)
  rows.sort(key=lambda r: (np.inf if r["depth"] is None else float(np.min(r["depth"])), r["path"]))
  table = LayerTable(rows)
  if print_fn is not None:
    print_fn(format_table(table, kinds=kinds))
  return table


def _profile_rows(params: Any, profile: _profile.LayerProfile) -> list[dict[str, Any]]:
  depths = profile.depths(params)
  return [
    {
      "path": _paths.path_str(path),
      "shape": tuple(np.shape(leaf)),
      "depth": _concrete(depths[path]),
      "multiplier": _concrete(profile.multiplier(depths[path])),
    }
    for path, leaf in _paths.present_leaves(params)
  ]


def _state_rows(params: Any, found: list[Strength], kinds: tuple[str, ...]) -> list[dict]:
  rows = []
  # depth/multiplier columns: the rollback/decay profile's where there is one, else the radius'.
  found = sorted(found, key=lambda s: s.kind == "radius")
  for path, leaf in _paths.present_leaves(params):
    row: dict[str, Any] = {"path": _paths.path_str(path), "shape": tuple(np.shape(leaf)),
                           "depth": None, "multiplier": None}
    row.update({k: None for k in kinds})
    for strength in found:
      value = _value_for(strength, "values", path)
      if value is None:
        continue
      row[strength.kind] = _combine(strength.kind, row[strength.kind], _concrete(value))
      if strength.kind in ("rollback", "decay", "radius") and row["multiplier"] is None:
        row["multiplier"] = _concrete(_value_for(strength, "multipliers", path))
        depth = strength.depths.get(_profile.key(path))
        row["depth"] = None if depth is None else _concrete(depth)
    rows.append(row)
  return rows


def _combine(kind: str, old: Any, new: Any) -> Any:
  """Two transformations of one kind on a leaf: pulls compose, lr scales multiply."""
  if old is None:
    return new
  if kind in ("rollback", "decay"):
    return 1.0 - (1.0 - np.asarray(old)) * (1.0 - np.asarray(new))
  if kind == "lr_scale":
    return np.asarray(old) * np.asarray(new)
  return np.minimum(old, new)


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  arr = np.asarray(value, np.float64).ravel()
  if arr.size == 1:
    return f"{arr[0]:.4g}"
  return f"{arr[0]:.3g}..{arr[-1]:.3g} ({arr.size})"


def format_table(rows: list[dict[str, Any]], *, kinds: tuple[str, ...] | None = None) -> str:
  """The rows of :func:`describe` as aligned text."""
  if kinds is None:
    kinds = tuple(k for k in KINDS if rows and k in rows[0])
  header = ("path", "shape", "depth", "multiplier", *(f"{k}/step" if k in ("rollback", "decay")
                                                      else k for k in kinds))
  lines = [
    (
      r["path"],
      "x".join(map(str, r["shape"])) or "()",
      _fmt(r["depth"]),
      _fmt(r["multiplier"]),
      *(_fmt(r.get(k)) for k in kinds),
    )
    for r in rows
  ]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
  out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
  out.append("  ".join("-" * w for w in widths))
  out.extend(
    "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
  )
  return "\n".join(out)
