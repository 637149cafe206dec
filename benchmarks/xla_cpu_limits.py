"""Probes behind BUILD_NOTES.md "Performance (issue 14)": what XLA:CPU itself costs, in raw JAX.

Not library code. Three measurements, each against a plain Adam step written here:

* ``buffers``: step time of Adam with k x (one extra donated state buffer per leaf), passed
  through unchanged -- the per-buffer dispatch cost that bounds a per-leaf anchor on small models.
* ``compile``: compile time of Adam alone, with a passed-through anchor, with the anchor read in
  the update (what ``rollback_to`` adds), and read but not returned.
* ``spd``: forms of SPD's per-tensor sums (all exact to ``dj.spd``): XLA bytes accessed per
  parameter, the compiled step's temporary buffer, page faults per step, CPU time x adamw.

Usage::

  .venv/bin/python benchmarks/xla_cpu_limits.py                # all three, about 4 min
  .venv/bin/python benchmarks/xla_cpu_limits.py --probe spd --size 21M
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import time
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _trees  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dualopt_jax as dj  # noqa: E402


def _adam(p, m, v, g):
  m2 = 0.9 * m + 0.1 * g
  v2 = 0.999 * v + 0.001 * g * g
  return p - 1e-4 * m2 / (jnp.sqrt(v2) + 1e-8), m2, v2


def _adam_all(state, grads):
  out = [_adam(*x) for x in zip(*state[:3], grads, strict=True)]
  return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def _interleaved_ms(cases: dict[str, tuple[Any, Any]], grads: Any, rounds: int, steps: int):
  """Median ms per step of ``step(state, grads) -> state`` for each case, rounds interleaved."""
  live = {}
  for name, (fn, state) in cases.items():
    step = jax.jit(fn, donate_argnums=0)
    state = jax.tree.map(jnp.copy, state)
    for _ in range(5):
      state = step(state, grads)
    live[name] = [step, state]
  times: dict[str, list[float]] = {name: [] for name in cases}
  for _ in range(rounds):
    for name, entry in live.items():
      step, state = entry
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      for _ in range(steps):
        state = step(state, grads)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t0) / steps * 1e3)
      entry[1] = state
  return {name: statistics.median(t) for name, t in times.items()}


def probe_buffers(spec: _trees.TreeSpec, rounds: int) -> None:
  leaves = jax.tree.leaves(_trees.make_params(spec))
  grads = [0.1 * x for x in leaves]
  zeros = [jnp.zeros_like(x) for x in leaves]

  def passing(k: int):
    return lambda s, g: (*_adam_all(s, g), s[3]) if k else _adam_all(s, g)

  cases = {
    f"adam + {k} x {len(leaves)} passed-through buffers": (
      passing(k), (leaves, zeros, zeros, [list(leaves) for _ in range(k)]) if k else
      (leaves, zeros, zeros)
    )
    for k in (0, 1, 2, 4)
  }
  ms = _interleaved_ms(cases, grads, rounds, steps=100)
  print(f"\n{spec.name}, {len(leaves)} leaves: ms per step (median of {rounds} rounds)")
  base = ms[next(iter(ms))]
  for name, t in ms.items():
    print(f"  {name:44s} {t:7.3f}  x{t / base:.2f}")


def probe_compile(n_leaves: int) -> None:
  leaves = jax.tree.leaves(_trees.shape_structs(_trees.spec_with_leaves(n_leaves)))

  def pulled(s, g):
    p, m, v = _adam_all(s, g)
    return [x - 0.01 * (x - a) for x, a in zip(p, s[3], strict=True)], m, v

  cases = {
    "adam": (_adam_all, (leaves,) * 3),
    "+ anchor passed through": (lambda s, g: (*_adam_all(s, g), s[3]), (leaves,) * 4),
    "+ anchor read, returned": (lambda s, g: (*pulled(s, g), s[3]), (leaves,) * 4),
    "+ anchor read, not returned": (pulled, (leaves,) * 4),
  }
  print(f"\ncompile, {len(leaves)} leaves (trace+lower s, XLA compile s, total x adam)")
  base = None
  for name, (fn, state) in cases.items():
    returns_state = len(jax.eval_shape(fn, state, leaves)) == len(state)
    donate = (0,) if returns_state else ()  # nothing to alias when the anchor is not returned
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(state, leaves)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    base = base or (t2 - t0)
    print(f"  {name:30s} {t1 - t0:6.2f} {t2 - t1:6.2f}  x{(t2 - t0) / base:.2f}")


class _ProtoState(NamedTuple):
  inner: Any
  anchor: Any


def _sums(form: str, g, prev, u):
  cand = prev + u
  if form == "three sums":
    return jnp.sum(g * prev), jnp.sum(prev * prev), jnp.sum(cand * cand)
  if form == "variadic reduce":
    zero = jnp.zeros((), prev.dtype)
    return jax.lax.reduce(
      (g * prev, prev * prev, cand * cand), (zero,) * 3,
      lambda x, y: tuple(a + b for a, b in zip(x, y, strict=True)), tuple(range(prev.ndim)),
    )
  if form == "stacked (..., 3)":
    s = jnp.sum(jnp.stack([g * prev, prev * prev, cand * cand], -1), tuple(range(prev.ndim)))
    return s[0], s[1], s[2]
  if form == "column partial sums":
    axes = tuple(range(prev.ndim - 1))
    total = (lambda x: jnp.sum(jnp.sum(x, axis=axes))) if axes else jnp.sum
    return total(g * prev), total(prev * prev), total(cand * cand)
  raise ValueError(form)


SPD_FORMS = ("three sums", "variadic reduce", "stacked (..., 3)", "column partial sums")


def proto_spd(form: str, lr: float = _trees.LR, strength: float = 1.0):
  """SPD over ``optax.adam(lr)`` with the per-tensor sums written as ``form``."""
  inner = optax.adam(lr)

  def init(params):
    return _ProtoState(inner.init(params), jax.tree.map(lambda x: jnp.array(x, copy=True), params))

  def update(grads, state, params):
    u, inner_state = inner.update(grads, state.inner, params)

    def leaf(u, g, p, a):
      prev = p - a
      gp, pp, cc = _sums(form, g, prev, u)
      n_cand, n_prev = jnp.sqrt(cc), jnp.sqrt(pp)
      ratio = jnp.where(n_cand > 0, (n_cand - n_prev) / jnp.where(n_cand > 0, n_cand, 1.0), 0.0)
      factor = jnp.where(-gp < 0, strength * jnp.clip(ratio, 0.0, 1.0), 0.0)
      return u - factor * (prev + u)

    new = jax.tree.map(leaf, u, grads, params, state.anchor)
    return new, _ProtoState(inner_state, state.anchor)

  return optax.GradientTransformation(init, update)


def check_spd_forms() -> None:
  """Five steps of every form equal ``dj.spd``'s to float32 rounding."""
  params = _trees.make_params(_trees.TreeSpec("check", d_model=16, n_layers=2, vocab=32))
  results = []
  for tx in (dj.spd(optax.adam(1e-2), strength=1.0), *(proto_spd(f, 1e-2) for f in SPD_FORMS)):
    p, s = params, tx.init(params)
    for i in range(5):
      g = jax.tree.map(lambda x, i=i: -(x + 0.01 * (i + 1)), p)  # away from the anchor: gate open
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    results.append(p)
  for other in results[1:]:
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


