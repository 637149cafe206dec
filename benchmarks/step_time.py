"""Step time of a jitted, donated full optimizer step (update + apply_updates).

Every method runs on the same transformer-shaped f32 parameter tree
(``benchmarks/_trees.py``, 169 leaves for 24 blocks). Methods are interleaved
in one process: each round runs a block of steps of every method in turn, and
the reported time is the median over rounds of the per-step block time.

For each method the table gives the median step time, the ratio to
``optax.adamw`` measured in the same rounds, the effective bandwidth
``ideal_bytes_per_param * n_params / time`` (adamw: 28 B/param, fine-tune
rollback +4 with an f32 anchor or +2 with a bf16 anchor, scratch +0), and that
bandwidth as a fraction of a measured device copy (``x + 1`` on a donated f32
buffer of 4x the tree's size (at most 4 GiB), adamw's working set, counted as
8 B/element). "x adamw" is the median over rounds of the within-round ratio;
"x adamw (min)" the ratio of the fastest blocks, "x adamw (CPU time)" the
same median ratio of process CPU time (all threads; CPU backend only, on a GPU
read the wall-time columns), which on a shared CPU
does not count time slices lost to other processes.

Usage::

  nice -n 10 .venv/bin/python benchmarks/step_time.py            # CPU sizes, <= 3 min
  .venv/bin/python benchmarks/step_time.py --large               # 92M, 335M, 1.27B (GPU)
  .venv/bin/python benchmarks/step_time.py --sizes 21M --methods adamw dualopt_ft
  .venv/bin/python benchmarks/step_time.py --scanned --methods adamw dualopt_ft spd

``--scanned`` runs the same models with their blocks stacked along a leading
axis (the ``nn.scan``/``nnx.scan`` layout: 8 leaves instead of 169; the
depths are per slice, detected as ``stacked``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _trees  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  if d.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
  return f"{d.platform} {kind}"


def _block(tree: Any) -> None:
  jax.block_until_ready(tree)


def copy_bandwidth(n_elems: int, *, reps: int = 7) -> float:
  """Bytes/s of ``x + 1`` on a donated f32 buffer (read + write = 8 B per element)."""
  f = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  x = jnp.zeros((n_elems,), jnp.float32)
  x = f(x)
  _block(x)
  times = []
  for _ in range(reps):
    k = 3
    t0 = time.perf_counter()
    for _ in range(k):
      x = f(x)
    _block(x)
    times.append((time.perf_counter() - t0) / k)
  del x
  return 8.0 * n_elems / statistics.median(times)


def _fresh(tree: Any) -> Any:
  """A copy of the params (the donated step consumes its inputs)."""
  return jax.tree.map(jnp.copy, tree)


def bench_size(
  spec: _trees.TreeSpec,
  methods: list[_trees.Method],
  *,
  rounds: int,
  target_block_s: float,
  max_steps: int,
  keep_states: bool = True,
  log=print,
) -> list[dict[str, Any]]:
  """Median step time of every method on one tree size, interleaved.

  Each step is compiled first (``compile_s``; XLA's bytes, temporaries from the compiled
  step); round 0 warms up and times each method; one block length for all (about
  ``target_block_s`` for the fastest); each later round times one block of every method in
  turn, in an order rotated by one every round. With ``keep_states`` every
  method keeps its params and state between rounds (fast); without, they are
  rebuilt each round so that only one method's state is alive at a time (for
  trees near the device's memory).
  """
  base = _trees.make_params(spec)
  grads = _trees.make_grads(base)
  n = spec.n_params
  # Same working set as adamw's step (params, grads, two moments): same cache level. Capped at
  # 2^30 elements (4 GiB), far beyond any cache, so that 1.27B params do not need a 20 GB buffer.
  copy_bw = copy_bandwidth(min(4 * n, 2**30))
  txs = {m.name: m.make(spec) for m in methods}
  steps, compile_s = {}, {}
  for m in methods:
    t0 = time.perf_counter()
    steps[m.name] = (
      jax.jit(_trees.make_step(txs[m.name]), donate_argnums=(0, 1))
      .lower(base, jax.eval_shape(txs[m.name].init, base), grads)
      .compile()
    )
    compile_s[m.name] = time.perf_counter() - t0
  compiled_stats = {m.name: _compiled_stats(steps[m.name], n) for m in methods}
  per_block: dict[str, Any] = {}
  times: dict[str, list[float]] = {m.name: [] for m in methods}
  cpu_times: dict[str, list[float]] = {m.name: [] for m in methods}
  faults: dict[str, list[float]] = {m.name: [] for m in methods}
  first_call_s: dict[str, float] = {}
  live: dict[str, Any] = {}
  for r in range(rounds + 1):
    # Rotate the order every round so that no method always runs first (or after the same one).
    shift = r % len(methods)
    order = methods[shift:] + methods[:shift]
    for m in order:
      if m.name in live:
        params, state = live.pop(m.name)
      else:
        params = _fresh(base)
        state = txs[m.name].init(params)
        _block(state)
      if r == 0:
        t0 = time.perf_counter()
        params, state = steps[m.name](params, state, grads)
        _block(params)
        first_call_s[m.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(2):
          params, state = steps[m.name](params, state, grads)
        _block(params)
        per_block[m.name] = (time.perf_counter() - t0) / 2  # calibration, replaced below
      else:
        if r == 1 and m is order[0]:
          # One block length for every method (from the fastest calibration step), so that the
          # per-block synchronisation is amortised the same way for all of them.
          fastest = min(per_block.values())
          k_all = int(max(1, min(max_steps, target_block_s / max(fastest, 1e-6))))
          per_block = dict.fromkeys(per_block, k_all)
        if not keep_states:
          params, state = steps[m.name](params, state, grads)  # untimed warm-up after init
          _block(params)
        k = per_block[m.name]
        f0 = _minor_faults()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(k):
          params, state = steps[m.name](params, state, grads)
        _block((params, state))
        times[m.name].append((time.perf_counter() - t0) / k)
        cpu_times[m.name].append((time.process_time() - c0) / k)
        faults[m.name].append((_minor_faults() - f0) / k)
      if keep_states:
        live[m.name] = (params, state)
      del params, state
  live.clear()
  rows = []
  adamw_t = times["adamw"]
  for m in methods:
    t = statistics.median(times[m.name])
    # Ratio within each round (same machine load), then the median over rounds.
    ratios = [a / b for a, b in zip(times[m.name], adamw_t, strict=True)]
    cpu_ratios = [a / b for a, b in zip(cpu_times[m.name], cpu_times["adamw"], strict=True)]
    bw = m.ideal_bytes * n / t
    rows.append(
      {
        "size": spec.name,
        "n_params": n,
        "n_leaves": spec.n_leaves,
        "method": m.name,
        "note": m.note,
        "median_ms": 1e3 * t,
        "min_ms": 1e3 * min(times[m.name]),
        "ratio_to_adamw": statistics.median(ratios),
        "ratio_of_mins": min(times[m.name]) / min(adamw_t),
        # Process CPU time (all threads): what the step costs this process, insensitive to
        # time slices lost to other processes on a shared machine (meaningful on CPU only).
        "cpu_ms": 1e3 * statistics.median(cpu_times[m.name]),
        "ratio_cpu_time": statistics.median(cpu_ratios),
        "ideal_bytes_per_param": m.ideal_bytes,
        "eff_bandwidth_GBps": bw / 1e9,
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "frac_of_copy": bw / copy_bw,
        "steps_per_round": per_block[m.name],
        "rounds": rounds,
        "compile_s": compile_s[m.name],
        "first_call_s": first_call_s[m.name],  # the first execution, after compile_s
        "page_faults_per_step": statistics.median(faults[m.name]),
        **compiled_stats[m.name],
      }
    )
  log(format_table(rows))
  return rows


def _minor_faults() -> int:
  """Minor page faults of this process so far (a step that maps fresh memory each time)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _compiled_stats(compiled: Any, n_params: int) -> dict[str, float]:
  """XLA's bytes accessed per parameter and temporary buffer size of the compiled step."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return {
    "xla_bytes_per_param": float(cost.get("bytes accessed", float("nan"))) / n_params,
    "temp_MB": float("nan") if memory is None else memory.temp_size_in_bytes / 1e6,
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  head = (
    "| size | params | leaves | method | median ms | x adamw | x adamw (min) | "
    "x adamw (CPU time) | B/param | eff. GB/s | copy GB/s | % of copy | XLA B/param | "
    "temp MB | page faults/step |\n"
    "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  )
  lines = [head]
  for r in rows:
    lines.append(
      f"| {r['size']} | {r['n_params'] / 1e6:.1f}M | {r['n_leaves']} | {r['method']} | "
      f"{r['median_ms']:.3f} | {r['ratio_to_adamw']:.3f} | {r['ratio_of_mins']:.3f} | "
      f"{r['ratio_cpu_time']:.3f} | "
      f"{r['ideal_bytes_per_param']:.0f} | "
      f"{r['eff_bandwidth_GBps']:.1f} | {r['copy_bandwidth_GBps']:.1f} | "
      f"{100 * r['frac_of_copy']:.0f} | {r['xla_bytes_per_param']:.1f} | {r['temp_MB']:.1f} | "
      f"{r['page_faults_per_step']:.0f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--large", action="store_true", help="GPU sizes: 92M, 335M, 1.27B params")
  ap.add_argument("--tiny", action="store_true", help="a tiny tree (smoke test)")
  ap.add_argument("--sizes", nargs="*", help="size names to run (default: all of the set)")
  ap.add_argument("--methods", nargs="*", help=f"default: {' '.join(_trees.DEFAULT_METHODS)}")
  ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
  ap.add_argument("--block-s", type=float, default=None, help="seconds per timed block")
  ap.add_argument("--max-steps", type=int, default=50, help="max steps per timed block")
  ap.add_argument("--low-memory", action="store_true",
                  help="rebuild params/state every round (default with --large)")
  ap.add_argument("--scanned", action="store_true",
                  help="the same models with their blocks stacked (nn.scan layout, 8 leaves)")
  ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
  ap.add_argument("--no-write", action="store_true", help="print only")
  args = ap.parse_args(argv)

  sizes = _trees.TINY_SIZES if args.tiny else (
    _trees.LARGE_SIZES if args.large else _trees.CPU_SIZES
  )
  if args.sizes:
    sizes = tuple(s for s in sizes if s.name in args.sizes)
  if args.scanned:
    sizes = tuple(s.layout for s in sizes)
  rounds = args.rounds or (1 if args.tiny else 15)
  block_s = args.block_s or (0.01 if args.tiny else 0.06)
  methods, notes = _trees.select_methods(args.methods)
  print(f"device: {device_name()}; jax {jax.__version__}")
  for note in notes:
    print(f"note: {note}")
  rows: list[dict[str, Any]] = []
  for spec in sizes:
    print(f"\n== {spec.name}: {spec.n_params / 1e6:.1f}M params, {spec.n_leaves} leaves ==")
    rows += bench_size(
      spec, methods, rounds=rounds, target_block_s=block_s, max_steps=args.max_steps,
      keep_states=not (args.low_memory or args.large),
    )
  if not args.no_write:
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    tag = ("tiny" if args.tiny else ("large" if args.large else "cpu")) + (
      "_scanned" if args.scanned else ""
    )
    meta = {
      "device": device_name(),
      "jax": jax.__version__,
      "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
      "notes": notes,
      "rows": rows,
    }
    (out / f"step_time_{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / f"step_time_{tag}.md").write_text(
      f"Device: {meta['device']}, jax {meta['jax']}. Command: `{meta['command']}`\n\n"
      + "".join(f"Note: {n}\n\n" for n in notes)
      + format_table(rows)
      + "\n"
    )
    print(f"\nwrote {out / f'step_time_{tag}.md'}")
  return rows


if __name__ == "__main__":
  main()
