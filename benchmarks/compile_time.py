"""Compile time of the full optimizer step vs the number of parameter leaves.

For trees of 10 to 5,000 leaves (transformer-shaped, ``1 + 7 * n_layers``
leaves of small size, so the time is the per-leaf cost of tracing, lowering
and XLA compilation), measures for each method ``jax.jit(step,
donate_argnums=(0, 1)).lower(params, state, grads)`` (trace + lower, which
includes building the per-leaf depth profile) and ``.compile()``, with the
state from ``jax.eval_shape(tx.init, params)``. Methods are interleaved; each
value is the minimum over ``--reps`` repetitions (a fresh transformation each
time, so no cache is hit).

Usage::

  nice -n 10 .venv/bin/python benchmarks/compile_time.py
  .venv/bin/python benchmarks/compile_time.py --leaves 2000 --methods adamw dualopt_ft
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _trees  # noqa: E402
import jax  # noqa: E402
from step_time import RESULTS, device_name  # noqa: E402

DEFAULT_LEAVES = (10, 100, 500, 2000, 5000)


def measure(spec: _trees.TreeSpec, method: _trees.Method) -> dict[str, float]:
  params = _trees.shape_structs(spec)
  tx = method.make(spec)
  t0 = time.perf_counter()
  state = jax.eval_shape(tx.init, params)
  t1 = time.perf_counter()
  lowered = jax.jit(_trees.make_step(tx), donate_argnums=(0, 1)).lower(params, state, params)
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return {"init_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t1}


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = [
    "| leaves | method | trace+lower s | XLA compile s | total s | x adamw (total) |",
    "|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['n_leaves']} | {r['method']} | {r['lower_s']:.3f} | {r['compile_s']:.3f} | "
      f"{r['total_s']:.3f} | {r['ratio_to_adamw']:.2f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--leaves", nargs="*", type=int, default=None,
                  help=f"leaf counts (default {' '.join(map(str, DEFAULT_LEAVES))})")
  ap.add_argument("--methods", nargs="*", help=f"default: {' '.join(_trees.DEFAULT_METHODS)}")
  ap.add_argument("--reps", type=int, default=1)
  ap.add_argument("--tiny", action="store_true", help="10 and 30 leaves, 1 rep (smoke test)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args(argv)
  leaves = (10, 30) if args.tiny else (args.leaves or DEFAULT_LEAVES)
  reps = 1 if args.tiny else args.reps
  methods, notes = _trees.select_methods(args.methods)
  print(f"device: {device_name()}; jax {jax.__version__}")
  for note in notes:
    print(f"note: {note}")
  measure(_trees.spec_with_leaves(8), methods[0])  # warm up XLA (first compile is slower)
  rows: list[dict[str, Any]] = []
  for n in leaves:
    spec = _trees.spec_with_leaves(n)
    best: dict[str, dict[str, float]] = {}
    for _ in range(reps):
      for m in methods:
        t = measure(spec, m)
        if m.name not in best or t["total_s"] < best[m.name]["total_s"]:
          best[m.name] = t
    size_rows = []
    for m in methods:
      size_rows.append(
        {
          "n_leaves": spec.n_leaves,
          "method": m.name,
          **best[m.name],
          "ratio_to_adamw": best[m.name]["total_s"] / best["adamw"]["total_s"],
        }
      )
    print(format_table(size_rows).split("\n", 2)[2] if rows else format_table(size_rows))
    sys.stdout.flush()
    rows += size_rows
  table = format_table(rows)
  if not args.no_write:
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else "cpu"
    cmd = "python benchmarks/compile_time.py " + " ".join(
      argv if argv is not None else sys.argv[1:]
    )
    meta = {"device": device_name(), "jax": jax.__version__, "command": cmd, "notes": notes,
            "rows": rows}
    (out / f"compile_time_{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / f"compile_time_{tag}.md").write_text(
      f"Device: {meta['device']}, jax {meta['jax']}. Command: `{cmd}`\n\n"
      + "".join(f"Note: {n}\n\n" for n in notes) + table + "\n"
    )
  return rows


if __name__ == "__main__":
  main()
