"""Complex parameters: every norm is |z|^2-based and SPD's gate uses Re<g, theta - theta0>.

Each transformation runs on complex64 params and is compared, step by step, with a NumPy
transcription of its equation in complex128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualopt_jax as dj

LR = 0.3
STEPS = 4


def _tree(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = {"a": (3, 2), "b": (4,)}
  return {k: (rng.normal(size=s) + 1j * rng.normal(size=s)).astype(np.complex128)
          for k, s in shape.items()}


def _grads(t: int) -> dict[str, np.ndarray]:
  return _tree(100 + t)


def _norm(x: np.ndarray) -> float:
  return float(np.sqrt(np.sum(np.abs(x) ** 2)))


def _run(tx, params0):
  params = {k: jnp.asarray(v, jnp.complex64) for k, v in params0.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  out = []
  for t in range(STEPS):
    grads = {k: jnp.asarray(v, jnp.complex64) for k, v in _grads(t).items()}
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append({k: np.asarray(v) for k, v in params.items()})
  return out


def _reference(rule, params0):
  theta = dict(params0)
  out = []
  for t in range(STEPS):
    g = _grads(t)
    theta = {k: rule(k, theta[k], g[k]) for k in theta}
    out.append(theta)
  return out


def _assert_close(got, want) -> None:
  for step_got, step_want in zip(got, want, strict=True):
    for k in step_want:
      assert step_got[k].dtype == np.complex64
      np.testing.assert_allclose(step_got[k], step_want[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_rollback() -> None:
  p0, lam = _tree(0), 0.2
  rule = lambda k, th, g: (th - LR * g) - lam * ((th - LR * g) - p0[k])
  tx = optax.chain(optax.sgd(LR), dj.rollback_to(rate=lam))
  _assert_close(_run(tx, p0), _reference(rule, p0))


@pytest.mark.parametrize("radius", [0.5, 2.0])
def test_project_to_anchor(radius: float) -> None:
  p0 = _tree(0)

  def rule(k, th, g):
    d = th - LR * g - p0[k]
    return p0[k] + min(1.0, radius / _norm(d)) * d

  tx = optax.chain(optax.sgd(LR), dj.project_to_anchor(radius))
  _assert_close(_run(tx, p0), _reference(rule, p0))


def test_fix_norm() -> None:
  p0 = _tree(0)
  rule = lambda k, th, g: _norm(p0[k]) * (th - LR * g) / _norm(th - LR * g)
  tx = optax.chain(optax.sgd(LR), dj.fix_norm(normalized=["a", "b"]))
  _assert_close(_run(tx, p0), _reference(rule, p0))


def test_spd() -> None:
  p0, lam = _tree(0), 0.7

  def rule(k, th, g):
    prev = th - p0[k]
    cand = prev - LR * g
    c = -np.sum(np.real(np.conj(g) * prev))
    r = np.clip((_norm(cand) - _norm(prev)) / _norm(cand), 0.0, 1.0)
    return p0[k] + cand - (lam * r * cand if c < 0 else 0.0)

  tx = dj.spd(optax.sgd(LR), strength=lam)
  got, want = _run(tx, p0), _reference(rule, p0)
  _assert_close(got, want)
  gates = [np.sum(np.real(np.conj(_grads(t)[k]) * (w[k] - p0[k]))) for t, w in enumerate(want[:-1])
           for k in p0]
  assert any(c > 0 for c in gates), "the reference never decays: the test would be weak"


def test_drift_is_real() -> None:
  p0 = _tree(0)
  p = {k: v + 0.1 * (1 + 1j) for k, v in p0.items()}
  as64 = lambda t: {k: jnp.asarray(v, jnp.complex64) for k, v in t.items()}
  out = dj.drift(as64(p), params0=as64(p0))
  for k in p0:
    value = out[f"drift/{k}"]
    assert not jnp.iscomplexobj(value)
    np.testing.assert_allclose(value, _norm(p[k] - p0[k]) / _norm(p0[k]), rtol=1e-5)
