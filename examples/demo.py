"""DualOpt evidence demo: the vision transfer benchmark (digits 0-4 -> 5-9).

``make demo`` (= ``python examples/demo.py``) runs the quick version -- shorter
training, the main methods (``DEMO_METHODS``), every grid value, 5 seeds --
in about three minutes on two CPU cores. It first says, in plain words,
whether ``dj.dualopt`` at its defaults forgot less than Adam at the same
learning rate, then prints the tables and writes, under ``--out`` (default
``results/demo``)::

  vision_transfer.json   full grid: every method x grid value x seed, config, timings
  vision_transfer.csv    one row per (method, grid value, seed)
  vision_transfer.md     the verdict and the tables (also printed)
  vision_curves.png      downstream vs upstream accuracy, one curve per method
  vision_drift.png       per-layer drift ||theta - theta0|| / ||theta0||, a panel per method

``--full`` runs the full protocol (5 seeds, longer training) and writes to
``results/``, over the committed run: ``git diff results/`` compares versions.
All four benchmarks (vision and language transfer, from-scratch vision and
language): ``python -m examples.evidence.run_all all``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evidence import run_all, vision  # noqa: E402

DEMO_METHODS = ("adam", "wise_ft", "l2sp_decoupled", "spd", "lp_ft", "dualopt_default",
                "dualopt_block", "uniform_rollback", "olor_ref")
QUICK = vision.VisionConfig(seeds=5, pretrain_steps=300, finetune_steps=150, batch=32, chunk=50,
                            methods=DEMO_METHODS)
FULL = vision.VisionConfig(seeds=5, pretrain_steps=600, finetune_steps=300, batch=32, chunk=50)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--full", action="store_true", help="full grid: 5 seeds, longer training")
  parser.add_argument("--out", default=None, help="output folder (default results/demo; "
                      "with --full results/, where the committed full run lies)")
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--methods", default=None, help="comma-separated subset of methods "
                      "(default: DEMO_METHODS quick, all with --full)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  cfg = FULL if args.full else QUICK
  if args.seeds:
    cfg.seeds = args.seeds
  if args.methods:
    cfg.methods = tuple(args.methods.split(","))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = args.out or (os.path.join(root, "results") if args.full else os.path.join(root, "results",
                                                                                "demo"))
  start = time.perf_counter()
  print(f"vision transfer benchmark ({'full' if args.full else 'quick'}): {cfg}")
  res = vision.run(cfg, progress=not args.no_progress)
  res["command"] = "python examples/demo.py" + (" --full" if args.full else "")
  print()
  print(run_all.report("vision", res, out))
  print(f"\nwrote {out}/vision_transfer.{{json,csv,md}}, vision_curves.png, vision_drift.png "
        f"({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
