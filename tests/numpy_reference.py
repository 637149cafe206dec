"""Plain NumPy transcriptions of ALGORITHMS.md §1-§2, run step by step (float64).

Independent of the library: no JAX, no Optax. Parameters are lists of arrays,
one per layer, with a per-layer multiplier given directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def warmup_cosine(peak: float, warmup: int, total: int) -> Callable[[int], float]:
  """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, cosine to 0 at ``total``."""

  def lr(count: int) -> float:
    if count < warmup:
      return peak * count / warmup
    progress = min(count - warmup, total - warmup) / (total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))

  return lr


def olor_kappa(n_tensors: int, kappa_max: float, kappa_min: float, power: float) -> list[float]:
  """κ_i = κ_min + (1 - i/N)^γ (κ_max - κ_min), i = 0..N, N = n_tensors - 1 (N = 0 -> κ_max)."""
  last = max(n_tensors - 1, 1)
  return [kappa_min + (1.0 - i / last) ** power * (kappa_max - kappa_min) for i in range(n_tensors)]


def run(
  params0: Sequence[np.ndarray],
  grad_fn: Callable[[int, list[np.ndarray]], list[np.ndarray]],
  *,
  steps: int,
  lr: Callable[[int], float],
  fraction: Callable[[int], float],
  multipliers: Sequence[float],
  optimizer: str = "adam",
  anchor: str = "params0",
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  momentum: float = 0.9,
  dtype: type = np.float64,
) -> list[np.ndarray]:
  """Adam (or heavy-ball SGD) then the post-step pull toward the anchor.

  θ̂ = θ - η_t·â;  θ = θ̂ - λ_i,t (θ̂ - θ₀) with λ_i,t = fraction(t)·multiplier_i,
  where t counts from 0 and the anchor is θ₀ (``anchor="params0"``) or 0
  (``anchor="zero"``, scratch-mode decay). ``dtype`` is the arithmetic's
  precision: float32 reproduces the rounding a float32 run must have (for
  example Adam's bias correction 1 - b2^t cancels to few digits early on).
  """
  c = lambda x: np.asarray(x, dtype)
  b1, b2, eps, momentum = c(b1), c(b2), c(eps), c(momentum)
  theta = [np.array(p, dtype) for p in params0]
  theta0 = [np.array(p, dtype) for p in params0]
  m = [np.zeros_like(p) for p in theta]
  v = [np.zeros_like(p) for p in theta]
  for t in range(steps):
    grads = [np.asarray(g, dtype) for g in grad_fn(t, theta)]
    eta = c(lr(t))
    step = c(t + 1)
    for i, g in enumerate(grads):
      if optimizer == "adam":
        m[i] = b1 * m[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        m_hat = m[i] / (1 - b1**step)
        v_hat = v[i] / (1 - b2**step)
        direction = m_hat / (np.sqrt(v_hat) + eps)
      else:
        m[i] = momentum * m[i] + g
        direction = m[i]
      pre = theta[i] - eta * direction
      lam = c(fraction(t)) * c(multipliers[i])
      target = theta0[i] if anchor == "params0" else c(0.0)
      theta[i] = pre - lam * (pre - target)
  return theta
