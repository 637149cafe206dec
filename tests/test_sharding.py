"""Optimizer state sharded like the params (FSDP) on an 8-device CPU mesh."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from dualopt_jax._dualopt import dualopt
from dualopt_jax._rollback import rollback_to
from dualopt_jax._sharding import (
  abstract_state,
  fsdp_shardings,
  init_sharded,
  replicated_like,
  state_shardings,
)
from dualopt_jax._spd import spd
from tests._contexts import MLP, N_DEV
from tests._contexts import data_mesh as _mesh
from tests._contexts import mlp_loss as _loss


def _params():
  return MLP().init(jax.random.key(0), jnp.zeros((1, 16)))["params"]


TXS = {
  "adamw": lambda p: optax.adamw(1e-2, weight_decay=1e-2),
  "adam+rollback_to": lambda p: optax.chain(optax.adam(1e-2), rollback_to(rate=0.05)),
  "adam+rollback_to(bf16 anchor)": lambda p: optax.chain(
    optax.adam(1e-2), rollback_to(rate=0.05, anchor_dtype=jnp.bfloat16)
  ),
  "rollback_to(params0, mask)": lambda p: optax.chain(
    optax.adam(1e-2), rollback_to(p, rate=0.05, mask=["Dense_0/*", "Dense_1/*"])
  ),
  "dualopt(finetune)": lambda p: dualopt(1e-2, mode="finetune", rollback=0.05, head="Dense_2"),
  "dualopt(scratch)": lambda p: dualopt(1e-2, mode="scratch", weight_decay=1e-2),
  "spd(adam)": lambda p: spd(optax.adam(1e-2), strength=0.5),
}


def _bytes_on(x, device) -> int:
  return sum(s.data.nbytes for s in x.addressable_shards if s.device == device)


def _param_sized_leaves(state, params):
  """State leaves that have the shape of some parameter (moments, anchors)."""
  shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
  return [x for x in jax.tree.leaves(state) if tuple(x.shape) in shapes and x.ndim > 0]


def _anchors(state):
  found = optax.tree_utils.tree_get_all_with_path(state, "anchor")
  return [leaf for _, tree in found for leaf in jax.tree.leaves(tree)]


def _shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _train(tx, params, state, steps, *, out_shardings=None):
  mesh_sh = jax.tree.leaves(params)[0].sharding
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  y = rng.integers(0, 8, size=64).astype(np.int32)
  batch_sh = NamedSharding(mesh_sh.mesh, P("data"))
  x, y = jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)

  def step(p, s):
    grads = jax.grad(_loss)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, out_shardings=out_shardings, donate_argnums=(0, 1))
  params, state = jax.block_until_ready((params, state))
  for _ in range(steps):
    params, state = jax.block_until_ready(step(params, state))
  return params, state


@pytest.mark.parametrize("created", ["outside_jit", "inside_jit"])
@pytest.mark.parametrize("name", list(TXS))
def test_state_sharded_like_params(name, created):
  mesh = _mesh()
  params = _params()
  param_sh = fsdp_shardings(params, mesh, "data")
  assert all(s.spec != P() for s in jax.tree.leaves(param_sh)), "every tensor must be split"
  params = jax.device_put(params, param_sh)
  tx = TXS[name](params)
  sh = state_shardings(tx, params)
  if created == "outside_jit":
    state = jax.device_put(tx.init(params), sh)
  else:
    state = init_sharded(tx, params)
  before = _shardings_of(state)
  types_before = jax.tree.map(jax.typeof, state)
  assert jax.tree.structure(before) == jax.tree.structure(sh)
  assert jax.tree.leaves(before) == jax.tree.leaves(sh)

  # Each device holds exactly 1/8 of every param-sized buffer (moments, anchor).
  big = _param_sized_leaves(state, params)
  assert big, name
  for leaf in big:
    assert leaf.sharding.spec != P(), (name, leaf.shape)
    for device in mesh.devices.flat:
      assert _bytes_on(leaf, device) * N_DEV == leaf.nbytes, (name, leaf.shape, device)
  anchors = _anchors(state)
  if name in ("adamw", "dualopt(scratch)"):
    assert not anchors
  else:
    assert anchors, f"{name} should store an anchor"
    for leaf in anchors:
      if "bf16" in name:
        assert leaf.dtype == jnp.bfloat16
      for device in mesh.devices.flat:
        assert _bytes_on(leaf, device) * N_DEV == leaf.nbytes
    if "mask" in name:  # masked-out Dense_2 stores no anchor: 2 kernels + 2 biases
      assert len(anchors) == 4
  # Scalars (step counts) are replicated over the mesh.
  for leaf in jax.tree.leaves(state):
    if leaf.ndim == 0:
      assert leaf.sharding == NamedSharding(mesh, P())

  # Ten steps with the shardings pinned keep them; so does plain propagation.
  params, state = _train(tx, params, state, 10, out_shardings=(param_sh, sh))
  assert jax.tree.leaves(_shardings_of(state)) == jax.tree.leaves(before)
  assert jax.tree.map(jax.typeof, state) == types_before
  params, state = _train(tx, params, state, 2)
  for got, want in zip(jax.tree.leaves(_shardings_of(state)), jax.tree.leaves(before), strict=True):
    assert got.is_equivalent_to(want, 2), (name, got, want)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_explicit_mesh_types_carry_the_sharding():
  """Under an Explicit-axes mesh the sharding is part of the type (``jax.typeof``)."""
  mesh = _mesh(AxisType.Explicit)
  params = jax.device_put(_params(), fsdp_shardings(_params(), mesh))
  tx = dualopt(1e-2, mode="finetune", rollback=0.05, anchor_dtype=jnp.bfloat16)
  state = init_sharded(tx, params)
  anchor_k = state[1].anchor["Dense_1"]["kernel"]
  assert str(jax.typeof(anchor_k)) in ("bfloat16[32@data,32]", "bfloat16[32,32@data]")
  types_before = jax.tree.map(jax.typeof, state)

  def step(p, s):
    grads = jax.tree.map(lambda w: 0.1 * w + 0.01, p)
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step)
  for _ in range(10):
    params, state = step(params, state)
  assert jax.tree.map(jax.typeof, state) == types_before
  # The abstract state (what Orbax restores into) carries the same types.
  target = abstract_state(tx, params)
  assert [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(target)] == [
    (x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(state)
  ]


def test_sharded_update_matches_single_device_and_numpy():
  """The FSDP-sharded state gives the same numbers as one device and as NumPy (same gradients)."""
  mesh = _mesh()
  params = _params()
  tx = optax.chain(optax.adam(1e-2), rollback_to(rate=0.05))
  dev0 = jax.devices()[0]
  p1 = jax.device_put(params, dev0)
  s1 = tx.init(p1)
  p8 = jax.device_put(params, fsdp_shardings(params, mesh))
  s8 = init_sharded(tx, p8)
  grads = [jax.tree.map(lambda w, k=k: jnp.sin(w * (k + 1)), params) for k in range(5)]
  upd = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for g in grads:
    u1, s1 = upd(jax.device_put(g, dev0), s1, p1)
    p1 = optax.apply_updates(p1, u1)
    u8, s8 = upd(jax.device_put(g, _shardings_of(p8)), s8, p8)
    p8 = optax.apply_updates(p8, u8)
  for a, b in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
  # And both follow a float64 NumPy transcription of Adam + rollback (u' = u - lam (p + u - a)).
  lr, lam, b1, b2, eps = 1e-2, 0.05, 0.9, 0.999, 1e-8
  for leaf, out in zip(jax.tree.leaves(params), jax.tree.leaves(p8), strict=True):
    p = a = np.asarray(leaf, np.float64)
    m = v = np.zeros_like(p)
    for t in range(1, 6):
      g = np.sin(np.asarray(leaf, np.float64) * t)
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      u = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      p = p + u - lam * (p + u - a)
    np.testing.assert_allclose(np.asarray(out), p, rtol=1e-5, atol=1e-6)


def test_abstract_params_need_no_memory():
  """Shardings for a large model come from ShapeDtypeStructs (nothing allocated)."""
  mesh = _mesh()
  shapes = {"embed": (50304, 2048), "blocks": {"w": (24, 2048, 8192)}, "norm": (2048,)}
  params = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  param_sh = fsdp_shardings(params, mesh)
  assert param_sh["blocks"]["w"].spec == P(None, None, "data")
  tx = dualopt(1e-4, mode="finetune", stacked="blocks", anchor_dtype=jnp.bfloat16)
  sh = state_shardings(tx, params, param_sh)
  assert sh[1].anchor["blocks"]["w"] == param_sh["blocks"]["w"]
  assert sh[0][0].mu["embed"] == param_sh["embed"]
  assert sh[1].count == NamedSharding(mesh, P())
  # PartitionSpecs with a mesh work as well.
  specs = jax.tree.map(lambda s: s.spec, param_sh)
  assert jax.tree.leaves(state_shardings(tx, params, specs, mesh=mesh)) == jax.tree.leaves(sh)


def test_path_fallback_agrees_with_tree_map_params():
  """rollback_to(params0) rejects optax's placeholder; the path route gives the same layout."""
  mesh = _mesh()
  params = jax.device_put(_params(), fsdp_shardings(_params(), mesh))
  with_p0 = state_shardings(optax.chain(optax.adam(1e-2), rollback_to(params, rate=0.1)), params)
  without = state_shardings(optax.chain(optax.adam(1e-2), rollback_to(rate=0.1)), params)
  assert jax.tree.leaves(with_p0) == jax.tree.leaves(without)


