"""Prototype (issue 14, item 1): what XLA:CPU fuses in an Adam + rollback step.

Not library code: raw-JAX step functions with the fine-tune update rule
(Adam, learning rate, rollback toward an f32 anchor by a per-leaf fraction),
written in several layouts, compared with ``optax.adamw`` and ``dj.dualopt``
in the same process:

* ``adamw``      -- ``optax.adamw`` through ``update`` + ``apply_updates``
* ``dualopt``    -- ``dj.dualopt(mode="finetune")`` the same way
* ``leaf``       -- one hand-written elementwise step per leaf, outputs
                    (p, m, v) from inputs (g, p, m, v, anchor)
* ``packed``     -- the two moments stored as one buffer ``(..., 2)`` per leaf,
                    so the moment update is one loop with one output
* ``grouped``    -- leaves of one shape stacked into one buffer per role (as
                    scanned layers are), one fraction per stacked slice
* ``flat``       -- every leaf concatenated into one vector per role (the
                    best case of grouping: no concatenation cost counted)
* ``flat+ravel`` -- ``flat`` with grads and params concatenated every step
                    and the params split again (what ``optax.flatten``-style
                    grouping costs when the model keeps a tree)

For each: the median step time over interleaved rounds and its ratio to
adamw (wall and process CPU time), XLA's bytes accessed per parameter, and
the number of fused kernels in the compiled HLO. Every layout is checked to
give adamw-equivalent numbers to the ``leaf`` form (float32 rounding).

Usage::

  .venv/bin/python benchmarks/proto_fused_adam.py                 # 5.3M, 13.7M, 21M trees
  .venv/bin/python benchmarks/proto_fused_adam.py --sizes 5.3M --rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _trees  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dualopt_jax as dj  # noqa: E402

LR, B1, B2, EPS, ROLLBACK = 1e-3, 0.9, 0.999, 1e-8, 0.01
SIZES = {
  "5.3M": _trees.TreeSpec("5.3M", d_model=128, n_layers=24, vocab=4096),
  "13.7M": _trees.TreeSpec("13.7M", d_model=256, n_layers=16, vocab=4096),
  "21M": _trees.TreeSpec("21M", d_model=256, n_layers=24, vocab=8192),
}


def _adam_leaf(g, p, m, v, a, lam, count):
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  m_hat = m / (1 - B1**count)
  v_hat = v / (1 - B2**count)
  stepped = p - LR * (m_hat / (jnp.sqrt(v_hat) + EPS))
  return stepped - lam * (stepped - a), m, v


def _fractions(params: Any) -> Any:
  depth = dj.layer_depths(params)
  return jax.tree.map(lambda d: jnp.float32(ROLLBACK * (1 - d)), depth)


def leaf_step(params, state, grads):
  m, v, a, lam, count = state
  count = count + 1
  out = jax.tree.map(lambda g, p, m_, v_, a_, l_: _adam_leaf(g, p, m_, v_, a_, l_, count),
                     grads, params, m, v, a, lam)
  is_out = lambda x: isinstance(x, tuple) and len(x) == 3
  pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_out)
  return pick(0), (pick(1), pick(2), a, lam, count)


def packed_step(params, state, grads):
  mv, a, lam, count = state
  count = count + 1

  def one(g, p, mv_, a_, l_):
    new_mv = jnp.stack([B1 * mv_[..., 0] + (1 - B1) * g, B2 * mv_[..., 1] + (1 - B2) * g * g],
                       axis=-1)
    m_hat = new_mv[..., 0] / (1 - B1**count)
    v_hat = new_mv[..., 1] / (1 - B2**count)
    stepped = p - LR * (m_hat / (jnp.sqrt(v_hat) + EPS))
    return stepped - l_ * (stepped - a_), new_mv

  out = jax.tree.map(one, grads, params, mv, a, lam)
  is_out = lambda x: isinstance(x, tuple) and len(x) == 2
  pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_out)
  return pick(0), (pick(1), a, lam, count)


def flat_step(p, state, g):
  m, v, a, lam, count = state
  count = count + 1
  new_p, m, v = _adam_leaf(g, p, m, v, a, lam, count)
  return new_p, (m, v, a, lam, count)


def _flat_layout(params: Any) -> tuple[Any, Any]:
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  shapes = [x.shape for x in leaves]

  def ravel(tree):
    return jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])

  def unravel(vec):
    parts = jnp.split(vec, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(treedef, [x.reshape(s) for x, s in zip(parts, shapes, strict=True)])

  return ravel, unravel


def _grouped_layout(params: Any, lam: Any) -> tuple[Any, Any, Any]:
  """Stacks same-shape leaves: (ravel tree -> {shape: (k, *shape)}, unravel, fractions)."""
  leaves = jax.tree.leaves(params)
  treedef = jax.tree.structure(params)
  shapes = sorted({x.shape for x in leaves})
  members = {sh: [i for i, x in enumerate(leaves) if x.shape == sh] for sh in shapes}

  def ravel(tree):
    xs = jax.tree.leaves(tree)
    return {str(sh): jnp.stack([xs[i] for i in idx]) for sh, idx in members.items()}

  def unravel(groups):
    out = [None] * len(leaves)
    for sh, idx in members.items():
      for j, i in enumerate(idx):
        out[i] = groups[str(sh)][j]
    return jax.tree.unflatten(treedef, out)

  lams = jax.tree.leaves(lam)
  fractions = {str(sh): jnp.stack([lams[i] for i in idx]).reshape((-1,) + (1,) * len(sh))
               for sh, idx in members.items()}
  return ravel, unravel, fractions


def grouped_step(p, state, g):
  m, v, a, lam, count = state
  count = count + 1
  out = {k: _adam_leaf(g[k], p[k], m[k], v[k], a[k], lam[k], count) for k in p}
  return ({k: o[0] for k, o in out.items()},
          ({k: o[1] for k, o in out.items()}, {k: o[2] for k, o in out.items()}, a, lam, count))


def build(spec: _trees.TreeSpec) -> dict[str, tuple[Any, Any, Any, Any]]:
  """name -> (jitted step, params, state, grads), every state at step 0."""
  params = _trees.make_params(spec)
  grads = _trees.make_grads(params)
  lam = _fractions(params)
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  copy = lambda t: jax.tree.map(jnp.array, t)
  ravel, unravel = _flat_layout(params)
  flat_lam = ravel(jax.tree.map(lambda p, l_: jnp.full(p.shape, l_), params, lam))
  methods: dict[str, tuple[Any, Any, Any, Any]] = {}
  for name, tx in (("adamw", optax.adamw(LR, weight_decay=1e-2)),
                   ("dualopt", dj.dualopt(LR, rollback=ROLLBACK, rollback_floor=0.0))):
    methods[name] = (jax.jit(_trees.make_step(tx), donate_argnums=(0, 1)), copy(params),
                     tx.init(params), grads)
  count = lambda: jnp.zeros((), jnp.int32)  # donated: every state gets its own buffers
  methods["leaf"] = (jax.jit(leaf_step, donate_argnums=(0, 1)), copy(params),
                     (zeros(params), zeros(params), copy(params), copy(lam), count()), grads)
  mv = jax.tree.map(lambda p: jnp.zeros(p.shape + (2,), p.dtype), params)
  methods["packed"] = (jax.jit(packed_step, donate_argnums=(0, 1)), copy(params),
                       (mv, copy(params), copy(lam), count()), grads)
  g_ravel, _g_unravel, g_lam = _grouped_layout(params, lam)
  gp = g_ravel(params)
  methods["grouped"] = (jax.jit(grouped_step, donate_argnums=(0, 1)), gp,
                        (zeros(gp), zeros(gp), copy(gp), g_lam, count()), g_ravel(grads))
  flat_p, flat_g = ravel(params), ravel(grads)
  flat_state = (jnp.zeros_like(flat_p), jnp.zeros_like(flat_p), jnp.array(flat_p), flat_lam,
                count())
  methods["flat"] = (jax.jit(flat_step, donate_argnums=(0, 1)), jnp.array(flat_p), flat_state,
                     flat_g)

  def ravel_step(tree_params, state, tree_grads):
    new_p, state = flat_step(ravel(tree_params), state, ravel(tree_grads))
    return unravel(new_p), state

  flat_state2 = jax.tree.map(jnp.array, flat_state)
  methods["flat+ravel"] = (jax.jit(ravel_step, donate_argnums=(0, 1)), copy(params), flat_state2,
                           grads)
  return methods


def hlo_stats(step: Any, params: Any, state: Any, grads: Any, n_params: int) -> tuple[float, int]:
  compiled = step.lower(params, state, grads).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  fusions = len(re.findall(r"=\s*\S+\s+fusion\(", compiled.as_text()))
  return float(cost.get("bytes accessed", float("nan"))) / n_params, fusions


def check_same_numbers(spec: _trees.TreeSpec, steps: int = 5) -> dict[str, float]:
  """Max relative difference of each layout's params to ``leaf`` after ``steps`` steps."""
  runs = build(spec)
  out = {}
  for name, (step, p, s, g) in runs.items():
    for _ in range(steps):
      p, s = step(p, s, g)
    out[name] = p
  base = _trees.make_params(spec)
  ravel = _flat_layout(base)[0]
  unravel_grouped = _grouped_layout(base, _fractions(base))[1]
  out["grouped"] = unravel_grouped(out["grouped"])
  ref = np.asarray(ravel(out["leaf"]))
  diffs = {}
  for name, p in out.items():
    if name == "adamw":
      continue
    got = np.asarray(p if name == "flat" else ravel(p))
    diffs[name] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  return diffs


