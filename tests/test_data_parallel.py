"""DualOpt data parallel on 8 CPU devices: one device, replicated, FSDP, pmap, shard_map.

All layouts train the same Flax model on the same global batch of 64 (8 per
device) and must reach the same parameters after 1 and 10 steps.

Reference: one device computing the gradient as the sum of the 8 per-shard
gradients in device order (what the all-reduce does), so the comparison sees
the optimizer, not float re-association of the batch sum. The tolerance is
``rtol=1e-6`` with an absolute floor of ``1e-6 * max|theta|`` per tensor: the
sharded programs fuse ``p + u`` differently, which moves a result by an ulp of
the tensor's scale, and where ``p + u`` nearly cancels that ulp is a large
*relative* change of a near-zero entry (measured: <= 7e-8 absolute, tensors of
scale ~0.3). A second check bounds the gap to the plain one-device run (whole
batch summed at once), which differs by the summation order of the gradient
(measured <= 4e-7 absolute after 10 steps at lr 1e-2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dualopt_jax._dualopt import dualopt
from dualopt_jax._sharding import fsdp_shardings, init_sharded, state_shardings
from dualopt_jax._spd import spd
from tests._contexts import MLP, N_DEV
from tests._contexts import data_mesh as _mesh
from tests._contexts import mlp_loss as _loss

PER_DEV = 8
STEPS = 10


MODEL = MLP()

TXS = {
  "finetune": lambda: dualopt(1e-2, mode="finetune", rollback=0.05, head="Dense_2"),
  "scratch": lambda: dualopt(1e-2, mode="scratch", weight_decay=1e-2),
  "spd": lambda: spd(optax.adam(1e-2), strength=0.5),
}


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_DEV * PER_DEV, 16)).astype(np.float32)
  y = rng.integers(0, 8, size=N_DEV * PER_DEV).astype(np.int32)
  params = _np(MODEL.init(jax.random.key(0), x[:1])["params"])  # host copies: steps donate
  return params, x, y


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _apply(tx, grads, state, params):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _run(step, params, state, x, y, take=lambda t: t):
  out = {}
  params, state = jax.block_until_ready((params, state))
  for i in range(1, STEPS + 1):
    # Inputs ready before each dispatch: CPU collectives under load (BUILD_NOTES.md, "Scale-out").
    params, state = jax.block_until_ready(step(params, state, x, y))
    if i in (1, STEPS):
      out[i] = _np(take(params))
  return out


def single_pinned(tx, params, x, y):
  """One device; gradient = sum of the 8 shard gradients in device order, / 8."""
  dev = jax.devices()[0]

  def step(p, s, x, y):
    g = None
    for k in range(N_DEV):
      sl = slice(k * PER_DEV, (k + 1) * PER_DEV)
      gk = jax.grad(_loss)(p, x[sl], y[sl])
      g = gk if g is None else jax.tree.map(jnp.add, g, gk)
    return _apply(tx, jax.tree.map(lambda a: a / N_DEV, g), s, p)

  p = jax.device_put(params, dev)
  return _run(jax.jit(step), p, tx.init(p), jax.device_put(x, dev), jax.device_put(y, dev))


def single_plain(tx, params, x, y):
  """One device, the whole batch at once."""
  dev = jax.devices()[0]
  step = jax.jit(lambda p, s, x, y: _apply(tx, jax.grad(_loss)(p, x, y), s, p))
  p = jax.device_put(params, dev)
  return _run(step, p, tx.init(p), jax.device_put(x, dev), jax.device_put(y, dev))


def _jit_mesh(tx, params, x, y, *, fsdp):
  mesh = _mesh()
  if fsdp:
    param_sh = fsdp_shardings(params, mesh, "data")
  else:
    param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  p = jax.device_put(params, param_sh)
  state_sh = state_shardings(tx, p)
  batch = NamedSharding(mesh, P("data"))
  step = jax.jit(
    lambda p, s, x, y: _apply(tx, jax.grad(_loss)(p, x, y), s, p),
    out_shardings=(param_sh, state_sh),
    donate_argnums=(0, 1),
  )
  return _run(step, p, init_sharded(tx, p), jax.device_put(x, batch), jax.device_put(y, batch))


def replicated_dp(tx, params, x, y):
  return _jit_mesh(tx, params, x, y, fsdp=False)


def fsdp(tx, params, x, y):
  return _jit_mesh(tx, params, x, y, fsdp=True)


def pmap_dp(tx, params, x, y):
  def step(p, s, x, y):
    g = jax.lax.pmean(jax.grad(_loss)(p, x, y), "batch")
    return _apply(tx, g, s, p)

  def rep(t):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV, *a.shape)), t)

  return _run(
    jax.pmap(step, axis_name="batch"),
    rep(params),
    rep(tx.init(params)),
    x.reshape(N_DEV, PER_DEV, -1),
    y.reshape(N_DEV, PER_DEV),
    take=lambda t: jax.tree.map(lambda a: a[0], t),
  )


def shard_map_dp(tx, params, x, y):
  mesh = _mesh()

  def local(p, s, x, y):
    # p is replicated (device-invariant): the gradient of the all-device mean
    # loss is already the reduced, invariant gradient (JAX inserts the psum).
    g = jax.grad(lambda p: jax.lax.pmean(_loss(p, x, y), "data"))(p)
    return _apply(tx, g, s, p)

  step = jax.jit(
    jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
    )
  )
  rep = NamedSharding(mesh, P())
  p = jax.device_put(params, rep)
  batch = NamedSharding(mesh, P("data"))
  return _run(step, p, jax.device_put(tx.init(p), rep), jax.device_put(x, batch),
              jax.device_put(y, batch))


LAYOUTS = {
  "replicated_dp": replicated_dp,
  "fsdp": fsdp,
  "pmap": pmap_dp,
  "shard_map": shard_map_dp,
}


def _assert_close(got, want, rel, where):
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(
      a, b, rtol=rel, atol=rel * float(np.max(np.abs(b))),
      err_msg=f"{where} {jax.tree_util.keystr(path)}",
    )


@pytest.mark.parametrize("mode", list(TXS))
def test_layouts_agree(mode):
  params, x, y = _data()
  ref = single_pinned(TXS[mode](), params, x, y)
  moved = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(ref[STEPS]), jax.tree.leaves(_np(params)), strict=True)
  )
  assert moved > 1e-2, "training must move the weights for the comparison to mean anything"
  for name, layout in LAYOUTS.items():
    out = layout(TXS[mode](), params, x, y)
    for step in (1, STEPS):
      _assert_close(out[step], ref[step], 1e-6, f"{mode}/{name} step {step}")
  plain = single_plain(TXS[mode](), params, x, y)
  for step in (1, STEPS):
    _assert_close(plain[step], ref[step], 1e-5, f"{mode}/single-plain step {step}")

