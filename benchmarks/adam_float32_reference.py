"""How far float32 `optax.adam` itself drifts from a float32 NumPy Adam over 300 noisy steps.

Sets the float32 tolerance of tests/test_dualopt.py.
Run: .venv/bin/python benchmarks/adam_float32_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import numpy_reference as ref  # noqa: E402


def drift(lr: float, steps: int = 300, size: int = 64, seed: int = 0) -> tuple[float, float]:
  rng = np.random.default_rng(seed)
  p0 = rng.normal(size=size).astype(np.float32)
  noise = rng.normal(size=(steps, size)).astype(np.float32)
  tx = optax.adam(lr)

  @jax.jit
  def step(p, s, n):
    updates, s = tx.update(n + 0.5 * (p - 0.3), s, p)
    return p + updates, s

  p, s = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for t in range(steps):
    p, s = step(p, s, noise[t])
  out = []
  for dtype in (np.float32, np.float64):
    want = ref.run([p0], lambda t, th: [noise[t] + 0.5 * (th[0] - 0.3)], steps=steps,
                   lr=lambda t: lr, fraction=lambda t: 0.0, multipliers=[0.0], dtype=dtype)[0]
    out.append(float(np.linalg.norm(np.asarray(p, np.float64) - want) / np.linalg.norm(want)))
  return out[0], out[1]


def main() -> None:
  print(f"{'lr':>8}  {'vs float32 NumPy':>17}  {'vs float64 NumPy':>17}")
  for lr in (1e-2, 1e-3, 1e-4):
    a, b = drift(lr)
    print(f"{lr:8.0e}  {a:17.2e}  {b:17.2e}")


if __name__ == "__main__":
  main()
