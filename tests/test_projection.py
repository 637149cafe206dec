"""project_to_anchor against a NumPy transcription (L2, MARS, stacked, radius specs).

The ecosystem matrix (inject_hyperparams, MultiSteps, optax.masked, nnx.Optimizer,
TrainState, bf16, 8-device sharding), ``check_context``, lives in tests/_contexts.py
with the other shared test contexts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualopt_jax import _depths
from dualopt_jax._projection import project_to_anchor
from tests._contexts import ECOSYSTEM_CONTEXTS as CONTEXTS
from tests._contexts import check_context, grads_at

# ----------------------------------------------------------------------------
# NumPy transcription of ALGORITHMS.md §6.
# ----------------------------------------------------------------------------


def np_norm(d: np.ndarray, mode: str, stacked: bool) -> np.ndarray:
  """Norm(s) of d broadcastable against d. MARS written in PyTorch layout (rows on axis 0)."""
  if stacked:
    return np.stack([np_norm(layer, mode, False) for layer in d])
  if mode == "l2":
    return np.sqrt(np.sum(d * d))
  torch_layout = np.moveaxis(d, -1, 0) if d.ndim >= 1 else d  # Flax (.., out) -> (out, ..)
  if torch_layout.ndim <= 1:
    row = np.sum(np.abs(torch_layout))  # torch.sum(dim=()) reduces everything
    return np.asarray(row)
  rows = np.sum(np.abs(torch_layout), axis=tuple(range(1, torch_layout.ndim)))  # (out,)
  return rows  # broadcasts against Flax layout (.., out)


def np_project(theta: np.ndarray, anchor: np.ndarray, gamma: Any, mode: str, stacked: bool):
  d = theta - anchor
  norms = np_norm(d, mode, stacked)
  if stacked:
    norms = norms.reshape(norms.shape[0], *([1] * (d.ndim - norms.ndim)), *norms.shape[1:])
  gamma = np.asarray(gamma, np.float64)
  ratio = np.where(norms > 0, np.minimum(1.0, gamma / np.where(norms > 0, norms, 1.0)), 1.0)
  return anchor + ratio * d


def _np_run(params0, radius_of, mode, stacked_paths, steps, lr, schedule=None):
  """SGD then projection, float64; ``radius_of(path)`` gives the radius."""
  theta = {k: np.asarray(v, np.float64) for k, v in params0.items()}
  anchor = {k: v.copy() for k, v in theta.items()}
  for t in range(steps):
    g = {k: np.asarray(grads_at(t, {k: jnp.asarray(v, jnp.float32)})[k], np.float64)
         for k, v in theta.items()}
    for k in theta:
      gamma = radius_of(k) * (1.0 if schedule is None else schedule(t))
      theta[k] = np_project(theta[k] - lr * g[k], anchor[k], gamma, mode, k in stacked_paths)
  return theta


PARAMS = {
  "w2": np.random.default_rng(1).normal(size=(3, 5)),
  "w4": np.random.default_rng(2).normal(size=(2, 2, 3, 4)),
  "b": np.random.default_rng(3).normal(size=(5,)),
  "s": np.asarray(0.7),
  "stack": np.random.default_rng(4).normal(size=(3, 4, 2)),
}


@pytest.mark.parametrize("mode", ["l2", "mars"])
@pytest.mark.parametrize("radius_kind", ["scalar", "schedule", "pytree", "callable"])
def test_matches_numpy_reference(mode: str, radius_kind: str) -> None:
  lr, steps = 0.05, 25
  per_path = {"w2": 0.3, "w4": 0.5, "b": 0.2, "s": 0.05, "stack": 0.25}
  schedule = None
  layer_scale = 1.0
  if radius_kind == "scalar":
    radius, radius_of = 0.3, lambda k: 0.3
  elif radius_kind == "schedule":
    schedule = lambda t: 0.1 + 0.02 * t
    radius, radius_of = (lambda count: 0.1 + 0.02 * count), lambda k: 1.0
  elif radius_kind == "pytree":
    radius, radius_of = per_path, per_path.__getitem__
  else:
    # a per-leaf callable is ``params -> pytree`` (a callable radius is a schedule)
    radius, radius_of = 1.0, per_path.__getitem__
    layer_scale = lambda tree: {k: per_path[k] for k in tree}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in PARAMS.items()}
  tx = optax.chain(optax.sgd(lr), project_to_anchor(radius, norm=mode, stacked="stack",
                                                    layer_scale=layer_scale))
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(steps):
    updates, state = step(grads_at(t, params), state, params)
    params = optax.apply_updates(params, updates)
  want = _np_run(PARAMS, radius_of, mode, {"stack"}, steps, lr, schedule)
  for k in want:
    np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=2e-4, atol=2e-5, err_msg=k)
  # The constraint is active (otherwise the test would not test the projection).
  d = np.asarray(params["w2"], np.float64) - PARAMS["w2"]
  assert np.max(np_norm(d, mode, False)) == pytest.approx(
    radius_of("w2") * (1.0 if schedule is None else schedule(steps - 1)), rel=1e-3
  )


def test_depth_profile_radius_for_stacked_layers() -> None:
  """A radius from layer_depths/depth_profile, (L, 1, 1) per stacked leaf, works per layer."""
  params = {
    "embed": {"embedding": jnp.ones((4, 3))},
    "layers": {"kernel": jnp.ones((3, 3, 3)), "bias": jnp.ones((3, 3))},
    "head": {"kernel": jnp.ones((3, 2))},
  }
  depths = _depths.layer_depths(params, stacked="layers")
  radii = _depths.depth_profile(depths, start=0.01, end=1.0)
  assert np.shape(radii["layers"]["kernel"]) == (3, 1, 1)
  tx = optax.chain(optax.sgd(1.0), project_to_anchor(radii, stacked="layers"))
  grads = jax.tree.map(lambda x: -10.0 * jnp.ones_like(x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  moved = np.sqrt(np.sum((np.asarray(new["layers"]["kernel"]) - 1.0) ** 2, axis=(1, 2)))
  np.testing.assert_allclose(moved, np.ravel(radii["layers"]["kernel"]), rtol=1e-5)


def test_zero_displacement_and_zero_radius() -> None:
  params = {"w": jnp.ones(3)}
  tx = optax.chain(optax.sgd(1.0), project_to_anchor(0.0))
  state = tx.init(params)
  for g in (jnp.zeros(3), jnp.ones(3)):
    updates, state = tx.update({"w": g}, state, params)
    assert np.all(np.isfinite(updates["w"]))
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], 1.0)


def test_explicit_anchor_and_mask_and_anchor_dtype() -> None:
  params = {"body": jnp.zeros(2), "head": jnp.zeros(2)}
  params0 = {"body": jnp.array([3.0, 4.0]), "head": jnp.zeros(2)}
  tx = optax.chain(
    optax.sgd(1.0),
    project_to_anchor(1.0, params0=params0, mask="body", anchor_dtype=jnp.bfloat16),
  )
  state = tx.init(params)
  assert state[1].inner_state.anchor["body"].dtype == jnp.bfloat16
  assert isinstance(state[1].inner_state.anchor["head"], optax.MaskedNode)
  updates, _ = tx.update({"body": jnp.zeros(2), "head": -jnp.ones(2) * 9}, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["body"], [3 - 0.6, 4 - 0.8], rtol=1e-6)  # onto the unit ball
  np.testing.assert_allclose(new["head"], [9.0, 9.0])  # not projected


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"radius": -1.0}, "radius"),
    ({"radius": {"w": 1.0, "b": -2.0}}, "radius for 'b'"),
    ({"radius": 1.0, "norm": "linf"}, "norm must be one of"),
    ({"radius": lambda a, b, c: 1.0}, "one argument"),
    ({"radius": 1.0, "params0": {"w": jnp.ones(3)}}, "params0 does not match"),
    ({"radius": 1.0, "norm": "mars", "channel_axis": 5}, "'w'"),
    ({"radius": {"w": jnp.ones(4), "b": 1.0}}, "radius for 'w' has shape"),
  ],
)
def test_bad_input_names_the_parameter(kwargs: dict, match: str) -> None:
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=match):
    tx = project_to_anchor(**kwargs)
    tx.init(params)


@pytest.mark.parametrize("context", CONTEXTS)
def test_works_in_context(context: str) -> None:
  check_context(
    context, project_to_anchor, {"radius": 0.05}, static={"norm": "mars"},
  )


def test_auto_detects_scanned_layers() -> None:
  """stacked=None: an nn.scan-style subtree ('layers', shared leading axis) is per layer."""
  params = {"embed": {"embedding": jnp.zeros((4, 2))},
            "layers": {"kernel": jnp.zeros((3, 2, 2)), "bias": jnp.zeros((3, 2))},
            "head": {"kernel": jnp.zeros((2, 2))}}
  tx = optax.chain(optax.sgd(1.0), project_to_anchor(1.0, stacked=None))
  grads = jax.tree.map(lambda x: -jnp.ones_like(x), params)
  new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  per_layer = np.sqrt(np.sum(np.asarray(new["layers"]["kernel"]) ** 2, axis=(1, 2)))
  np.testing.assert_allclose(per_layer, [1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new["head"]["kernel"]), 1.0, rtol=1e-6)
