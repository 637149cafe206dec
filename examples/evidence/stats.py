"""Selection on validation, mean +- std over seeds, terminal table, JSON/CSV output."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def select(score: np.ndarray, tiebreak: np.ndarray | None = None, *, higher: bool = True) -> int:
  """Best grid index by the seed-mean of ``score`` (H, S); ties by ``tiebreak`` (lower wins)."""
  mean = np.nanmean(score, axis=1)
  mean = np.where(np.isfinite(mean), mean, -np.inf if higher else np.inf)
  best = np.nanmax(mean) if higher else np.nanmin(mean)
  tied = np.flatnonzero(np.isclose(mean, best, rtol=0, atol=1e-9))
  if tiebreak is not None and len(tied) > 1:
    tb = np.nanmean(tiebreak, axis=1)[tied]
    tb = np.where(np.isfinite(tb), tb, np.inf)
    return int(tied[int(np.argmin(tb))])
  return int(tied[0])


def setting(entry: dict[str, Any], k: int | None = None) -> str:
  """A method's setting at grid index ``k`` (default: its validation choice), for labels."""
  if entry["hp_name"] == "defaults":
    return "library defaults"
  value = entry["selected_hp"] if k is None else entry["grid"][k]
  return f"{entry['hp_name']}={value:g}"


def summary(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {
    "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
    "n": len(v), "values": [float(x) for x in v],
  }


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  """Per-seed difference a - b (same seed = same init and batch order): mean, std, t-statistic."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  s = summary(d)
  s["t"] = float(s["mean"] / (s["std"] / np.sqrt(len(d)))) if s["std"] > 0 else float("nan")
  return s


def fmt(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
  if not s:
    return "-"
  return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def table(rows: list[list[str]], header: list[str]) -> str:
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if not np.isfinite(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(_jsonable(obj), f, indent=1)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  keys: list[str] = []
  for r in rows:
    keys.extend(k for k in r if k not in keys)
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: _jsonable(v) for k, v in r.items()})
