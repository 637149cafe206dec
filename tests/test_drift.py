"""drift(): per-tensor and per-block relative drift against NumPy, jitted, from optimizer states."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualopt_jax import _paths
from dualopt_jax._drift import drift
from dualopt_jax._dualopt import dualopt
from dualopt_jax._projection import project_to_anchor
from dualopt_jax._rollback import rollback_to
from dualopt_jax._spd import spd


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(4)(nn.LayerNorm()(x))


class _ViT(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="patch_embed")(x)
    for i in range(11):
      x = _Block(name=f"Block_{i}")(x)
    return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(x))


def _pair():
  params0 = _ViT().init(jax.random.key(0), jnp.ones((1, 5)))
  noise = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params0)))
  leaves, treedef = jax.tree.flatten(params0)
  moved = [x + 0.1 * (i + 1) * jax.random.normal(k, x.shape) for i, (x, k) in
           enumerate(zip(leaves, noise, strict=True))]
  return jax.tree.unflatten(treedef, moved), params0


def _np(tree):
  return {_paths.path_str(p): np.asarray(x, np.float64) for p, x in _paths.leaves_with_paths(tree)}


def test_per_tensor_matches_numpy_and_jits() -> None:
  params, params0 = _pair()
  out = jax.jit(drift)(params, params0)
  p, p0 = _np(params), _np(params0)
  assert set(out) == {"drift/" + k for k in p}
  for k in p:
    want = np.linalg.norm(p[k] - p0[k]) / (np.linalg.norm(p0[k]) + 1e-12)
    np.testing.assert_allclose(out["drift/" + k], want, rtol=1e-5, err_msg=k)


def test_per_block_pools_each_block() -> None:
  params, params0 = _pair()
  out = jax.jit(lambda a, b: drift(a, b, per="block"))(params, params0)
  p, p0 = _np(params), _np(params0)

  def block_of(key: str) -> str:  # hand-made grouping for this model
    mod = key.split("/")[1]
    return {"patch_embed": "embed", "norm": "out", "head": "out"}.get(mod, mod)

  groups: dict[str, list[str]] = {}
  for k in p:
    groups.setdefault(block_of(k), []).append(k)
  assert len(out) == len(groups) == 13  # embeddings, 11 blocks, output side
  got = sorted(float(v) for v in out.values())
  want = sorted(
    np.sqrt(sum(np.sum((p[k] - p0[k]) ** 2) for k in ks)) / np.sqrt(sum(np.sum(p0[k] ** 2)
                                                                        for k in ks))
    for ks in groups.values()
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(
    out["drift/params/Block_10"],
    np.sqrt(sum(np.sum((p[k] - p0[k]) ** 2) for k in groups["Block_10"]))
    / np.sqrt(sum(np.sum(p0[k] ** 2) for k in groups["Block_10"])),
    rtol=1e-5,
  )


def test_stacked_layers_give_one_value_per_layer() -> None:
  params0 = {"layers": {"kernel": jnp.ones((3, 2, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
  params = {"layers": {"kernel": params0["layers"]["kernel"] * jnp.array([1.0, 1.5, 3.0])[:, None,
                                                                                          None]},
            "head": {"kernel": jnp.ones((2, 2))}}
  for per in ("tensor", "block"):
    out = drift(params, params0, per=per, stacked="layers")
    np.testing.assert_allclose(out["drift/layers" + ("/kernel" if per == "tensor" else "")],
                               [0.0, 0.5, 2.0], rtol=1e-6)


@pytest.mark.parametrize("which", ["rollback", "spd", "projection"])
def test_anchor_from_the_optimizer_state(which: str) -> None:
  params, params0 = _pair()
  tx = {
    "rollback": optax.chain(optax.adam(1e-3), rollback_to(rate=0.1)),
    "spd": spd(optax.adam(1e-3), strength=0.1),
    "projection": optax.masked(project_to_anchor(1.0), lambda p: jax.tree.map(lambda _: True, p)),
  }[which]
  state = tx.init(params0)
  got = jax.jit(lambda p, s: drift(p, opt_state=s))(params, state)
  want = drift(params, params0)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)


def test_nnx_state_and_custom_grouping() -> None:
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state0 = nnx.clone(nnx.state(model, nnx.Param))
  model.layers[0].kernel[...] = model.layers[0].kernel[...] * 2.0
  out = drift(nnx.state(model, nnx.Param), state0, per=lambda path: f"layer{path[1]}")
  k0 = np.asarray(state0["layers"][0]["kernel"][...])
  b0 = np.asarray(state0["layers"][0]["bias"][...])
  want = np.linalg.norm(k0) / np.sqrt(np.sum(k0**2) + np.sum(b0**2))
  np.testing.assert_allclose(out["drift/layer0"], want, rtol=1e-6)
  np.testing.assert_allclose(out["drift/layer1"], 0.0, atol=1e-7)


def test_reports_the_dualopt_strength() -> None:
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 2))},
            "head": {"kernel": jnp.ones((2, 1))}}
  tx = dualopt(1e-3, rollback=0.01, head="head")
  state = tx.init(params)
  out = jax.jit(lambda p, s: drift(p, opt_state=s, tx=tx))(params, state)
  strengths = {k.split("/", 1)[1]: float(v) for k, v in out.items() if k.startswith("strength/")}
  # Constant lr: 0.01 for the first block, linearly down to 0 for the last; head 0.
  assert strengths == pytest.approx({"Dense_0/kernel": 0.01, "Dense_1/kernel": 0.0,
                                     "head/kernel": 0.0})
  assert float(out["drift/Dense_0/kernel"]) == 0.0


def test_reports_the_current_strength_along_the_lr_schedule() -> None:
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 2))}}
  schedule = optax.linear_schedule(1e-3, 0.0, 10)
  tx = dualopt(schedule, rollback=0.02, peak_learning_rate=1e-3)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
  out = drift(params, opt_state=state, tx=tx)
  # After 4 updates the count is 4: lr = 0.6e-3, so the first block's fraction is 0.02 * 0.6.
  assert float(out["strength/Dense_0/kernel"]) == pytest.approx(0.012, rel=1e-5)
  assert float(out["strength/Dense_1/kernel"]) == 0.0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"per": "row"}, "per must be one of"),
    ({"params0": None}, "pass params0"),
    ({"params0": None, "opt_state": optax.adam(1e-3).init({"w": jnp.ones(2)})}, "no anchor"),
    ({"params0": {"v": jnp.ones(2)}}, "params0 has no entry for parameter path 'w'"),
    ({"params0": {"w": jnp.ones(2)}, "tx": optax.adam(1e-3)}, "not a transformation built by"),
  ],
)
def test_bad_input_is_rejected(kwargs: dict, match: str) -> None:
  kwargs.setdefault("params0", {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=match):
    drift({"w": jnp.ones(2)}, **kwargs)
