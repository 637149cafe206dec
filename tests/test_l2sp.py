"""L2-SP (ALGORITHMS.md §5): coupled vs decoupled against NumPy; coupled == the loss term's grad."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualopt_jax._l2sp import add_l2sp_gradient, decay_to_anchor, l2sp
from tests._contexts import ECOSYSTEM_CONTEXTS as CONTEXTS
from tests._contexts import check_context

LR, STEPS = 1e-2, 40
SHAPES = {"body": {"w": (3, 4), "b": (4,)}, "head": {"w": (4, 2)}}


def _np_run(theta, anchor, alpha, beta, *, coupled, b1=0.9, b2=0.999, eps=1e-8):
  """Adam with the L2-SP term in the gradient (coupled) or added after Adam (decoupled)."""
  theta = {k: v.copy() for k, v in theta.items()}
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  for t in range(STEPS):
    a_t = alpha(t) if callable(alpha) else alpha
    for k in theta:
      g = _grad(t, theta[k])
      term = beta * theta[k] if k.startswith("head") else a_t * (theta[k] - anchor[k])
      if coupled:
        g = g + term
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g**2
      direction = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
      theta[k] = theta[k] - LR * (direction if coupled else direction + term)
  return theta


def _grad(t: int, x: Any) -> Any:
  return np.cos(2.0 * np.asarray(x, np.float64) + t) if isinstance(x, np.ndarray) else (
    jnp.cos(2.0 * x + t)
  )


def _flat(tree: dict) -> dict[str, Any]:
  return {f"{m}/{k}": v for m, leaves in tree.items() for k, v in leaves.items()}


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("alpha_kind", ["scalar", "schedule"])
def test_matches_numpy_reference(coupled: bool, alpha_kind: str) -> None:
  rng = np.random.default_rng(0)
  theta0 = {
    m: {k: rng.normal(size=s).astype(np.float32) for k, s in leaves.items()}
    for m, leaves in SHAPES.items()
  }
  anchor = jax.tree.map(lambda x: x + 0.3 * np.float32(1.0), theta0)  # a distinct params0
  alpha = 0.5 if alpha_kind == "scalar" else (lambda count: 0.5 / (1.0 + 0.1 * count))
  beta = 0.2
  tx = l2sp(LR, alpha=alpha, beta=beta, coupled=coupled, decay_to_zero="head",
            params0=jax.tree.map(jnp.asarray, anchor))
  params = jax.tree.map(jnp.asarray, theta0)
  state = tx.init(params)

  @jax.jit
  def step(params, state, t):
    grads = jax.tree.map(lambda x: _grad(t, x), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(STEPS):
    params, state = step(params, state, t)
  want = _np_run(
    {k: v.astype(np.float64) for k, v in _flat(theta0).items()},
    {k: v.astype(np.float64) for k, v in _flat(anchor).items()},
    alpha, beta, coupled=coupled,
  )
  for k, x in _flat(params).items():
    np.testing.assert_allclose(np.asarray(x), want[k], rtol=1e-4, atol=1e-5, err_msg=k)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(8, name="Dense_0")(x))
    x = nn.tanh(nn.Dense(8, name="Dense_1")(x))
    return nn.Dense(3, name="head")(x)


def test_coupled_equals_loss_term_gradient_on_flax_model() -> None:
  """chain(add_l2sp_gradient, adam) == adam on grad(loss + a/2 |theta-theta0|^2 + b/2 |head|^2)."""
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jax.random.normal(jax.random.key(1), (16, 3))
  pretrained = model.init(jax.random.key(2), x)
  # Fine-tuning starts from the pre-trained body with a fresh head.
  fresh = model.init(jax.random.key(3), x)
  params = {"params": {**pretrained["params"], "head": fresh["params"]["head"]}}
  alpha, beta = 0.3, 0.1

  def loss(p):
    return jnp.mean((model.apply(p, x) - y) ** 2)

  def penalized(p):
    sq = lambda a, b: sum(jnp.sum((u - v) ** 2) for u, v in
                          zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    body = {k: v for k, v in p["params"].items() if k != "head"}
    body0 = {k: v for k, v in pretrained["params"].items() if k != "head"}
    head_sq = sum(jnp.sum(h**2) for h in jax.tree.leaves(p["params"]["head"]))
    return loss(p) + alpha / 2 * sq(body, body0) + beta / 2 * head_sq

  tx = optax.chain(
    add_l2sp_gradient(alpha, beta, params0=pretrained, decay_to_zero="head"), optax.adam(1e-2)
  )
  ref_tx = optax.adam(1e-2)
  p, s = params, tx.init(params)
  q, r = params, ref_tx.init(params)
  for _ in range(5):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    u, r = ref_tx.update(jax.grad(penalized)(q), r, q)
    q = optax.apply_updates(q, u)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The anchor is in the state (no closure constant); the head stores none.
  anchor = s[0].anchor["params"]
  want = pretrained["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(anchor["Dense_0"]["kernel"], want)
  assert isinstance(anchor["head"]["kernel"], optax.MaskedNode)


def test_decoupled_multiplies_by_the_learning_rate() -> None:
  """decay_to_anchor before scale_by_learning_rate: step = -lr * alpha * (theta - theta0)."""
  params, params0 = {"w": jnp.array([2.0, -1.0])}, {"w": jnp.zeros(2)}
  tx = optax.chain(decay_to_anchor(0.5, params0=params0), optax.scale_by_learning_rate(0.1))
  updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, 0.05])


def test_mask_excludes_leaves() -> None:
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = add_l2sp_gradient(1.0, params0={"a": jnp.zeros(2), "b": jnp.zeros(2)}, mask="a")
  updates, _ = tx.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates["a"], [1.0, 1.0])
  np.testing.assert_allclose(updates["b"], [0.0, 0.0])


@pytest.mark.parametrize(
  "factory, kwargs, match",
  [
    (add_l2sp_gradient, {"alpha": -1.0}, "alpha must be >= 0"),
    (decay_to_anchor, {"alpha": 0.1, "beta": -1.0}, "beta must be >= 0"),
    (add_l2sp_gradient, {"alpha": 0.1, "params0": {"w": jnp.ones(2, jnp.bfloat16)}}, "'w'.*dtype"),
    (decay_to_anchor, {"alpha": 0.1, "decay_to_zero": ["nope"], "params0": {"x": jnp.ones(2)}},
     "'w'"),
  ],
)
def test_bad_input_is_rejected(factory, kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    factory(**kwargs).init({"w": jnp.ones(2)})


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("context", CONTEXTS)
def test_works_in_context(context: str, coupled: bool) -> None:
  if coupled:
    wrap = lambda t: optax.chain(t, optax.adam(1e-2))
    factory = add_l2sp_gradient
  else:
    wrap = lambda t: optax.chain(optax.scale_by_adam(), t, optax.scale_by_learning_rate(1e-2))
    factory = decay_to_anchor
  check_context(context, factory, {"alpha": 0.5, "beta": 0.1}, static={"decay_to_zero": "head"},
                wrap=wrap)
