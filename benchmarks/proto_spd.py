"""Prototype (issue 6): an SPD step with fewer passes over memory, timed against ``dj.spd``.

Not part of the library. It re-states the SPD leaf rule of ``dj.spd``
with the norms expanded so that every reduction reads only the step's inputs:

  prev = p - a,  cand = prev + u
  |cand|^2 = |prev|^2 + 2 <prev, u> + |u|^2
  |cand| - |prev| = (2 <prev, u> + |u|^2) / (|cand| + |prev|)   (no cancellation)

and computes the four sums ``<g, prev>, |prev|^2, <prev, u>, |u|^2`` in one
variadic ``lax.reduce`` (one read of g, p, a, u) instead of materialising
``prev`` and ``cand``. The result is checked against ``dj.spd`` and timed
with ``step_time.bench_size``.

Usage::

  nice -n 10 .venv/bin/python benchmarks/proto_spd.py [--size 5.3M]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _trees  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import step_time  # noqa: E402


class ProtoState(NamedTuple):
  inner_state: Any
  anchor: Any


def _sums(g, prev, u):
  """``(<g, prev>, |prev|^2, <prev, u>, |u|^2)`` in one variadic reduce over all axes."""
  ops = (g * prev, prev * prev, prev * u, u * u)
  zero = jnp.zeros((), prev.dtype)
  return jax.lax.reduce(
    ops, (zero,) * 4, lambda x, y: tuple(a + b for a, b in zip(x, y, strict=True)),
    tuple(range(prev.ndim)),
  )


def _leaf(u, g, p, a, lam, variadic):
  uf = u.astype(jnp.float32)
  prev = p.astype(jnp.float32) - a.astype(jnp.float32)
  gf = g.astype(jnp.float32)
  if variadic == "stack":
    sums = jnp.sum(jnp.stack([gf * prev, prev * prev, prev * uf, uf * uf]), axis=tuple(
      range(1, prev.ndim + 1)))
    gp, pp, pu, uu = sums[0], sums[1], sums[2], sums[3]
  elif variadic:
    gp, pp, pu, uu = _sums(gf, prev, uf)
  else:
    gp, pp, pu, uu = (jnp.sum(gf * prev), jnp.sum(prev * prev), jnp.sum(prev * uf),
                      jnp.sum(uf * uf))
  n_prev = jnp.sqrt(pp)
  n_cand = jnp.sqrt(jnp.maximum(pp + 2 * pu + uu, 0.0))
  den = (n_cand + n_prev) * n_cand
  ratio = jnp.where(den > 0, (2 * pu + uu) / jnp.where(den > 0, den, 1.0), 0.0)
  factor = jnp.where(-gp < 0, lam * jnp.clip(ratio, 0.0, 1.0), 0.0)
  return (uf - factor * (prev + uf)).astype(u.dtype)


def proto_spd(inner, strength, *, variadic=True):
  def init_fn(params):
    return ProtoState(inner.init(params), jax.tree.map(lambda x: jnp.array(x, copy=True), params))

  def update_fn(grads, state, params):
    u, inner_state = inner.update(grads, state.inner_state, params)
    new = jax.tree.map(
      lambda u_, g, p, a: _leaf(u_, g, p, a, strength, variadic), u, grads, params, state.anchor
    )
    return new, ProtoState(inner_state, state.anchor)

  return optax.GradientTransformation(init_fn, update_fn)


def check_matches_spd(spec):
  """Three steps of the prototype equal ``dj.spd``'s to float32 rounding."""
  import dualopt_jax as dj

  params = _trees.make_params(spec)
  results = []
  for tx in (dj.spd(optax.adam(1e-2), strength=1.0), proto_spd(optax.adam(1e-2), 1.0)):
    p, s = params, tx.init(params)
    for i in range(3):
      # Gradients that push away from the anchor, so the gate opens.
      g = jax.tree.map(lambda x, i=i: -(x + 0.01 * (i + 1)), p)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    results.append(p)
  for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="5.3M")
  ap.add_argument("--rounds", type=int, default=9)
  args = ap.parse_args(argv)
  check_matches_spd(_trees.TreeSpec("check", d_model=16, n_layers=2, vocab=32))
  print("prototype matches dj.spd")
  methods, _ = _trees.select_methods(["adamw", "spd"])
  methods += [
    _trees.Method("spd_proto_variadic", lambda: proto_spd(optax.adam(_trees.LR), 1.0), 32.0),
    _trees.Method(
      "spd_proto_sums", lambda: proto_spd(optax.adam(_trees.LR), 1.0, variadic=False), 32.0
    ),
    _trees.Method(
      "spd_proto_stack", lambda: proto_spd(optax.adam(_trees.LR), 1.0, variadic="stack"), 32.0
    ),
  ]
  spec = {s.name: s for s in _trees.CPU_SIZES + _trees.LARGE_SIZES}[args.size]
  step_time.bench_size(spec, methods, rounds=args.rounds, target_block_s=0.06, max_steps=50)


if __name__ == "__main__":
  main()
