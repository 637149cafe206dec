"""spd against a plain-NumPy transcription of ALGORITHMS.md §3 (Adam, then SPD)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualopt_jax._spd import spd
from tests._contexts import ECOSYSTEM_CONTEXTS as CONTEXTS
from tests._contexts import check_context

SHAPES = {"a": (4, 3), "b": (5,), "c": (2, 3, 2)}
STEPS, LR = 300, 1e-2


def _schedule(t: Any) -> Any:
  return 0.8 * (1.0 - 0.5 * t / STEPS)


def _np_adam_spd(theta, anchor, grads_fn, *, strength, stacked=(), b1=0.9, b2=0.999, eps=1e-8):
  """Adam candidate, then SPD per tensor (per layer for stacked tensors); float64."""
  theta = {k: v.astype(np.float64).copy() for k, v in theta.items()}
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  stats = {k: {"open": 0, "closed": 0, "decayed": 0} for k in theta}
  for t in range(STEPS):
    g = grads_fn(t, theta)
    lam = strength(t) if callable(strength) else strength
    for k in theta:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat = m[k] / (1 - b1 ** (t + 1))
      v_hat = v[k] / (1 - b2 ** (t + 1))
      cand = theta[k] - LR * m_hat / (np.sqrt(v_hat) + eps)
      slices = range(theta[k].shape[0]) if k in stacked else [Ellipsis]
      new = cand.copy()
      for s in slices:
        prev_d = theta[k][s] - anchor[k][s]
        cand_d = cand[s] - anchor[k][s]
        c = -np.sum(g[k][s] * prev_d)
        if c < 0:
          stats[k]["open"] += 1
          n_cand = np.sqrt(np.sum(cand_d**2))
          n_prev = np.sqrt(np.sum(prev_d**2))
          r = 0.0 if n_cand == 0 else min(max((n_cand - n_prev) / n_cand, 0.0), 1.0)
          stats[k]["decayed"] += r > 0
          new[s] = cand[s] - lam * r * cand_d
        else:
          stats[k]["closed"] += 1
      theta[k] = new
  return theta, stats


def _grads_fn(anchor):
  """g = s_t (theta - theta0) + (1 - |s_t|) noise_t, s_t in {1, -1, 0}: gates open and close."""
  rng = np.random.default_rng(7)
  signs = {k: rng.choice([1.0, -1.0, 0.0], size=STEPS) for k in SHAPES}
  noise = {k: rng.normal(size=(STEPS, *s)) for k, s in SHAPES.items()}

  def grads(t, theta):
    return {
      k: signs[k][t] * (np.asarray(theta[k], np.float64) - anchor[k])
      + (1 - abs(signs[k][t])) * noise[k][t]
      for k in SHAPES
    }

  return grads


VARIANTS = ["init_anchor", "params0", "schedule", "zero_anchor", "stacked"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_numpy_reference(variant: str) -> None:
  rng = np.random.default_rng(0)
  # float32-representable, so the float64 reference starts from exactly the same weights.
  theta0 = {k: rng.normal(size=s).astype(np.float32).astype(np.float64) for k, s in SHAPES.items()}
  anchor = {k: x.copy() for k, x in theta0.items()}
  kwargs: dict[str, Any] = {"strength": 0.8}
  stacked: tuple[str, ...] = ()
  if variant == "params0":
    anchor = {
      k: (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32).astype(np.float64)
      for k, x in theta0.items()
    }
    kwargs["params0"] = {k: jnp.asarray(x, jnp.float32) for k, x in anchor.items()}
  elif variant == "schedule":
    kwargs["strength"] = _schedule
  elif variant == "zero_anchor":
    anchor = {k: np.zeros(s) for k, s in SHAPES.items()}
    kwargs["decay_to_zero"] = True
  elif variant == "stacked":
    stacked = ("c",)
    kwargs["stacked"] = "c"
  grads_fn = _grads_fn(anchor)
  want, stats = _np_adam_spd(theta0, anchor, grads_fn, strength=kwargs["strength"], stacked=stacked)
  for k, s in stats.items():  # the test exercises both branches and the decay itself
    assert s["open"] >= 30 and s["closed"] >= 30 and s["decayed"] >= 10, (k, s)

  tx = spd(optax.adam(LR), **kwargs)
  params = {k: jnp.asarray(x, jnp.float32) for k, x in theta0.items()}
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(STEPS):
    grads = {k: jnp.asarray(g, jnp.float32) for k, g in grads_fn(t, params).items()}
    params, state = step(params, state, grads)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=1e-4, atol=1e-4, err_msg=k)
  assert int(state.count) == STEPS


def test_first_step_is_plain_and_zero_norm_is_guarded() -> None:
  params = {"w": jnp.array([1.0, 2.0])}
  # Step 1: theta = theta0, c = 0, nothing is decayed.
  tx = spd(optax.sgd(0.1), strength=1.0)
  updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, 0.1])
  # The candidate lands exactly on the anchor: ||theta~ - theta0|| = 0, the gate is open.
  moved = {"w": jnp.array([3.0, 5.0])}
  tx = spd(optax.sgd(1.0), strength=1.0, params0=params)
  updates, _ = tx.update({"w": jnp.array([2.0, 3.0])}, tx.init(moved), moved)
  assert np.all(np.isfinite(updates["w"]))
  np.testing.assert_allclose(optax.apply_updates(moved, updates)["w"], [1.0, 2.0])


def test_mask_and_anchor_dtype() -> None:
  params = {"body": jnp.ones(3), "head": jnp.ones(2)}
  tx = spd(optax.adam(0.1), strength=1.0, mask="body", anchor_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert state.anchor["body"].dtype == jnp.bfloat16
  assert isinstance(state.anchor["head"], optax.MaskedNode)
  plain = optax.adam(0.1)
  p, q, s = params, params, plain.init(params)
  grad = lambda tree, t: jax.tree.map(lambda x: jnp.cos(3.0 * x + t) * (1 if t % 2 else -1), tree)
  for t in range(6):
    u, state = tx.update(grad(p, t), state, p)
    p = optax.apply_updates(p, u)
    u, s = plain.update(grad(q, t), s, q)
    q = optax.apply_updates(q, u)
  np.testing.assert_allclose(p["head"], q["head"], rtol=1e-6)  # the inner optimizer only


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"strength": -0.1}, "strength must be >= 0"),
    ({"strength": 0.1, "decay_to_zero": True, "params0": {"w": jnp.ones(3)}}, "not both"),
    ({"strength": 0.1, "params0": {"w": jnp.ones(4)}}, "'w'.*shape"),
    ({"strength": 0.1, "params0": {"v": jnp.ones(3)}}, "'w'"),
    ({"strength": 0.1, "mask": {"x": True}}, "mask has no entry for parameter path 'w'"),
  ],
)
def test_bad_input_is_rejected(kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    spd(optax.adam(1e-3), **kwargs).init({"w": jnp.ones(3)})


@pytest.mark.parametrize("context", CONTEXTS)
def test_works_in_context(context: str) -> None:
  check_context(
    context, spd, {"strength": 0.5}, static={"inner": optax.adam(1e-2)}, wrap=lambda t: t
  )


def test_head_is_decayed_toward_zero() -> None:
  """head= leaves use the anchor 0 while the body uses params0 (checked on one decayed step)."""
  params0 = {"body": jnp.array([1.0, 0.0]), "head": jnp.array([5.0, 5.0])}
  params = {"body": jnp.array([2.0, 0.0]), "head": jnp.array([1.0, 0.0])}
  tx = spd(optax.sgd(1.0), strength=0.5, params0=params0, decay_to_zero="head")
  state = tx.init(params)
  assert isinstance(state.anchor["head"], optax.MaskedNode)
  grads = {"body": jnp.array([0.5, -1.0]), "head": jnp.array([0.5, -1.0])}
  new = optax.apply_updates(params, tx.update(grads, state, params)[0])
  # NumPy transcription of §3 for each leaf with its anchor.
  for k, a in (("body", np.array([1.0, 0.0])), ("head", np.zeros(2))):
    prev = np.asarray(params[k]) - a
    g = np.asarray(grads[k])
    cand = prev - g
    assert -np.dot(g, prev) < 0  # the gate is open
    r = np.clip((np.linalg.norm(cand) - np.linalg.norm(prev)) / np.linalg.norm(cand), 0, 1)
    assert r > 0
    np.testing.assert_allclose(new[k], a + cand - 0.5 * r * cand, rtol=1e-6)
