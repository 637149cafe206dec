"""Figures (matplotlib, Agg backend): accuracy vs forgetting, per-layer drift."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_HIGHLIGHT = ("dualopt_block", "dualopt_tensor", "olor_ref")


def tradeoff(res: dict[str, Any], path: str, *, x_metric: str, y_metric: str, x_label: str,
             y_label: str, title: str, x_scale: float = 1.0, y_scale: float = 1.0) -> None:
  """One point per method (mean ± std over seeds at the chosen value); faint: its whole grid."""
  fig, ax = plt.subplots(figsize=(7.2, 5.2))
  names = list(res["methods"])
  cmap = plt.get_cmap("tab20")
  markers = "osD^vP*Xh<>p"
  lo, hi, x_hi = np.inf, -np.inf, 0.0
  for i, (name, e) in enumerate(res["methods"].items()):
    if e.get("status") != "ok":
      continue
    color = cmap(2 * (i % 10) + (i // 10)) if len(names) > 10 else cmap(2 * i)
    # Every grid value (seed means), faint and joined: the method's whole trade-off curve.
    gx = np.mean(np.asarray(e["grid_metrics"][x_metric], np.float64), axis=1) * x_scale
    gy = np.mean(np.asarray(e["grid_metrics"][y_metric], np.float64), axis=1) * y_scale
    ax.plot(gx, gy, "-", color=color, alpha=0.25, lw=1, marker=".", ms=4)
    xs, ys = e["selected"][x_metric], e["selected"][y_metric]
    marker = markers[i % len(markers)]
    ax.errorbar(xs["mean"] * x_scale, ys["mean"] * y_scale, xerr=xs["std"] * x_scale,
                yerr=ys["std"] * y_scale, fmt=marker, ms=9 if name in _HIGHLIGHT else 6,
                capsize=3, color=color, mec="k" if name in _HIGHLIGHT else color,
                label=f"{name} ({e['hp_name']}={e['selected_hp']:g})")
    lo = min(lo, (ys["mean"] - ys["std"]) * y_scale)
    hi = max(hi, (ys["mean"] + ys["std"]) * y_scale)
    x_hi = max(x_hi, (xs["mean"] + xs["std"]) * x_scale)
  if np.isfinite(lo) and np.isfinite(hi):
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)  # grid values far from the chosen ones fall outside
    ax.set_xlim(-0.05 * x_hi, 1.15 * x_hi)
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.set_title(title + "\n(faint: every grid value, seed means; frame fits the chosen points)",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def drift(res: dict[str, Any], path: str, *, methods: tuple[str, ...] = ("adam", "dualopt_block"),
          title: str = "") -> None:
  """Per-layer relative drift ||theta - theta0|| / ||theta0|| over fine-tuning."""
  present = [m for m in methods if res["methods"].get(m, {}).get("status") == "ok"]
  if not present:
    return
  groups = res["methods"][present[0]]["drift_groups"]
  fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 4.2), sharey=True,
                           squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
  for ax, name in zip(axes[0], present, strict=True):
    e = res["methods"][name]
    steps = np.asarray(e["drift_steps"])
    mean, std = np.asarray(e["drift_selected_mean"]), np.asarray(e["drift_selected_std"])
    for g, group in enumerate(e["drift_groups"]):
      ax.plot(steps, mean[:, g], color=colors[g], label=group)
      ax.fill_between(steps, mean[:, g] - std[:, g], mean[:, g] + std[:, g], color=colors[g],
                      alpha=0.2)
    ax.set_title(f"{name} ({e['hp_name']}={e['selected_hp']:g})", fontsize=10)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("||θ − θ0|| / ||θ0|| per layer")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
