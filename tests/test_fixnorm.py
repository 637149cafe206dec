"""fix_norm (ALGORITHMS.md §4, our reading of the FixNorm abstract) against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualopt_jax._fixnorm import fix_norm
from tests._contexts import ECOSYSTEM_CONTEXTS as CONTEXTS
from tests._contexts import check_context

LR, STEPS = 0.1, 15


def _np_renorm(x: np.ndarray, rho, per: str, stacked: bool = False) -> np.ndarray:
  """Scale x to norm rho, per tensor or per output channel (last axis); per layer if stacked."""
  if stacked:
    rhos = np.broadcast_to(np.asarray(rho), (x.shape[0],) + np.shape(rho)[1:])
    return np.stack([_np_renorm(layer, r, per) for layer, r in zip(x, rhos, strict=True)])
  if per == "tensor" or x.ndim <= 1:
    n = np.sqrt(np.sum(x**2))
    return x if n == 0 else x * (np.asarray(rho).reshape(()) / n)
  out = np.empty_like(x)
  rho = np.broadcast_to(np.asarray(rho).reshape(-1), (x.shape[-1],))
  for j in range(x.shape[-1]):
    col = x[..., j]
    n = np.sqrt(np.sum(col**2))
    out[..., j] = col if n == 0 else col * rho[j] / n
  return out


def _np_norms(x: np.ndarray, per: str, stacked: bool = False):
  if stacked:
    return np.stack([_np_norms(layer, per) for layer in x])
  if per == "tensor" or x.ndim <= 1:
    return np.sqrt(np.sum(x**2))
  return np.sqrt(np.sum(x**2, axis=tuple(range(x.ndim - 1))))


def _params():
  rng = np.random.default_rng(0)
  return {
    "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
    "stack": {"kernel": rng.normal(size=(3, 4, 4))},
    "head": {"kernel": rng.normal(size=(4, 5)), "bias": rng.normal(size=(5,))},
  }


def _grad(t, x):
  mod = np if isinstance(x, np.ndarray) else jnp
  return mod.sin(3.0 * x + t) + 0.5


@pytest.mark.parametrize("per", ["tensor", "channel"])
@pytest.mark.parametrize("classifier_per", ["tensor", "channel"])
@pytest.mark.parametrize("norm", ["initial", "value"])
def test_matches_numpy_reference(per: str, classifier_per: str, norm: str) -> None:
  p0 = _params()
  tx = optax.chain(
    optax.sgd(LR),
    fix_norm(
      normalized=["conv/kernel", "stack/kernel"], norm="initial" if norm == "initial" else 2.0,
      per=per, classifier="head/kernel", classifier_norm=lambda c: 1.0 + 0.1 * c,
      classifier_per=classifier_per, stacked="stack",
    ),
  )
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p0)
  state = tx.init(params)
  step = jax.jit(lambda p, s, t: (lambda u, s2: (optax.apply_updates(p, u), s2))(
    *tx.update(jax.tree.map(lambda x: _grad(t, x), p), s, p)))
  for t in range(STEPS):
    params, state = step(params, state, t)

  theta = jax.tree.map(lambda x: np.asarray(x, np.float32).astype(np.float64), p0)
  targets = {
    "conv": _np_norms(theta["conv"]["kernel"], per) if norm == "initial" else 2.0,
    "stack": _np_norms(theta["stack"]["kernel"], per, True) if norm == "initial" else 2.0,
  }
  for t in range(STEPS):
    theta = jax.tree.map(lambda x, t=t: x - LR * _grad(t, x), theta)
    for mod in ("conv", "stack"):
      theta[mod]["kernel"] = _np_renorm(theta[mod]["kernel"], targets[mod], per, mod == "stack")
    theta["head"]["kernel"] = _np_renorm(theta["head"]["kernel"], 1.0 + 0.1 * t, classifier_per)
  for mod in theta:
    for k in theta[mod]:
      np.testing.assert_allclose(
        np.asarray(params[mod][k]), theta[mod][k], rtol=2e-5, atol=2e-5, err_msg=f"{mod}/{k}"
      )
  # The norms really are held (and biases are free).
  np.testing.assert_allclose(
    _np_norms(np.asarray(params["head"]["kernel"], np.float64), classifier_per),
    1.0 + 0.1 * (STEPS - 1), rtol=1e-5,
  )


def test_zero_tensor_is_left_alone_and_no_decay_needed() -> None:
  params = {"w": jnp.zeros((2, 3))}
  tx = optax.chain(optax.sgd(1.0), fix_norm(normalized="w", norm=1.0))
  updates, _ = tx.update({"w": jnp.zeros((2, 3))}, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], 0.0)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({}, "give `normalized`"),
    ({"classifier": "w"}, "classifier_norm` is required"),
    ({"normalized": "w", "classifier": "w", "classifier_norm": 1.0}, "'w' is selected by both"),
    ({"normalized": "w", "per": "row"}, "per must be one of"),
    ({"classifier": "w", "classifier_norm": 0.0}, "classifier_norm must be > 0"),
    ({"normalized": "w", "norm": {"w": -1.0, "b": 1.0}}, "norm for 'w' must be >= 0"),
    ({"normalized": {"x": True}}, "normalized: mask has no entry for parameter path"),
  ],
)
def test_bad_input_is_rejected(kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    fix_norm(**kwargs).init({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})


@pytest.mark.parametrize("context", CONTEXTS)
def test_works_in_context(context: str) -> None:
  check_context(
    context, fix_norm, {"classifier_norm": 3.0},
    static={"normalized": ["layers_*/kernel"], "classifier": "head/kernel", "per": "channel"},
  )