def time_size(spec: _trees.TreeSpec, rounds: int, block: int) -> list[dict[str, Any]]:
  runs = build(spec)
  n = spec.n_params
  stats = {name: hlo_stats(step, p, s, g, n) for name, (step, p, s, g) in runs.items()}
  state = {name: [p, s] for name, (_step, p, s, _g) in runs.items()}
  for name, (step, _p, _s, g) in runs.items():  # warm-up (compiles)
    state[name] = list(step(*state[name], g))
    jax.block_until_ready(state[name])
  wall: dict[str, list[float]] = {k: [] for k in runs}
  cpu: dict[str, list[float]] = {k: [] for k in runs}
  for _ in range(rounds):
    for name, (step, _p, _s, g) in runs.items():
      t0, c0 = time.perf_counter(), time.process_time()
      p, s = state[name]
      for _ in range(block):
        p, s = step(p, s, g)
      jax.block_until_ready((p, s))
      wall[name].append((time.perf_counter() - t0) / block)
      cpu[name].append((time.process_time() - c0) / block)
      state[name] = [p, s]
  rows = []
  for name in runs:
    ratio_w = statistics.median(w / a for w, a in zip(wall[name], wall["adamw"], strict=True))
    ratio_c = statistics.median(c / a for c, a in zip(cpu[name], cpu["adamw"], strict=True))
    rows.append({"size": spec.name, "method": name, "ms": 1e3 * statistics.median(wall[name]),
                 "x_adamw_wall": ratio_w, "x_adamw_cpu": ratio_c,
                 "bytes_per_param": stats[name][0], "fusions": stats[name][1]})
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="*", default=list(SIZES))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--block", type=int, default=5)
  args = parser.parse_args(argv)
  print("same numbers as `leaf` after 5 steps (max |Δp| / max |p|), 5.3M tree:",
        {k: f"{v:.1e}" for k, v in check_same_numbers(SIZES["5.3M"]).items()})
  header = "| size | method | ms/step | x adamw (wall) | x adamw (CPU) | bytes/param | fusions |"
  print(header)
  print("|" + "---|" * 7)
  for size in args.sizes:
    for r in time_size(SIZES[size], args.rounds, args.block):
      print(f"| {r['size']} | {r['method']} | {r['ms']:.2f} | {r['x_adamw_wall']:.2f} | "
            f"{r['x_adamw_cpu']:.2f} | {r['bytes_per_param']:.1f} | {r['fusions']} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