def test_single_device_params():
  dev = jax.devices()[3]
  params = jax.device_put(_params(), dev)
  sh = state_shardings(optax.chain(optax.adam(1e-2), rollback_to(rate=0.1)), params)
  assert all(s == SingleDeviceSharding(dev) for s in jax.tree.leaves(sh))
  assert replicated_like({"a": SingleDeviceSharding(dev)}) == SingleDeviceSharding(dev)


def test_errors_name_the_parameter():
  mesh = _mesh()
  params = {"enc": {"w": np.ones((8, 8), np.float32)}}
  tx = optax.adam(1e-3)
  with pytest.raises(ValueError, match="'enc/w'.*no sharding"):
    state_shardings(tx, params)
  with pytest.raises(ValueError, match="'enc/w'.*PartitionSpec.*mesh="):
    state_shardings(tx, params, {"enc": {"w": P("data")}})
  with pytest.raises(ValueError, match="'enc/w'.*Sharding or PartitionSpec"):
    state_shardings(tx, params, {"enc": {"w": "data"}})
  with pytest.raises(ValueError, match="structure of params"):
    state_shardings(tx, params, {"dec": {"w": P()}}, mesh=mesh)
  with pytest.raises(ValueError, match="axis 'model' is not an axis"):
    fsdp_shardings(params, mesh, "model")


