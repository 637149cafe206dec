"""DualOpt data parallel: jax.jit over a device mesh (replicated and FSDP) and jax.pmap.

Trains a small Flax MLP with ``dualopt`` on one global batch split over all
devices, four ways, and checks they reach the same parameters:

* one device (the reference);
* ``jax.jit`` over a ``jax.make_mesh`` mesh, batch sharded, params and
  optimizer state replicated;
* the same with params *and* optimizer state (Adam moments, rollback anchor)
  FSDP-sharded: each device stores 1/n of them;
* ``jax.pmap`` with ``lax.pmean`` of the gradients.

Run (on a CPU this simulates 8 devices; on GPUs/TPUs it uses the real ones)::

  python examples/data_parallel.py                 # fine-tune mode
  python examples/data_parallel.py --mode scratch --steps 50
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")  # CPU only; must precede importing jax

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dualopt_jax as dj  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(64)(x))
    x = nn.gelu(nn.Dense(64)(x))
    return nn.Dense(10, name="head")(x)


MODEL = MLP()


def loss_fn(params, x, y):
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_tx(mode: str) -> optax.GradientTransformation:
  if mode == "finetune":  # roll back toward the pre-trained weights; the new head is free
    return dj.dualopt(3e-3, mode="finetune", rollback=0.02, head="head")
  return dj.dualopt(3e-3, mode="scratch", weight_decay=1e-3)


def cpu_sync(tree):
  """On simulated CPU devices, finish each step before dispatching the next.

  XLA's CPU client has only about one thread per simulated device when the
  machine has fewer cores, and a collective needs all of them at once; work
  still in flight can starve it (see BUILD_NOTES.md, "Scale-out"). GPUs/TPUs: no-op.
  """
  return jax.block_until_ready(tree) if jax.default_backend() == "cpu" else tree


def train_step(tx, params, state, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def run_single(tx, params, data, steps):
  dev = jax.devices()[0]
  step = jax.jit(lambda p, s, x, y: train_step(tx, p, s, x, y))
  p = jax.device_put(params, dev)
  s = tx.init(p)
  x, y = jax.device_put(data, dev)
  for _ in range(steps):
    p, s, loss = step(p, s, x, y)
  return p, float(loss)


def run_mesh(tx, params, data, steps, *, fsdp: bool):
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
  if fsdp:
    param_sh = dj.fsdp_shardings(params, mesh, "data")  # one dimension of each tensor split n ways
  else:
    param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  p = jax.device_put(params, param_sh)
  state_sh = dj.state_shardings(tx, p)  # moments and anchor laid out like their parameter
  s = dj.init_sharded(tx, p)  # = jax.jit(tx.init, out_shardings=state_sh)(p)
  x, y = jax.device_put(data, NamedSharding(mesh, P("data")))  # batch split over devices
  step = jax.jit(
    lambda p, s, x, y: train_step(tx, p, s, x, y),
    out_shardings=(param_sh, state_sh, NamedSharding(mesh, P())),
    donate_argnums=(0, 1),
  )
  p, s = cpu_sync((p, s))
  for _ in range(steps):
    p, s, loss = cpu_sync(step(p, s, x, y))
  if fsdp:
    [(_, anchors)] = optax.tree_utils.tree_get_all_with_path(s, "anchor") or [(None, None)]
    if anchors is not None:
      leaf = anchors["Dense_1"]["kernel"]
      here = leaf.addressable_shards[0].data.nbytes
      print(f"  FSDP: anchor Dense_1/kernel {leaf.nbytes} B in all, {here} B on each device")
  return p, float(loss)


def run_pmap(tx, params, data, steps):
  n = jax.local_device_count()

  def step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    grads = jax.lax.pmean(grads, "batch")  # the all-reduce of data parallelism
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, jax.lax.pmean(loss, "batch")

  def replicate(t):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *np.shape(a))), t)

  p, s = replicate(params), replicate(tx.init(params))
  x, y = (a.reshape(n, a.shape[0] // n, *a.shape[1:]) for a in data)
  pstep = jax.pmap(step, axis_name="batch")
  for _ in range(steps):
    p, s, loss = cpu_sync(pstep(p, s, x, y))
  return jax.tree.map(lambda a: a[0], p), float(loss[0])


def max_rel_gap(a, b) -> float:
  """max over tensors of max|a - b| / max|b|."""
  return max(
    float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / max(np.max(np.abs(np.asarray(v))), 1e-12))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mode", choices=("finetune", "scratch"), default="finetune")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--per-device-batch", type=int, default=16)
  args = ap.parse_args()

  n = jax.device_count()
  print(f"{n} devices: {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
  rng = np.random.default_rng(0)
  batch = n * args.per_device_batch
  teacher = rng.normal(size=(32, 10)).astype(np.float32)
  x = rng.normal(size=(batch, 32)).astype(np.float32)
  y = np.argmax(x @ teacher, axis=1).astype(np.int32)
  params = jax.tree.map(np.asarray, MODEL.init(jax.random.key(0), x[:1])["params"])

  ref, loss = run_single(make_tx(args.mode), params, (x, y), args.steps)
  print(f"single device      : loss {loss:.6f}")
  results = {
    "jit, replicated": run_mesh(make_tx(args.mode), params, (x, y), args.steps, fsdp=False),
    "jit, FSDP": run_mesh(make_tx(args.mode), params, (x, y), args.steps, fsdp=True),
    "pmap + pmean": run_pmap(make_tx(args.mode), params, (x, y), args.steps),
  }
  worst = 0.0
  for name, (p, loss) in results.items():
    gap = max_rel_gap(p, ref)
    worst = max(worst, gap)
    print(f"{name:19s}: loss {loss:.6f}  max|params - single| / max|params| = {gap:.1e}")
  # Only the order of the gradient's batch sum differs between layouts (float32).
  ok = worst < 1e-5
  print("all layouts reach the single-device parameters" if ok else "MISMATCH", f"({worst:.1e})")
  raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
  main()
