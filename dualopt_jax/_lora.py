r"""LoRA adapters: which leaves are the factors, and which base weight each adapts.

With :math:`W = W_0 + A B` (``W_0`` frozen; Flax's layout, ``y = x W``),
rolling the merged weight back toward :math:`W_0` by :math:`\lambda` is
scaling the post-step ``B`` by :math:`1 - \lambda` (the anchor of ``A B`` is
0): the rollback of a ``B`` factor is the rollback toward 0 and its ``A``
factor gets the plain step.

The ``B`` factors are selected by glob patterns (``'**/lora_b'`` for
``nnx.LoRA``/``nnx.LoRALinear``; ``'**/*_lora_b'`` for Qwix, which adds
``<weight>_lora_a``/``<weight>_lora_b`` next to the weight it adapts). What
the names mean:

* a ``B`` factor's name ends in ``b`` (``lora_b``, ``kernel_lora_b``); its
  ``A`` factor is the sibling whose name ends in ``a`` instead (``lora_a``,
  ``kernel_lora_a``);
* the base weight of an adapter named ``<w>_lora_b`` is the sibling ``<w>``
  (Qwix); otherwise it is the one weight (a leaf that is not a bias/scale) of
  the adapter's module or of the module above it (``nnx.LoRALinear``:
  ``x/lora/lora_b`` adapts ``x/kernel``; ``nnx.LoRA(base_module=...)``:
  ``x/lora_b`` adapts ``x/base_module/kernel``). Anything else raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualopt_jax import _paths

Path = _paths.Path
Shapes = tuple[tuple[Path, tuple[int, ...]], ...]

_ONE_D = frozenset({"bias", "scale", "b", "g", "gamma", "beta", "embedding_bias"})


def a_name(b_name: str) -> str:
  """The ``A`` factor's name for a ``B`` factor's (``lora_b`` -> ``lora_a``)."""
  return b_name[:-1] + ("A" if b_name.endswith("B") else "a")


def _check_b_name(path: Path, *, name: str) -> None:
  last = str(path[-1]) if path else ""
  if not last or last[-1] not in "bB":
    raise ValueError(
      f"{name}: the pattern selects '{_paths.path_str(path)}', which is not named as a LoRA B "
      "factor (a name ending in 'b': 'lora_b' for nnx.LoRA, '<weight>_lora_b' for Qwix). "
      "lora= selects the B factors only (their A factors are found by name)."
    )


def b_paths(pats: Sequence[_paths.Pattern], tree: Any, *, name: str) -> list[Path]:
  """Canonical paths of the ``B`` factors of ``tree`` (present leaves) the patterns select.

  Raises when a pattern matches nothing or selects a leaf not named as a ``B`` factor.
  """
  _paths.check_patterns_match(pats, tree, name=name)
  out = []
  for path, _ in _paths.leaves_with_paths(tree):
    if any(p.matches(path) for p in pats):
      _check_b_name(path, name=name)
      out.append(_paths.canonical(path))
  return out


def a_path(b: Path) -> Path:
  return b[:-1] + (a_name(str(b[-1])),)


def adapter_flags(pats: Sequence[_paths.Pattern], tree: Any, *, name: str) -> tuple[Any, Any]:
  """Two bool trees over ``tree``: the selected ``B`` factors, and their ``A`` factors."""
  bs = set(b_paths(pats, tree, name=name))
  as_ = {a_path(b) for b in bs}
  b_tree = _paths.map_with_path(lambda p, _x: _paths.canonical(p) in bs, tree)
  a_tree = _paths.map_with_path(lambda p, _x: _paths.canonical(p) in as_, tree)
  return b_tree, a_tree


def shapes(tree: Any) -> Shapes:
  """``((canonical path, shape), ...)`` of ``tree``'s present leaves (hashable, no values)."""
  leaves = _paths.present_leaves(tree)
  return tuple((_paths.canonical(p), tuple(int(n) for n in np.shape(x))) for p, x in leaves)


def nested(leaves: Shapes) -> dict:
  """A nested dict of ``jax.ShapeDtypeStruct`` s with these paths (for ``depth_table``)."""
  root: dict = {}
  for path, shape in leaves:
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
  return root


