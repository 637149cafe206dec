"""Figures (matplotlib, Agg backend): accuracy vs forgetting, per-layer drift."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import stats  # noqa: E402


def grid_curves(res: dict[str, Any], path: str, *, metric: str, y_label: str, title: str,
                y_scale: float = 1.0, skip: tuple[str, ...] = ("adam_no_decay",),
                reference: str | None = "adam_no_decay") -> None:
  """Metric vs the decay grid value, one line per method (mean ± std over seeds)."""
  fig, ax = plt.subplots(figsize=(7.2, 5.2))
  for name, e in res["methods"].items():
    if e.get("status") != "ok" or name in skip:
      continue
    vals = np.asarray(e["grid_metrics"][metric], np.float64) * y_scale
    style = "--" if "const" in name else "-"
    ax.errorbar(e["grid"], vals.mean(1), yerr=vals.std(1, ddof=1) if vals.shape[1] > 1 else None,
                fmt=style, marker="o", ms=4, capsize=2, label=name)
  ref = res["methods"].get(reference or "", {})
  if ref.get("status") == "ok":
    s = ref["selected"][metric]
    r = s["mean"] * y_scale
    ax.axhline(r, color="k", lw=1, ls=":", label=f"{reference} (chosen lr)")
    # Frame: around the reference, wide enough for every method's best grid value; collapsed
    # runs at extreme decay fall outside (they are in the JSON).
    best = [np.asarray(e["grid_metrics"][metric], np.float64).mean(1) * y_scale
            for n, e in res["methods"].items() if e.get("status") == "ok" and n not in skip]
    if best:
      pick = np.max if "acc" in metric else np.min
      width = max(max(abs(pick(b_) - r) for b_ in best), 1e-3)
      ax.set_ylim(r - 3 * width, r + 3 * width)
  ax.set_xscale("log")
  ax.set_xlabel("decay per step at peak lr")
  ax.set_ylabel(y_label)
  ax.set_title(title + "\n(frame centred on the no-decay baseline; collapsed runs may fall "
               "outside)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


ROLLBACK_FAMILY = ("dualopt_default", "dualopt_block", "dualopt_tensor", "dualopt_block_floor",
                   "uniform_rollback", "olor_ref")
REFERENCES = ("adam", "wise_ft")


def _curve(ax: Any, e: dict[str, Any], name: str, color: Any, x: str, y: str, scale: float,
           chosen: int | None) -> tuple[np.ndarray, np.ndarray]:
  gx = np.asarray(e["grid_metrics"][x], np.float64) * scale
  gy = np.asarray(e["grid_metrics"][y], np.float64) * scale
  mx, my = gx.mean(1), gy.mean(1)
  sx = gx.std(1, ddof=1) if gx.shape[1] > 1 else 0 * mx
  sy = gy.std(1, ddof=1) if gy.shape[1] > 1 else 0 * my
  ref = name in REFERENCES
  if len(mx) == 1:  # a method at fixed settings: one point, with its spread
    ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="P", ms=12, color=color, mec="k", capsize=3,
                label=f"{name} (fixed)", zorder=6)
    return mx, my
  ax.plot(mx, my, "--" if ref else "-", marker="o", ms=3.5, lw=2.2 if ref else 1.4,
          color=color, alpha=0.95, label=name)
  if chosen is not None:  # the spread over seeds, shown where it matters: the chosen point
    ax.errorbar(mx[chosen], my[chosen], xerr=sx[chosen], yerr=sy[chosen], fmt="*", ms=15,
                color=color, mec="k", mew=0.8, capsize=3, elinewidth=1, zorder=5)
  return mx, my


def curves(res: dict[str, Any], path: str, *, chosen: dict[str, int | None], spec: Any,
           title: str, x_label: str = "upstream retention: digits 0-4 test accuracy (%)",
           y_label: str = "downstream: digits 5-9 test accuracy (%)") -> None:
  """Downstream vs upstream curves, one per method over its grid (mean ± std over seeds).

  Two panels share the axes: the baselines a user would pick instead, and the
  rollback family; Adam and WiSE-FT (dashed) are drawn in both. Stars: the
  point chosen on validation under the retention constraint. ``spec`` (a
  ``curves.Spec``) names the metrics and which way is better; for losses the
  axes are inverted so that "better" is up and to the right on both.
  """
  x, y, scale = spec.x, spec.y, spec.scale
  ok = {n: e for n, e in res["methods"].items() if e.get("status") == "ok"}
  groups = [
    ("baselines", [n for n in ok if n not in ROLLBACK_FAMILY]),
    ("rollback family (DualOpt, OLOR, ablations)",
     [*[n for n in REFERENCES if n in ok], *[n for n in ROLLBACK_FAMILY if n in ok]]),
  ]
  cmap = plt.get_cmap("tab20")
  colors = {n: cmap(i % 20) for i, n in enumerate(ok)}
  fig, axes = plt.subplots(1, 2, figsize=(13.5, 5.6), sharex=True, sharey=True)
  all_x, all_y = [], []
  for ax, (label, names) in zip(axes, groups, strict=True):
    for n in names:
      mx, my = _curve(ax, ok[n], n, colors[n], x, y, scale, chosen.get(n))
      all_x.append(mx)
      all_y.append(my)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel(x_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower left")
    ax.text(0.02, 0.97, "better: up and to the right ↗", transform=ax.transAxes, fontsize=9,
            va="top", fontweight="bold")
  xs, ys = np.concatenate(all_x), np.concatenate(all_y)
  # The frame fits the curves' useful part: the downstream metric within a band of the best
  # (15 points of accuracy, or 0.5 nats of loss); collapsed grid values, e.g. far too strong a
  # pull, fall outside and are in the JSON.
  band = 15.0 if spec.higher else 0.5
  best = np.nanmax(ys) if spec.higher else np.nanmin(ys)
  worst = max(np.nanmin(ys), best - band) if spec.higher else min(np.nanmax(ys), best + band)
  inside = (ys >= worst) if spec.higher else (ys <= worst)
  xs = xs[inside] if inside.any() else xs
  pad_y, pad_x = 0.04 * abs(best - worst) + 1e-3, 0.04 * (np.nanmax(xs) - np.nanmin(xs)) + 1e-3
  if spec.higher:
    axes[0].set_ylim(worst - pad_y, best + pad_y)
    axes[0].set_xlim(np.nanmin(xs) - pad_x, np.nanmax(xs) + pad_x)
  else:  # losses: inverted axes, so better is still up and to the right
    axes[0].set_ylim(worst + pad_y, best - pad_y)
    axes[0].set_xlim(np.nanmax(xs) + pad_x, np.nanmin(xs) - pad_x)
  axes[0].set_ylabel(y_label)
  fig.suptitle(title + "\nlines: seed means over each method's grid; ★ with ± std: chosen on "
               "validation under the retention constraint", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def drift_panels(res: dict[str, Any], path: str, *, methods: tuple[str, ...],
                 chosen: dict[str, int | None], title: str = "") -> None:
  """Per-layer drift over fine-tuning, one panel per method at its chosen grid value.

  Same y-range on every panel, one shared legend (layers, input to output).
  """
  present = [m for m in methods if res["methods"].get(m, {}).get("status") == "ok"
             and "drift_grid_mean" in res["methods"][m]]
  if not present:
    return
  groups = res["methods"][present[0]]["drift_groups"]
  cols = min(4, len(present))
  rows = -(-len(present) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.6), sharey=True,
                           sharex=True, squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
  lines = []
  for ax, name in zip(axes.flat, present, strict=False):
    e = res["methods"][name]
    k = chosen.get(name)
    k = e["selected_index"] if k is None else k
    steps = np.asarray(e["drift_steps"])
    mean = np.asarray(e["drift_grid_mean"])[k]
    std = np.asarray(e["drift_grid_std"])[k]
    lines = []
    for g, group in enumerate(e["drift_groups"]):
      (line,) = ax.plot(steps, mean[:, g], color=colors[g], label=group)
      lines.append(line)
      ax.fill_between(steps, np.maximum(mean[:, g] - std[:, g], 1e-4), mean[:, g] + std[:, g],
                      color=colors[g], alpha=0.2)
    ax.set_title(f"{name} ({stats.setting(e, k)})", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  for ax in axes.flat[len(present):]:
    ax.axis("off")
  for ax in axes[-1]:
    ax.set_xlabel("step")
  for ax in axes[:, 0]:
    ax.set_ylabel("||θ − θ0|| / ||θ0||")
  fig.legend(lines, groups, loc="lower center", ncol=len(groups), fontsize=8,
             title="layer (input → output)", title_fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.08, 1, 0.97))
  fig.savefig(path, dpi=120)
  plt.close(fig)
