"""drift(): per-tensor and per-block relative drift against NumPy, jitted, from optimizer states.

With an optimizer state drift also reports what the next update applies; those values are
checked against updates measured from real steps and closed forms, never against describe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dualopt_jax as dj
from dualopt_jax import _paths
from dualopt_jax._drift import drift
from dualopt_jax._projection import project_to_anchor
from dualopt_jax._rollback import rollback_to
from dualopt_jax._spd import spd
from tests._contexts import DEPTH, PEAK, ViT, schedule
from tests._contexts import make_params as _params


def _pair():
  params0 = ViT(num_blocks=11).init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  noise = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params0)))
  leaves, treedef = jax.tree.flatten(params0)
  moved = [x + 0.1 * (i + 1) * jax.random.normal(k, x.shape) for i, (x, k) in
           enumerate(zip(leaves, noise, strict=True))]
  return jax.tree.unflatten(treedef, moved), params0


def _np(tree):
  return {_paths.path_str(p): np.asarray(x, np.float64) for p, x in _paths.leaves_with_paths(tree)}


def _rel(p, p0):
  return np.linalg.norm(p - p0) / (np.linalg.norm(p0) + 1e-12)


def test_per_tensor_matches_numpy_and_jits() -> None:
  params, params0 = _pair()
  out = jax.jit(lambda p, p0: drift(p, params0=p0))(params, params0)
  p, p0 = _np(params), _np(params0)
  assert set(out) == {"drift/" + k for k in p}
  for k in p:
    np.testing.assert_allclose(out["drift/" + k], _rel(p[k], p0[k]), rtol=1e-5, err_msg=k)


def test_params0_is_keyword_only() -> None:
  params, params0 = _pair()
  with pytest.raises(TypeError):
    drift(params, None, params0)  # a third positional argument
  # The second positional argument is the optimizer state: a params tree there has no anchor.
  with pytest.raises(ValueError, match="holds no anchor.*pass params0"):
    drift(params, params0)


def test_per_block_pools_each_block() -> None:
  params, params0 = _pair()
  out = jax.jit(lambda a, b: drift(a, params0=b, granularity="block"))(params, params0)
  p, p0 = _np(params), _np(params0)

  def block_of(key: str) -> str:  # hand-made grouping for this model
    mod = key.split("/")[0]
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
    out["drift/Block_10"],
    np.sqrt(sum(np.sum((p[k] - p0[k]) ** 2) for k in groups["Block_10"]))
    / np.sqrt(sum(np.sum(p0[k] ** 2) for k in groups["Block_10"])),
    rtol=1e-5,
  )


@pytest.mark.parametrize("source", ["params0", "opt_state"])
def test_linen_variables_wrapping(source: str) -> None:
  params, params0 = _pair()
  variables, variables0 = {"params": params}, {"params": params0}
  if source == "params0":
    out = drift(variables, params0=variables0)
  else:
    out = drift(variables, optax.chain(optax.sgd(0.1), rollback_to(rate=0.1)).init(variables0))
  p, p0 = _np(params), _np(params0)
  assert {k for k in out if k.startswith("drift/")} == {"drift/params/" + k for k in p}
  for k in p:
    np.testing.assert_allclose(out["drift/params/" + k], _rel(p[k], p0[k]), rtol=1e-5)


def test_stacked_layers_give_one_value_per_layer() -> None:
  params0 = {"layers": {"kernel": jnp.ones((3, 2, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
  scale = jnp.array([1.0, 1.5, 3.0])[:, None, None]
  params = {"layers": {"kernel": params0["layers"]["kernel"] * scale},
            "head": {"kernel": jnp.ones((2, 2))}}
  for per in ("tensor", "block"):
    out = drift(params, params0=params0, granularity=per, stacked="layers")
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
  p, p0 = _np(params), _np(params0)
  assert {k for k in got if k.startswith("drift/")} == {"drift/" + k for k in p}
  for k in p:
    np.testing.assert_allclose(got["drift/" + k], _rel(p[k], p0[k]), rtol=1e-5, err_msg=k)
  extra = {k.split("/", 1)[0] for k in got} - {"drift"}
  assert extra == {"rollback": {"rollback"}, "spd": set(), "projection": {"radius"}}[which]


def test_nnx_state_and_custom_grouping() -> None:
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state0 = nnx.clone(nnx.state(model, nnx.Param))
  model.layers[0].kernel[...] = model.layers[0].kernel[...] * 2.0
  layer_of = lambda tree: jax.tree_util.tree_map_with_path(
    lambda kp, _x: f"layer{kp[1].key}", tree
  )
  out = drift(nnx.state(model, nnx.Param), params0=state0, groups=layer_of)
  k0 = np.asarray(state0["layers"][0]["kernel"][...])
  b0 = np.asarray(state0["layers"][0]["bias"][...])
  want = np.linalg.norm(k0) / np.sqrt(np.sum(k0**2) + np.sum(b0**2))
  np.testing.assert_allclose(out["drift/layer0"], want, rtol=1e-6)
  np.testing.assert_allclose(out["drift/layer1"], 0.0, atol=1e-7)


def test_nnx_optimizer_state_gives_anchor_and_strengths() -> None:
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state0 = {k: np.asarray(v, np.float64) for k, v in _np(nnx.state(model, nnx.Param)).items()}
  tx = dj.dualopt(0.1, rollback=0.2, rollback_floor=0.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3))) ** 2))(model)
  optimizer.update(model, grads)
  out = drift(nnx.state(model, nnx.Param), optimizer.opt_state)
  p = _np(nnx.state(model, nnx.Param))
  for k in p:
    np.testing.assert_allclose(out["drift/" + k], _rel(p[k], state0[k]), rtol=1e-5, err_msg=k)
    layer = int(k.split("/")[1])  # layers/0 at depth 0, layers/1 at depth 1
    np.testing.assert_allclose(out["rollback/" + k], 0.2 * (1 - layer), atol=1e-7, err_msg=k)


# --- what the next update applies --------------------------------------------------------------

# PEAK, DEPTH, _params (three numbered blocks and a head) and schedule: tests/_contexts.py.


def _away(anchor):
  """Params well away from the anchor (and from 0), so that fractions are measured to ~1e-8."""
  return jax.tree.map(lambda x: x + jnp.where(x >= 0, 1.0, -1.0), anchor)


def _grads(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in
                                      zip(keys, leaves, strict=True)])


def _sgd_step(grads, lr):
  """The plain SGD step without momentum, -lr * g."""
  return jax.tree.map(lambda g: -lr * g, grads)


def _fraction(p, u, u_plain, anchor):
  """Elementwise lambda with p + u - a = (1 - lambda)(p + u_plain - a) (float64)."""
  p, u, u_plain = _np(p), _np(u), _np(u_plain)
  a = _np(anchor) if anchor is not None else {k: 0.0 for k in p}
  return {k: 1.0 - (p[k] + u[k] - a[k]) / (p[k] + u_plain[k] - a[k]) for k in p}


def _of(out, kind):
  return {k.split("/", 1)[1]: np.asarray(v) for k, v in out.items() if k.startswith(kind + "/")}


def test_rollback_equals_the_next_update_along_the_lr_schedule() -> None:
  anchor = _params()
  tx = dj.dualopt(schedule, rollback=0.2, rollback_floor=0.0, power=2.0, head="head",
                  peak_learning_rate=PEAK)
  ref = optax.chain(optax.scale_by_adam(eps_root=0.0), optax.scale_by_learning_rate(schedule))
  state, ref_state, p = tx.init(anchor), ref.init(anchor), _away(anchor)
  logged = jax.jit(lambda p, s: drift(p, s))
  backbone = {f"{b}/{leaf}" for b in DEPTH for leaf in ("kernel", "bias")}
  for count, key in enumerate(jax.random.split(jax.random.key(1), 6)):
    out = logged(p, state)
    # The head has no anchor (masked out): no drift and no rollback for it.
    assert set(_of(out, "drift")) == set(_of(out, "rollback")) == backbone
    pn, an = _np(p), _np(anchor)
    for k, v in _of(out, "drift").items():
      np.testing.assert_allclose(v, _rel(pn[k], an[k]), rtol=1e-5, err_msg=k)
    grads = _grads(key, p)
    updates, state = tx.update(grads, state, p)
    u_plain, ref_state = ref.update(grads, ref_state, p)
    lam = _fraction(p, updates, u_plain, anchor)
    for k, v in _of(out, "rollback").items():
      want = 0.2 * schedule(count) / PEAK * (1 - DEPTH[k.split("/")[0]]) ** 2
      np.testing.assert_allclose(lam[k], v, atol=1e-6, err_msg=f"{k} count {count}")
      np.testing.assert_allclose(v, want, atol=1e-7, err_msg=f"{k} count {count}")
    np.testing.assert_array_equal(_np(updates)["head/kernel"], _np(u_plain)["head/kernel"])
    p = optax.apply_updates(p, updates)


def _not_head(tree):
  return {k: jax.tree.map(lambda _, k=k: k != "head", v) for k, v in tree.items()}


def test_masked_rollback_along_the_lr_schedule() -> None:
  anchor = _params()
  rate = lambda count: 0.3 * schedule(count) / PEAK
  tx = optax.chain(
    optax.sgd(schedule),
    optax.masked(rollback_to(rate=rate, layer_scale=dj.LayerProfile(1.0, 0.5)), _not_head),
  )
  state, p = tx.init(anchor), _away(anchor)
  grads = jax.tree.map(jnp.sin, anchor)
  for count in range(5):
    out = jax.jit(drift)(p, state)
    assert not any(k.startswith(("drift/head", "rollback/head")) for k in out)
    updates, state = tx.update(grads, state, p)
    lam = _fraction(p, updates, _sgd_step(grads, schedule(count)), anchor)
    rollback = _of(out, "rollback")
    assert len(rollback) == 6
    for k, v in rollback.items():
      want = rate(count) * (0.5 + 0.5 * (1 - DEPTH[k.split("/")[0]]))
      np.testing.assert_allclose(lam[k], v, atol=1e-6, err_msg=f"{k} count {count}")
      np.testing.assert_allclose(v, want, atol=1e-7, err_msg=f"{k} count {count}")
    p = optax.apply_updates(p, updates)


def test_inject_hyperparams_changed_mid_run() -> None:
  anchor = _params()
  tx = optax.inject_hyperparams(dj.dualopt)(
    learning_rate=PEAK, rollback=0.2, rollback_floor=0.0, head="head", peak_learning_rate=PEAK,
    optimizer="sgd",
    momentum=0.0,
  )
  state, p = tx.init(anchor), _away(anchor)
  grads = jax.tree.map(jnp.cos, anchor)
  for lr, rollback, power in ((PEAK, 0.2, 1.0), (PEAK / 4, 0.2, 1.0), (PEAK / 4, 0.05, 2.0)):
    state.hyperparams.update(learning_rate=jnp.asarray(lr), rollback=jnp.asarray(rollback),
                             power=jnp.asarray(power))
    updates, state = tx.update(grads, state, p)  # the new values take effect here ...
    p = optax.apply_updates(p, updates)
    out = jax.jit(drift)(p, state)  # ... and in what drift reports for the next update
    updates, _ = tx.update(grads, state, p)
    lam = _fraction(p, updates, _sgd_step(grads, lr), anchor)
    for k, v in _of(out, "rollback").items():
      want = rollback * lr / PEAK * (1 - DEPTH[k.split("/")[0]]) ** power
      np.testing.assert_allclose(v, want, atol=1e-7, err_msg=f"{k} lr {lr}")
      np.testing.assert_allclose(lam[k], v, atol=1e-6, err_msg=f"{k} lr {lr}")
    assert len(_of(out, "rollback")) == 6


def test_scratch_decay_needs_params0_and_reports_the_decay() -> None:
  params0 = _params()
  tx = dj.dualopt(schedule, mode="scratch", weight_decay=0.1, head="head",
                  peak_learning_rate=PEAK, optimizer="sgd", momentum=0.0)
  state, p = tx.init(params0), params0
  grads = jax.tree.map(jnp.sin, params0)
  with pytest.raises(ValueError, match="pass params0"):
    drift(p, state)  # scratch mode keeps no anchor
  for count in range(4):
    out = jax.jit(lambda p, s, p0: drift(p, s, params0=p0))(p, state, params0)
    assert len(_of(out, "drift")) == 8  # params0 given: every leaf, the head too
    updates, state = tx.update(grads, state, p)
    lam = _fraction(p, updates, _sgd_step(grads, schedule(count)), None)
    decay = _of(out, "decay")
    assert set(decay) == {f"{b}/{leaf}" for b in DEPTH for leaf in ("kernel", "bias")}
    for k, v in decay.items():
      want = 0.1 * schedule(count) / PEAK * (1 - DEPTH[k.split("/")[0]])
      np.testing.assert_allclose(lam[k], v, atol=1e-6, err_msg=f"{k} count {count}")
      np.testing.assert_allclose(v, want, atol=1e-7, err_msg=f"{k} count {count}")
    p = optax.apply_updates(p, updates)


def test_projection_reports_the_next_radius() -> None:
  anchor = _params()
  radius = optax.linear_schedule(1.0, 0.2, 6)
  tx = optax.chain(optax.sgd(PEAK), project_to_anchor(radius, mask="Dense_*"))
  state, p = tx.init(anchor), jax.tree.map(lambda x: x + 1.0, anchor)  # outside every ball
  grads = jax.tree.map(jnp.sin, anchor)
  for count in range(4):
    out = jax.jit(drift)(p, state)
    updates, state = tx.update(grads, state, p)
    new = {k: v + _np(updates)[k] for k, v in _np(p).items()}
    radii = _of(out, "radius")
    assert len(radii) == 6 and not any(k.startswith("drift/head") for k in out)
    for k, v in radii.items():
      np.testing.assert_allclose(v, float(radius(count)), atol=1e-7, err_msg=k)
      np.testing.assert_allclose(np.linalg.norm(new[k] - _np(anchor)[k]), v, atol=1e-6)
    p = optax.apply_updates(p, updates)


def test_lr_decay_reports_the_next_scale() -> None:
  params = _params()
  decay = optax.linear_schedule(0.5, 0.9, 4)
  tx = optax.chain(optax.sgd(PEAK), dj.layerwise_lr_decay(decay))
  state = tx.init(params)
  grads = jax.tree.map(jnp.sin, params)
  exponent = {"Dense_0": 3, "Dense_1": 2, "Dense_2": 1, "head": 0}  # BEiT: L - i, head 0
  for count in range(3):
    out = drift(params, state, params0=params)
    updates, state = tx.update(grads, state, params)
    scale = _of(out, "lr_scale")
    assert len(scale) == 8
    for k, v in scale.items():
      np.testing.assert_allclose(v, float(decay(count)) ** exponent[k.split("/")[0]], atol=1e-6)
      np.testing.assert_allclose(_np(updates)[k] / (-PEAK * _np(grads)[k]), v, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"granularity": "row"}, ValueError, "granularity must be one of"),
    ({"granularity": "block", "groups": {"w": "a"}}, ValueError, "not both"),
    ({"params0": None}, ValueError, "pass params0"),
    ({"params0": None, "opt_state": optax.adam(1e-3).init({"w": jnp.ones(2)})}, ValueError,
     "no anchor"),
    ({"params0": {"v": jnp.ones(2)}}, ValueError, "params0 has no entry for parameter path 'w'"),
    ({"tx": optax.adam(1e-3)}, TypeError, "tx"),
  ],
)
def test_bad_input_is_rejected(kwargs: dict, error: type, match: str) -> None:
  kwargs.setdefault("params0", {"w": jnp.ones(2)})
  with pytest.raises(error, match=match):
    drift({"w": jnp.ones(2)}, **kwargs)


def test_no_leaf_with_an_anchor_is_rejected() -> None:
  params = {"head": {"kernel": jnp.ones((2, 2))}}
  state = optax.masked(rollback_to(rate=0.1), lambda p: {"head": {"kernel": False}}).init(params)
  with pytest.raises(ValueError, match="no float leaf of params has an anchor"):
    drift(params, state)
