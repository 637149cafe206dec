"""``describe``: the per-layer table a user checks before training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import optax

from dualopt_jax import _depths, _paths
from dualopt_jax._dualopt import registered_description
from dualopt_jax._profile import LayerProfile


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  arr = np.asarray(value, np.float64).ravel()
  if arr.size == 1:
    return f"{arr[0]:.4g}"
  return f"{arr[0]:.3g}..{arr[-1]:.3g} ({arr.size})"


def describe(
  params: Any,
  tx_or_profile: Any,
  *,
  print_fn: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
  """Per-parameter table: path, shape, depth, multiplier and per-step fraction.

  Args:
    params: the model's parameters as created (definition order matters for
      ``granularity="tensor"``).
    tx_or_profile: a transformation returned by :func:`~dualopt_jax.dualopt` or
      :func:`~dualopt_jax.olor`, a :class:`~dualopt_jax.LayerProfile`, or any
      ``layer_scale`` spec (scalar, pytree, ``(path, leaf)`` callable).
    print_fn: where to print the table (``None`` prints nothing).

  Returns:
    One dict per parameter, in definition order, with keys ``path``,
    ``shape``, ``depth``, ``multiplier`` and ``fraction`` (the per-step
    fraction at the peak learning rate, where known; 0 for ``head``).

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))}, 'head': {'kernel': jnp.ones((2, 1))}}
    >>> rows = dj.describe(params, dj.dualopt(1e-3, head='head'), print_fn=None)
    >>> [(r['path'], r['fraction']) for r in rows]
    [('Dense_0/kernel', 0.01), ('head/kernel', 0.0)]
  """
  description = registered_description(tx_or_profile)
  if description is None and isinstance(tx_or_profile, optax.GradientTransformation):
    raise ValueError(
      "describe: this transformation was not built by dualopt() or olor(), so its per-layer "
      "strengths are not known; pass the LayerProfile or layer_scale you gave rollback_to / "
      "layerwise_decay instead."
    )
  head = description.head if description else None
  is_head = _paths.mask_callable(head)(params) if head is not None else None
  head_table = _paths.PathTable(is_head, name="head") if is_head is not None else None
  body = params
  if head_table is not None:  # the head is left out of the profile, as optax.masked does
    body = _paths.map_with_path(
      lambda p, x: optax.MaskedNode() if head_table.get(p) else x, params
    )

  profile = description.profile if description else tx_or_profile
  if isinstance(profile, LayerProfile):
    with _paths.order_hint(params):
      table = profile.depth_table(body, at_init=True)
    multipliers = {_paths.path_str(p): profile.multiplier(d) for p, d in table.items()}
    depths = {_paths.path_str(p): d for p, d in table.items()}
  else:
    values = _paths.resolve_per_leaf(profile, params, name="layer_scale", at_init=True)
    multipliers = {_paths.path_str(p): v for p, v in _paths.leaves_with_paths(values)}
    try:
      depths = {
        _paths.path_str(p): d
        for p, d in _depths.depth_table(params).items()
      }
    except ValueError:
      depths = {}
  fraction_scale = description.peak_fraction if description else None

  rows = []
  for path, leaf in _paths.definition_order(params):
    key = _paths.path_str(path)
    head_leaf = head_table is not None and bool(head_table.get(path))
    multiplier = 0.0 if head_leaf else multipliers.get(key)
    fraction = None
    if multiplier is not None and fraction_scale is not None:
      fraction = np.asarray(multiplier, np.float64) * float(fraction_scale)
      fraction = float(fraction) if fraction.ndim == 0 else fraction
    rows.append(
      {
        "path": key,
        "shape": tuple(np.shape(leaf)),
        "depth": None if head_leaf else depths.get(key),
        "multiplier": multiplier,
        "fraction": fraction,
        "head": head_leaf,
      }
    )
  if print_fn is not None:
    print_fn(format_table(rows, kind=description.kind if description else "scale"))
  return rows


def format_table(rows: list[dict[str, Any]], *, kind: str = "scale") -> str:
  header = ("path", "shape", "depth", "multiplier", f"{kind}/step @peak")
  lines = [
    (
      r["path"] + ("  [head]" if r["head"] else ""),
      "x".join(map(str, r["shape"])) or "()",
      _fmt(r["depth"]),
      _fmt(r["multiplier"]),
      _fmt(r["fraction"]),
    )
    for r in rows
  ]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
  out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
  out.append("  ".join("-" * w for w in widths))
  out.extend("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
  return "\n".join(out)
