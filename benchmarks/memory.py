"""Optimizer-state bytes and compiled step memory, per method.

1. State bytes (from ``jax.eval_shape(tx.init, params)``, nothing allocated):
   must equal the two Adam moments (f32) plus the anchor at its dtype (none
   for adamw and scratch mode); everything else must be tiny (step counters),
   never param-sized. Printed and checked; the script exits non-zero when a
   method stores more.
2. Compiled step memory: ``jax.jit(step, donate_argnums=(0, 1)).lower(...)
   .compile().memory_analysis()`` for the full step (update + apply_updates),
   temporaries compared with adamw's.
3. Memory traffic of the compiled step: XLA's ``cost_analysis()["bytes
   accessed"]`` (operands + results of every fused kernel) per parameter and
   its ratio to adamw's. Unlike a timing this does not depend on machine load;
   for a memory-bound step it predicts the time ratio.

Compiling needs no parameter memory, so large trees can be analysed on a CPU.

Usage::

  nice -n 10 .venv/bin/python benchmarks/memory.py              # 21M and 335M trees
  .venv/bin/python benchmarks/memory.py --sizes 1.27B
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _trees  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from step_time import RESULTS, device_name  # noqa: E402

ANCHOR_BYTES = {  # bytes per parameter of the anchor each method must store
  "adamw": 0,
  "dualopt_ft": 4,
  "dualopt_ft_bf16": 2,
  "dualopt_scratch": 0,
  "olor": 4,
  "spd": 4,
  "chain_ft": 4,
  "chain_ft_bf16": 2,
  "chain_scratch": 0,
}


def _sizes() -> dict[str, _trees.TreeSpec]:
  return {s.name: s for s in _trees.CPU_SIZES + _trees.LARGE_SIZES + _trees.TINY_SIZES}


def analyse(spec: _trees.TreeSpec, method: _trees.Method) -> dict[str, Any]:
  params = _trees.shape_structs(spec)
  n = spec.n_params
  tx = method.make(spec)
  state = jax.eval_shape(tx.init, params)
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]
  state_bytes = _trees.tree_bytes(state)
  expected = 8 * n + ANCHOR_BYTES.get(method.name, 0) * n
  largest_param = max(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  # Anything of at least the smallest kernel's size that is not moment/anchor is "param-sized".
  other = state_bytes - expected
  small = sum(
    int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in leaves
    if int(np.prod(x.shape)) < spec.d_model
  )
  step = jax.jit(_trees.make_step(tx), donate_argnums=(0, 1))
  compiled = step.lower(params, state, params).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  accessed = (cost or {}).get("bytes accessed")
  return {
    "size": spec.name,
    "n_params": n,
    "method": method.name,
    "state_bytes": state_bytes,
    "expected_state_bytes": expected,
    "other_state_bytes": other,
    "small_state_bytes": small,
    "state_ok": other == small and other < 64 * len(leaves) + 64,
    "n_state_leaves": len(leaves),
    "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
    "argument_bytes": int(mem.argument_size_in_bytes) if mem is not None else None,
    "output_bytes": int(mem.output_size_in_bytes) if mem is not None else None,
    "alias_bytes": int(mem.alias_size_in_bytes) if mem is not None else None,
    "largest_param_bytes": 4 * largest_param,
    "hlo_bytes_accessed": None if accessed is None else float(accessed),
    "hlo_bytes_per_param": None if accessed is None else float(accessed) / n,
    "ideal_bytes_per_param": method.ideal_bytes,
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = [
    "| size | method | state MB | moments+anchor MB | other state B | state ok | "
    "step temp MB | temp - adamw MB | temp / param bytes | aliased MB | "
    "HLO B/param | x adamw (HLO bytes) |",
    "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  base = {r["size"]: r["temp_bytes"] for r in rows if r["method"] == "adamw"}
  base_b = {r["size"]: r["hlo_bytes_per_param"] for r in rows if r["method"] == "adamw"}
  for r in rows:
    temp = r["temp_bytes"]
    extra = None if temp is None or base.get(r["size"]) is None else temp - base[r["size"]]
    temp_s = "-" if temp is None else f"{temp / 1e6:.3f}"
    extra_s = "-" if extra is None else f"{extra / 1e6:+.3f}"
    frac_s = "-" if temp is None else f"{temp / (4 * r['n_params']):.4f}"
    alias_s = "-" if r["alias_bytes"] is None else f"{r['alias_bytes'] / 1e6:.1f}"
    hb = r["hlo_bytes_per_param"]
    hb_s = "-" if hb is None else f"{hb:.1f}"
    hr_s = "-" if hb is None or not base_b.get(r["size"]) else f"{hb / base_b[r['size']]:.3f}"
    lines.append(
      f"| {r['size']} | {r['method']} | {r['state_bytes'] / 1e6:.2f} | "
      f"{r['expected_state_bytes'] / 1e6:.2f} | {r['other_state_bytes']} | "
      f"{'yes' if r['state_ok'] else 'NO'} | {temp_s} | {extra_s} | {frac_s} | {alias_s} | "
      f"{hb_s} | {hr_s} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", nargs="*", default=None, help="default: 21M 335M")
  ap.add_argument("--tiny", action="store_true", help="the tiny tree (smoke test)")
  ap.add_argument("--methods", nargs="*", help=f"default: {' '.join(_trees.DEFAULT_METHODS)}")
  ap.add_argument("--out", default=None)
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args(argv)
  names = ["tiny"] if args.tiny else (args.sizes or ["21M", "335M"])
  specs = [_sizes()[n] for n in names]
  methods, notes = _trees.select_methods(args.methods)
  print(f"device: {device_name()}; jax {jax.__version__}")
  for note in notes:
    print(f"note: {note}")
  rows = [analyse(s, m) for s in specs for m in methods]
  table = format_table(rows)
  print(table)
  bad = [r for r in rows if not r["state_ok"]]
  for r in bad:
    print(
      f"FAIL: {r['method']} at {r['size']} stores {r['other_state_bytes']} bytes beyond "
      f"moments + anchor"
    )
  if not args.no_write:
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else "cpu"
    cmd = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"device": device_name(), "jax": jax.__version__, "command": cmd, "notes": notes,
            "rows": rows}
    (out / f"memory_{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / f"memory_{tag}.md").write_text(
      f"Device: {meta['device']}, jax {meta['jax']}. Command: `{cmd}`\n\n"
      + "".join(f"Note: {n}\n\n" for n in notes) + table + "\n"
    )
  if bad and argv is None:
    sys.exit(1)
  return rows


if __name__ == "__main__":
  main()