def probe_spd(spec: _trees.TreeSpec, rounds: int) -> None:
  check_spd_forms()
  params = _trees.make_params(spec)
  grads = _trees.make_grads(params)
  txs = {"adamw": optax.adamw(_trees.LR), "dj.spd": dj.spd(optax.adam(_trees.LR), strength=1.0)}
  txs.update({f: proto_spd(f) for f in SPD_FORMS})
  live, stats = {}, {}
  for name, tx in txs.items():
    compiled = jax.jit(_trees.make_step(tx), donate_argnums=(0, 1)).lower(
      params, jax.eval_shape(tx.init, params), grads).compile()
    text = compiled.as_text()
    stats[name] = (
      compiled.cost_analysis()["bytes accessed"] / spec.n_params,
      compiled.memory_analysis().temp_size_in_bytes / 1e6,
      len(re.findall(r"= \S+ fusion\(", text[text.index("ENTRY"):])),
    )
    p = jax.tree.map(jnp.copy, params)
    live[name] = [compiled, p, tx.init(p)]
  cpu: dict[str, list[float]] = {n: [] for n in txs}
  faults: dict[str, list[float]] = {n: [] for n in txs}
  for _ in range(rounds):
    for name, entry in live.items():
      step, p, s = entry
      jax.block_until_ready(p)
      f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
      for _ in range(10):
        p, s = step(p, s, grads)
      jax.block_until_ready(p)
      cpu[name].append(time.process_time() - c0)
      faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
      entry[1], entry[2] = p, s
  print(f"\nSPD forms at {spec.name} ({spec.n_leaves} leaves); all match dj.spd")
  print("| form | XLA B/param | temp MB | fusions | page faults/step | x adamw (CPU time) |")
  print("|---|---:|---:|---:|---:|---:|")
  base = statistics.median(cpu["adamw"])
  for name in txs:
    b, temp, fusions = stats[name]
    print(f"| {name} | {b:.1f} | {temp:.1f} | {fusions} | {statistics.median(faults[name]):.0f} | "
          f"{statistics.median(cpu[name]) / base:.2f} |")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--probe", nargs="*", default=["buffers", "compile", "spd"])
  ap.add_argument("--size", default="5.3M", help="tree for the spd probe (buffers uses 0.4M)")
  ap.add_argument("--leaves", type=int, default=2000, help="leaves for the compile probe")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--tiny", action="store_true", help="tiny trees, one round (smoke test)")
  args = ap.parse_args(argv)
  sizes = {s.name: s for s in _trees.CPU_SIZES + _trees.TINY_SIZES}
  small = _trees.TINY_SIZES[0] if args.tiny else _trees.CPU_SIZES[0]
  rounds = 1 if args.tiny else args.rounds
  print(f"device: {jax.devices()[0].platform}; jax {jax.__version__}")
  if "buffers" in args.probe:
    probe_buffers(small, rounds)
  if "compile" in args.probe:
    probe_compile(30 if args.tiny else args.leaves)
  if "spd" in args.probe:
    probe_spd(small if args.tiny else sizes[args.size], rounds)


if __name__ == "__main__":
  main()