_COLLECTIVE = re.compile(
  r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("
)


def _collectives(tx, params, param_sh):
  state = init_sharded(tx, params)
  update = jax.jit(
    lambda g, s, p: tx.update(g, s, p), out_shardings=(param_sh, state_shardings(tx, params))
  )
  hlo = update.lower(params, state, params).compile().as_text()
  return [m.groups() for m in _COLLECTIVE.finditer(hlo)]


def test_optimizer_step_adds_no_collectives_beyond_per_tensor_scalars():
  """Compiled FSDP update: elementwise transforms communicate nothing; SPD only scalars."""
  mesh = _mesh()
  params = _params()
  param_sh = fsdp_shardings(params, mesh)
  params = jax.device_put(params, param_sh)
  for name in ("adamw", "adam+rollback_to", "dualopt(finetune)", "dualopt(scratch)"):
    assert _collectives(TXS[name](params), params, param_sh) == [], name
  found = _collectives(TXS["spd(adam)"](params), params, param_sh)
  assert found and all(kind == "all-reduce" for _, kind in found), found
  shapes = " ".join(shape for shape, _ in found)
  assert not re.search(r"\[\d", shapes), f"SPD must reduce only scalars: {shapes}"
  # <g, p - a>, |p~ - a|^2 and |p - a|^2 for each of the 6 sharded tensors.
  assert len(re.findall(r"f32\[\]", shapes)) == 3 * len(jax.tree.leaves(params)), shapes


def test_abstract_mesh_256_devices_per_device_bytes():
  """Layout for a pod that is not here: AbstractMesh, ShapeDtypeStructs; 12 bytes/param / 256."""
  mesh = jax.sharding.AbstractMesh((256,), ("data",), axis_types=(AxisType.Auto,))
  S = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  params = {"embed": S(32000, 4096), "layers": {"w1": S(32, 4096, 11008), "n": S(32, 4096)}}
  param_sh = fsdp_shardings(params, mesh)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  for anchor_dtype, bytes_per_param in ((None, 12), (jnp.bfloat16, 10)):
    tx = dualopt(1e-4, mode="finetune", stacked="layers", anchor_dtype=anchor_dtype)
    sh = state_shardings(tx, params, param_sh)
    abstract = jax.eval_shape(tx.init, params)
    per_device = sum(
      int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
      for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(sh), strict=True)
    )
    # + two int32 counts + the replicated float32 depths: embed (), w1 (32, 1, 1), n (32, 1),
    # + the rate and the profile numbers the next update applies (float32 scalar and (4,)).
    depths = 4 + 32 * 4 + 32 * 4
    mirrored = 4 + 4 * 4
    assert per_device == n * bytes_per_param // 256 + 2 * 4 + depths + mirrored, per_device


def test_nnx_state_params():
  """Flax NNX: an ``nnx.State`` of Params works like a Linen dict (Variable-wrapped leaves)."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(16, 32, rngs=rngs)
      self.l2 = nnx.Linear(32, 8, rngs=rngs)

  mesh = _mesh()
  model = Net(nnx.Rngs(0))
  param_sh = fsdp_shardings(nnx.state(model, nnx.Param), mesh)
  nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), param_sh))
  params = nnx.state(model, nnx.Param)
  tx = dualopt(1e-3, mode="finetune", anchor_dtype=jnp.bfloat16)
  state = init_sharded(tx, params)
  [(_, anchor)] = optax.tree_utils.tree_get_all_with_path(state, "anchor")
  want = list(jax.tree.leaves(param_sh))
  assert [x.sharding for x in jax.tree.leaves(anchor)] == want
  assert [x.sharding for x in jax.tree.leaves(state[0][0].mu)] == want
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(anchor))
