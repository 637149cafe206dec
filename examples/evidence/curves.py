"""Trade-off curves: each method's grid as a curve, and two scalar summaries of it.

For a method with grid values h and seeds s, the curve is the seed mean of
(upstream retention, downstream performance) at every h. The summaries:

* **Constrained best** -- chosen on validation splits only: among the grid
  values whose mean upstream *validation* metric meets the retention
  constraint (vision: accuracy >= 90 %; language: loss at most 10 % above the
  pre-trained model's), the one with the best mean downstream *validation*
  metric; its test metrics are reported ("none qualifies": the method cannot
  keep the old task at any strength).
* **Hypervolume** -- per seed, the area of the (retention, downstream) plane
  that the seed's grid points dominate beyond a fixed reference point (chance
  level on both tasks); mean +- std over seeds, and paired by seed against a
  reference method. A curve that lies beyond another everywhere has the larger
  area, whichever point a selection rule would pick.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from . import stats


@dataclasses.dataclass(frozen=True)
class Spec:
  """Which metrics form a benchmark's curve, and which way is better."""

  x: str  # upstream retention, test split
  y: str  # downstream, test split
  shift: str | None  # downstream under shift (mean over shifts), test split
  constraint: str  # upstream, validation split
  threshold: float
  select: str  # downstream, validation split
  higher: bool  # True: accuracies; False: losses
  ref: tuple[float, float]  # the hypervolume reference point (chance level)
  scale: float  # for display (100: percent)
  unit: str


VISION = Spec(x="up_test_acc", y="down_test_acc", shift="down_shift_acc", constraint="up_val_acc",
              threshold=0.9, select="down_val_acc", higher=True, ref=(0.2, 0.2), scale=100,
              unit="%")
MAX_LOSS_RISE = 0.10  # language: upstream val loss at most 10 % above the pre-trained model's


def language_spec(res: dict[str, Any], vocab: int = 128) -> Spec:
  chance = math.log(vocab)
  limit = (1 + MAX_LOSS_RISE) * res["pretrain"]["up_val_loss"]["mean"]
  return Spec(x="up_test_loss", y="down_test_loss", shift="down_shift_loss",
              constraint="up_val_loss", threshold=limit, select="down_val_loss", higher=False,
              ref=(chance, chance), scale=1, unit="nats")


def spec_of(res: dict[str, Any]) -> Spec:
  return VISION if res["benchmark"].startswith("vision") else language_spec(res)


def hypervolume(xs: np.ndarray, ys: np.ndarray, ref: tuple[float, float]) -> float:
  """Area dominated by the points beyond ``ref`` (both coordinates: higher is better)."""
  pts = sorted(((x, y) for x, y in zip(xs, ys, strict=True)
                if np.isfinite(x) and np.isfinite(y) and x > ref[0] and y > ref[1]),
               reverse=True)
  area, best_y = 0.0, ref[1]
  for i, (x, y) in enumerate(pts):  # sweep from the right; each point adds a strip
    best_y = max(best_y, y)
    next_x = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
    area += (x - next_x) * (best_y - ref[1])
  return float(area)


def grid(entry: dict[str, Any], metric: str) -> np.ndarray:
  return np.asarray(entry["grid_metrics"][metric], np.float64)


def per_seed_hypervolume(entry: dict[str, Any], spec: Spec) -> np.ndarray:
  sign = 1.0 if spec.higher else -1.0
  gx, gy = sign * grid(entry, spec.x), sign * grid(entry, spec.y)
  ref = (sign * spec.ref[0], sign * spec.ref[1])
  return np.asarray([hypervolume(gx[:, s], gy[:, s], ref) for s in range(gx.shape[1])])


def constrained_index(entry: dict[str, Any], spec: Spec) -> int | None:
  """The grid index chosen on validation under the retention constraint (None: none qualifies)."""
  kept = grid(entry, spec.constraint).mean(1)
  ok = kept >= spec.threshold if spec.higher else kept <= spec.threshold
  if not ok.any():
    return None
  score = grid(entry, spec.select).mean(1)
  if not spec.higher:
    score = -score
  return int(np.argmax(np.where(ok, score, -np.inf)))


def point_label(e: dict[str, Any], k: int) -> str:
  """``'rollback=0.026'``, or ``'library defaults'`` for a method at fixed settings."""
  return "library defaults" if len(e["grid"]) == 1 else f"{e['hp_name']}={e['grid'][k]:g}"