def base_weight(adapter: Path, weights: dict[Path, tuple[int, ...]], *, name: str) -> Path:
  """The path of the base weight the adapter factor at ``adapter`` adapts (see module doc)."""
  last = str(adapter[-1])
  for suffix in ("_lora_b", "_lora_a"):
    if last.endswith(suffix) and len(last) > len(suffix):
      sibling = adapter[:-1] + (last[: -len(suffix)],)
      if sibling in weights:
        return sibling
  for up in (1, 2):
    if len(adapter) < up:
      break
    prefix = adapter[:-up]
    inside = [p for p in weights if p[: len(prefix)] == prefix]
    if not inside:
      continue
    candidates = [p for p in inside if str(p[-1]) not in _ONE_D]
    if len(candidates) == 1:
      return candidates[0]
    where = _paths.path_str(prefix)
    raise ValueError(
      f"{name}: cannot tell which weight the adapter '{_paths.path_str(adapter)}' adapts: "
      f"'{where}' holds {len(candidates)} weights "
      f"({', '.join(_paths.path_str(p) for p in candidates[:4]) or 'none'}). An adapter takes "
      "the depth of its base weight: the sibling '<weight>' of '<weight>_lora_b' (Qwix), or "
      "the one weight of its module or the module above (nnx.LoRALinear, nnx.LoRA)."
    )
  raise ValueError(
    f"{name}: the adapter '{_paths.path_str(adapter)}' has no base weight in the tree the "
    "depths come from (it holds only adapters there). Pass the full-weight tree, e.g. "
    "full_params=nnx.state(model, nnx.Param), so that each adapter takes its base weight's depth."
  )


def merged_drifts(
  params: Any, pats: Sequence[_paths.Pattern], full_params: Any, *, eps: float, name: str
) -> dict[str, Any]:
  r"""``{"drift/<B path>": ‖A B‖_F / ‖W_0‖}`` for every selected ``B`` factor of ``params``.

  :math:`\lVert AB\rVert_F^2 = \langle A^\top A, B B^\top\rangle` (two rank x
  rank products; ``A``'s last axis and ``B``'s first are the rank), so the
  merged update is never formed. ``W_0`` is the base weight in
  ``full_params``; ``A.shape[:-1] + B.shape[1:]`` must be its shape.
  """
  table = _paths.PathTable(params, name="params")
  full = dict((_paths.canonical(p), x) for p, x in _paths.present_leaves(full_params))
  adapters = set(b_paths(pats, full_params, name=name))
  adapters |= {a_path(b) for b in adapters}
  weights = {p: tuple(np.shape(x)) for p, x in full.items() if p not in adapters}
  out: dict[str, Any] = {}
  for b in b_paths(pats, params, name=name):
    found, a_value = table.lookup(a_path(b))
    if not found:
      raise ValueError(
        f"{name}: the B factor '{_paths.path_str(b)}' has no A factor "
        f"'{_paths.path_str(a_path(b))}' in params; the merged drift needs both."
      )
    b_value = table.get(b)
    base = base_weight(b, weights, name=name)
    w0 = full[base]
    if tuple(np.shape(a_value))[:-1] + tuple(np.shape(b_value))[1:] != tuple(np.shape(w0)):
      raise ValueError(
        f"{name}: A {tuple(np.shape(a_value))} times B {tuple(np.shape(b_value))} at "
        f"'{_paths.path_str(b)}' does not give the shape {tuple(np.shape(w0))} of its base "
        f"weight '{_paths.path_str(base)}' (contracting A's last axis with B's first)."
      )
    compute = jnp.promote_types(jnp.asarray(b_value).dtype, jnp.float32)
    a_c, b_c = jnp.asarray(a_value, compute), jnp.asarray(b_value, compute)
    ata = jnp.tensordot(a_c, a_c, axes=(tuple(range(a_c.ndim - 1)),) * 2)
    bbt = jnp.tensordot(b_c, b_c, axes=(tuple(range(1, b_c.ndim)),) * 2)
    squared = jnp.maximum(jnp.sum(ata * bbt), 0.0)
    w0_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(w0, compute))))
    out["drift/" + _paths.path_str(b)] = jnp.sqrt(squared) / (w0_norm + eps)
  return out
