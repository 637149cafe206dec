"""Paired comparisons against the reference method, from committed results JSON.

``python -m examples.evidence.summarize results`` prints, per benchmark, each
method's per-seed difference to the reference at both methods' chosen
hyper-parameters (same seed = same pre-trained model, head init and batch
order, so the differences are paired): mean ± std and t = mean / (std/√n).
"""

from __future__ import annotations

import json
import os
import sys

from . import stats

SPECS = {
  "vision_transfer.json": ("adam", (("down_test_acc", 100, 1), ("forgetting", 100, 1))),
  "language_transfer.json": ("adam", (("down_test_loss", 1, 3), ("forgetting", 1, 3))),
  "scratch_vision.json": ("adam_no_decay", (("test_acc", 100, 1),)),
  "scratch_language.json": ("adam_no_decay", (("test_loss", 1, 3),)),
}


def paired_table(res: dict, reference: str, metrics: tuple) -> str:
  ref = res["methods"][reference]
  header = ["method", *(f"Δ {m} vs {reference}" for m, _, _ in metrics)]
  rows = []
  for name, e in res["methods"].items():
    if e.get("status") != "ok" or name == reference:
      continue
    cells = []
    for m, scale, digits in metrics:
      d = stats.paired(e["selected"][m]["values"], ref["selected"][m]["values"])
      cells.append(f"{stats.fmt(d, scale, digits)} (t={d['t']:.1f})")
    rows.append([name, *cells])
  return stats.table(rows, header)


def main(argv: list[str] | None = None) -> int:
  folder = (argv or sys.argv[1:] or ["results"])[0]
  for fname, (reference, metrics) in SPECS.items():
    path = os.path.join(folder, fname)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      res = json.load(f)
    print(f"\n== {fname} (n = {len(res['seeds'])} seeds, paired by seed)")
    print(paired_table(res, reference, metrics))
  return 0


if __name__ == "__main__":
  sys.exit(main())