def ok_methods(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
  return {n: e for n, e in res["methods"].items() if e.get("status") == "ok"}


def chosen_indices(res: dict[str, Any]) -> dict[str, int | None]:
  spec = spec_of(res)
  return {name: constrained_index(e, spec) for name, e in ok_methods(res).items()}


def constraint_words(spec: Spec) -> str:
  if spec.higher:
    return f"upstream val acc ≥ {spec.threshold:.0%}"
  return f"upstream val loss ≤ {spec.threshold:.3f} (pre-trained + {MAX_LOSS_RISE:.0%})"


def summary_rows(res: dict[str, Any], reference: str = "wise_ft"
                 ) -> tuple[list[str], list[list[str]]]:
  """One row per method: hypervolume, and the constrained choice's test metrics."""
  spec = spec_of(res)
  methods = ok_methods(res)
  ref_hv = per_seed_hypervolume(methods[reference], spec) if reference in methods else None
  digits = 1 if spec.higher else 3
  header = ["method", "hypervolume", f"Δ vs {reference} (t)", f"chosen ({constraint_words(spec)})",
            f"down test {spec.unit}", f"down shifted {spec.unit}", f"upstream test {spec.unit}"]
  rows = []
  for name, e in methods.items():
    hv = per_seed_hypervolume(e, spec)
    delta = "-"
    if ref_hv is not None and name != reference:
      p = stats.paired(hv, ref_hv)
      delta = f"{p['mean']:+.4f} (t={p['t']:.1f})"
    k = constrained_index(e, spec)
    row = [name, stats.fmt(stats.summary(hv), 1, 4), delta]
    if k is None:
      row += ["none qualifies", "-", "-", "-"]
    else:
      cell = lambda m, k=k, e=e: stats.fmt(stats.summary(grid(e, m)[k]), spec.scale, digits)
      shifted = cell(spec.shift) if spec.shift in e["grid_metrics"] else "-"
      row += [point_label(e, k), cell(spec.y), shifted, cell(spec.x)]
    rows.append(row)
  return header, rows


def shift_rows(res: dict[str, Any], kinds: list[str]) -> tuple[list[str], list[list[str]]]:
  """In-distribution and per-shift downstream test metric at the constrained choice."""
  spec = spec_of(res)
  metric = "acc" if spec.higher else "loss"
  digits = 1 if spec.higher else 3
  header = ["method", "chosen", f"in-distribution {spec.unit}",
            *[f"{k} {spec.unit}" for k in kinds], f"mean shifted {spec.unit}"]
  rows = []
  for name, e in ok_methods(res).items():
    k = constrained_index(e, spec)
    if k is None:
      continue
    cell = lambda m, k=k, e=e: stats.fmt(stats.summary(grid(e, m)[k]), spec.scale, digits)
    rows.append([name, point_label(e, k), cell(spec.y),
                 *[cell(f"down_{kind}_{metric}") for kind in kinds], cell(spec.shift)])
  return header, rows


def base_index(res: dict[str, Any], name: str = "adam") -> int:
  """The grid index of ``name`` at the base lr every other method used."""
  e = res["methods"][name]
  base = next(m.get("base_lr") for m in res["methods"].values() if m.get("base_lr"))
  hits = np.flatnonzero(np.isclose(np.asarray(e["grid"]), base, rtol=1e-6))
  if not len(hits):
    raise ValueError(f"the base lr {base:g} is not in {name}'s grid {e['grid']}.")
  return int(hits[0])


def default_verdict(res: dict[str, Any], method: str = "dualopt_default",
                    reference: str = "adam", t_clear: float = 2.0) -> str:
  """Plain words: does ``method`` (one fixed point) forget clearly less than ``reference``?

  Paired by seed against ``reference`` at the same base lr. "Clearly less":
  the mean forgetting difference is negative with t <= -``t_clear``. The
  downstream metric is "within noise" when |t| < ``t_clear`` or it is better.
  """
  spec = spec_of(res)
  methods = ok_methods(res)
  if method not in methods or reference not in methods:
    return f"{method} or {reference} did not run; no verdict."
  k = base_index(res, reference)
  d_forget = stats.paired(grid(methods[method], "forgetting")[0],
                          grid(methods[reference], "forgetting")[k])
  d_down = stats.paired(grid(methods[method], spec.y)[0], grid(methods[reference], spec.y)[k])
  digits = 1 if spec.higher else 3
  unit = "points" if spec.higher else "nats"
  fmt = lambda p: (f"{p['mean'] * spec.scale:+.{digits}f} ± {p['std'] * spec.scale:.{digits}f} "
                   f"{unit} (t={p['t']:.1f})")
  forgets_less = d_forget["mean"] < 0 and d_forget["t"] <= -t_clear
  better = d_down["mean"] >= 0 if spec.higher else d_down["mean"] <= 0
  down_ok = better or abs(d_down["t"]) < t_clear
  lines = [f"{method} vs {reference} at the same lr, paired by seed: forgetting "
           f"{fmt(d_forget)}, downstream {spec.y} {fmt(d_down)}."]
  if forgets_less and down_ok:
    lines.append("Verdict: at its defaults DualOpt forgets clearly less than Adam, and its "
                 "downstream result is within noise of Adam's (or better).")
  elif forgets_less:
    lines.append("Verdict: at its defaults DualOpt forgets clearly less than Adam, but its "
                 "downstream result is clearly worse.")
  else:
    lines.append("Verdict: at its defaults DualOpt does NOT forget clearly less than Adam here: "
                 "the difference is within the seed-to-seed noise.")
  return "\n".join(lines)
