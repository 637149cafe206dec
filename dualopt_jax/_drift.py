"""Drift diagnostics: how far each layer has moved from the anchor, ready to log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualopt_jax import _depths, _describe, _lora, _norms, _paths, _profile
from dualopt_jax._l2sp import L2SPState
from dualopt_jax._projection import ProjectionState
from dualopt_jax._rollback import RollbackState
from dualopt_jax._spd import SPDState

_ANCHORED = (RollbackState, SPDState, L2SPState, ProjectionState)


def anchor_from_state(opt_state: Any) -> Any:
  """The anchor kept by the first anchored transformation in ``opt_state``.

  Looks inside any Optax wrapper for a ``rollback_to`` (``dualopt``'s
  fine-tune mode, ``olor``), ``spd``, ``add_l2sp_gradient``/``decay_to_anchor``
  or ``project_to_anchor`` state. Raises ``ValueError`` when there is none.
  """
  for state in _describe.find_states(opt_state, _ANCHORED):
    return state.anchor
  hint = ""
  if not any(True for _ in _describe.find_states(opt_state)) and all(
    isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree.leaves(opt_state)
  ):
    hint = " (opt_state is drift's second argument: to pass the anchor, write params0=...)"
  raise ValueError(
    "drift: params0 is None and opt_state holds no anchor (no rollback_to / dualopt "
    f"fine-tune / spd / l2sp / project_to_anchor state); pass params0{hint}."
  )


def _named_groups(params: Any, groups: Any) -> dict[_paths.Path, tuple[str, Any]]:
  """Maps each path to ``(its name in groups, None)``."""
  table = _paths.PathTable(
    groups(params) if callable(groups) else groups, name="drift: groups", prefix=True
  )
  out = {}
  for path, _leaf in _paths.present_leaves(params):
    name = table.get(path)
    if not isinstance(name, str):
      raise ValueError(
        f"drift: groups for '{_paths.path_str(path)}' must be a str (the group's name), "
        f"got {name!r}."
      )
    out[path] = (name, None)
  return out


def _block_groups(
  params: Any, granularity_kwargs: dict[str, Any]
) -> dict[_paths.Path, tuple[str, Any]]:
  """Maps each path to ``(group name, depth rank or array of ranks)``."""
  table = _depths.depth_table(params, granularity="block", **granularity_kwargs)
  by_level: dict[Any, list[_paths.Path]] = {}
  for path, d in table.items():
    key = float(d) if np.ndim(d) == 0 else ("stacked", tuple(np.ravel(d).tolist()))
    by_level.setdefault(key, []).append(path)
  out = {}
  scalar_levels = sorted(k for k in by_level if isinstance(k, float))
  for level, members in by_level.items():
    prefix = _common_prefix(members)
    if isinstance(level, float):
      rank = scalar_levels.index(level)
      name = _paths.path_str(prefix) if prefix else f"level_{rank:02d}"
    else:
      name = _paths.path_str(prefix) if prefix else "stacked"
    for m in members:
      out[m] = (name, level)
  return out


def _common_prefix(paths: list[_paths.Path]) -> _paths.Path:
  if len(paths) == 1:
    return paths[0][:-1] if len(paths[0]) > 1 else paths[0]
  prefix = paths[0]
  for p in paths[1:]:
    n = 0
    while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
      n += 1
    prefix = prefix[:n]
  if prefix and prefix[0] == "params" and len(prefix) == 1:
    return ()
  return prefix


def drift(
  params: Any,
  opt_state: Any = None,
  *,
  params0: Any = None,
  granularity: str = "tensor",
  groups: Any = None,
  stacked: str | Sequence[str] | None = None,
  order: Any = None,
  eps: float = 1e-12,
  lora: str | Sequence[str] | None = None,
  full_params: Any = None,
) -> dict[str, Any]:
  r"""Per-layer relative drift :math:`\lVert\theta - \theta_0\rVert / \lVert\theta_0\rVert`.

  Jittable (all grouping is done on paths, at trace time). Returns a flat
  ``dict`` of ``float32`` arrays keyed ``"drift/<name>"``, ready for a
  logger (``{k: float(v) for k, v in out.items()}`` for scalars).

  * ``granularity="tensor"``: one entry per parameter, named by its path; a
    stacked leaf gets a vector with one value per layer.
  * ``granularity="block"``: leaves of one block (as ``layer_depths(granularity=
    "block")`` groups them) are pooled, :math:`\sqrt{\sum\lVert\theta -
    \theta_0\rVert^2} / \sqrt{\sum\lVert\theta_0\rVert^2}`; the name is the
    block's common path prefix. Stacked layers give a vector, one value per
    layer.
  * ``groups``: pool by your own grouping, a (prefix) pytree of group names
    over the params or a ``params -> pytree of names`` callable.

  With ``opt_state``, also returns what its rollback / decay / projection /
  lr-decay states (inside any Optax wrapper) apply on the next update, per
  parameter: ``"rollback/<path>"`` and ``"decay/<path>"`` (the fraction of
  the way to the anchor / to 0), ``"radius/<path>"``, ``"lr_scale/<path>"``.
  Leaves a transformation does not touch (the head) are left out.

  Args:
    params: the current parameters (any wrapping).
    opt_state: the optimizer state (for the anchor and the strengths).
    params0: the anchor; ``None`` takes it from ``opt_state`` (the first
      state holding an ``anchor``); leaves with no anchor there (a masked-out
      head, a zero anchor) are left out.
    granularity: ``"tensor"`` or ``"block"``, as in ``layer_depths``.
    groups: your own grouping instead of ``granularity`` (see above).
    stacked: the subtrees that stack layers on axis 0, as in
      ``layer_depths``: ``None`` detects them, glob patterns name them,
      ``()`` means none.
    order: the forward order or glob patterns, input to output, for
      ``granularity="block"`` (see ``layer_depths``).
    eps: added to the denominator (a zero anchor tensor gives
      :math:`\lVert\theta\rVert / \epsilon`).
    lora: glob patterns selecting LoRA ``B`` factors (as ``dualopt``'s
      ``lora``): each gets ``"drift/<B path>"`` = :math:`\lVert AB\rVert_F /
      \lVert W_0\rVert_F`, the merged weight's drift from its base weight
      (without an adapter's constant scale, e.g. Qwix's ``alpha / rank``),
      computed from rank x rank products; the factors are left out of the
      ordinary entries. Needs ``full_params``.
    full_params: the whole model's params holding the base weights
      :math:`W_0` (e.g. ``nnx.state(model, nnx.Param)``), for ``lora``.

  Returns:
    ``dict[str, jax.Array]``.

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> p0 = {'w': jnp.array([3.0, 4.0])}
    >>> dj.drift({'w': jnp.array([3.0, 4.5])}, params0=p0)
    {'drift/w': Array(0.1, dtype=float32)}
  """
  if granularity not in _depths.GRANULARITIES:
    raise ValueError(
      f"drift: granularity must be one of {_depths.GRANULARITIES}, got {granularity!r}."
    )
  if groups is not None and granularity != "tensor":
    raise ValueError("drift: give granularity or groups (your own grouping), not both.")
  if groups is not None and order is not None:
    raise ValueError("drift: order is for granularity='block'; groups are given by name.")
  if (lora is None) != (full_params is None):
    raise ValueError(
      "drift: lora and full_params go together (the merged drift of the adapters needs the "
      "base weights); give both or neither."
    )
  merged: dict[str, Any] = {}
  skip: set[_paths.Path] = set()
  if lora is not None:
    pats = _paths.patterns(lora, name="drift: lora")
    merged = _lora.merged_drifts(params, pats, full_params, eps=eps, name="drift: lora")
    bs = _lora.b_paths(pats, params, name="drift: lora")
    skip = set(bs) | {_lora.a_path(b) for b in bs}
  from_state = params0 is None
  if from_state:
    if opt_state is None:
      raise ValueError("drift: pass params0, or an opt_state that holds the anchor.")
    params0 = anchor_from_state(opt_state)
  anchor = _paths.PathTable(params0, name="params0")
  leaves = [
    (p, x) for p, x in _paths.leaves_with_paths(params)
    if not _paths.is_masked_node(x) and _paths.is_float_leaf(x)
  ]
  leaves = [(p, x) for p, x in leaves if _paths.canonical(p) not in skip]
  if from_state:  # leaves the transformation keeps no anchor for (a head, a zero anchor)
    leaves = [(p, x) for p, x in leaves if anchor.lookup(p)[0]]
  if not leaves and not merged:
    raise ValueError("drift: no float leaf of params has an anchor.")
  for path, _ in leaves:
    anchor.get(path)  # raises, naming the path, when params0 lacks it

  def sq(path, x, st):
    a = anchor.get(path)
    xf = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
    axes = _norms.reduce_axes(np.ndim(x), stacked=st, per="tensor")
    af = jnp.asarray(a, xf.dtype)
    return (jnp.sum(_norms.squared_magnitude(xf - af), axis=axes),
            jnp.sum(_norms.squared_magnitude(af), axis=axes))

  out: dict[str, Any] = {}
  if granularity == "tensor" and groups is None:
    flags = dict(_paths.leaves_with_paths(_norms.stacked_flags(stacked, params)))
    for path, x in leaves:
      num, den = sq(path, x, bool(flags[path]))
      out["drift/" + _paths.path_str(path)] = jnp.sqrt(num) / (jnp.sqrt(den) + eps)
  else:
    if groups is None:
      grouped = _block_groups(params, {"order": order, "stacked": stacked})
    else:
      grouped = _named_groups(params, groups)
    pooled: dict[str, list[Any]] = {}
    for path, x in leaves:
      name, level = grouped[path]
      is_stacked = isinstance(level, tuple)
      num, den = sq(path, x, is_stacked)
      acc = pooled.setdefault(name, [0.0, 0.0])
      acc[0] = acc[0] + num
      acc[1] = acc[1] + den
    for name, (num, den) in pooled.items():
      out["drift/" + name] = jnp.sqrt(num) / (jnp.sqrt(den) + eps)

  out.update(merged)
  if opt_state is not None:
    out.update(_strengths(params, opt_state))
  return out


def _strengths(params: Any, opt_state: Any) -> dict[str, Any]:
  out = {}
  paths = [p for p, x in _paths.present_leaves(params) if _paths.is_float_leaf(x)]
  for strength in _describe.strengths(opt_state):
    for path in paths:
      value = strength.values.get(_profile.key(path))
      if value is not None:
        value = jnp.asarray(value, jnp.float32)
        out[f"{strength.kind}/{_paths.path_str(path)}"] = jnp.ravel(value) if value.ndim else value
  return out
