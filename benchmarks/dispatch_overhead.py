"""Where the small-model overhead of fine-tune mode comes from: the anchor or the scale operands.

At 0.4M params / 169 leaves the CPU step is dispatch-bound. Compares adamw, dualopt fine-tune and
scratch (per-leaf scale operands in the state) with the same chains using one scalar layer_scale
(no scale operands). Run: .venv/bin/python benchmarks/dispatch_overhead.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _trees  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dualopt_jax as dj  # noqa: E402


def ms_per_step(tx: optax.GradientTransformation, params, grads, steps: int = 300) -> float:
  p = jax.tree.map(jnp.copy, params)
  s = tx.init(p)
  step = jax.jit(_trees.make_step(tx), donate_argnums=(0, 1))
  for _ in range(20):
    p, s = step(p, s, grads)
  jax.block_until_ready(p)
  start = time.perf_counter()
  for _ in range(steps):
    p, s = step(p, s, grads)
  jax.block_until_ready(p)
  return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
  spec = _trees.CPU_SIZES[0]
  params = _trees.make_params(spec)
  grads = _trees.make_grads(params)
  base = lambda: (optax.scale_by_adam(), optax.scale_by_learning_rate(1e-4))
  methods = {
    "adamw": lambda: optax.adamw(1e-4),
    "dualopt finetune (scale operands)": lambda: dj.dualopt(1e-4),
    "adam + rollback_to, scalar scale": lambda: optax.chain(*base(), dj.rollback_to(rate=0.01)),
    "dualopt scratch (scale operands)": lambda: dj.dualopt(1e-4, mode="scratch"),
    "adam + layerwise_decay, scalar": lambda: optax.chain(*base(), dj.layerwise_decay(rate=0.01)),
  }
  print(f"{spec.name}: {len(jax.tree.leaves(params))} leaves; ms per step, two interleaved rounds")
  rounds = [{name: ms_per_step(make(), params, grads) for name, make in methods.items()}
            for _ in range(2)]
  for name in methods:
    print(f"  {name:36s} {rounds[0][name]:7.3f} {rounds[1][name]:7.3f}")


if __name__ == "__main__":
  main()
