"""One process of the 2-process JAX cluster started by tests/test_multihost.py.

Run (one per process, same port)::

  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 python tests/_multihost_worker.py \
      --process-id 0 --num-processes 2 --port 12345 --steps 5 --out /tmp/run

It joins the cluster over 127.0.0.1 (gloo CPU collectives), trains the small
Flax model of ``multihost_problem`` with ``dualopt`` on the global mesh
(FSDP or replicated), writes the gathered parameters (process 0) and an Orbax
checkpoint of params + optimizer state (all processes) into ``--out``.
The module also holds the problem definition the test reuses in-process, and what the
cluster tests share: ``join_cluster`` (with the heartbeat and shutdown timeouts) and
``setup_training`` for the workers (``tests/_fault_worker.py`` too), ``start_workers``,
``wait_workers`` and ``kill_workers`` for the parent.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _set_env(local_devices: int) -> None:
  """Must run before JAX initializes: CPU only, ``local_devices`` devices here."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_NUM_CPU_DEVICES"] = str(local_devices)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags)


# ---------------------------------------------------------------- the problem
GLOBAL_BATCH = 32
IN_DIM = 16
LR = 1e-2


def make_problem():
  """(model, numpy params, x, y, make_tx): identical in every process."""
  import flax.linen as nn
  import jax
  import numpy as np

  from dualopt_jax._dualopt import dualopt

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.tanh(nn.Dense(32)(x))
      x = nn.tanh(nn.Dense(32)(x))
      return nn.Dense(8, name="head")(x)

  model = MLP()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(GLOBAL_BATCH, IN_DIM)).astype(np.float32)
  y = rng.integers(0, 8, size=GLOBAL_BATCH).astype(np.int32)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), x[:1])["params"])

  def make_tx():
    return dualopt(LR, mode="finetune", rollback=0.05, head="head")

  return model, params, x, y, make_tx


def loss_fn(model, params, x, y):
  import optax

  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def flat_params(params) -> dict:
  import jax
  import numpy as np

  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


# ---------------------------------------------------------------- cluster set-up
# A dead peer must take the survivors down within seconds, not minutes (BUILD_NOTES.md,
# "Fault recovery"): a process that sent no heartbeat for HEARTBEAT_TIMEOUT_S is declared dead
# and the coordination service fails every other process; a failing process waits at most
# SHUTDOWN_TIMEOUT_S for its peers at exit (the jax defaults are 100 s and 300 s).
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 5
INIT_TIMEOUT_S = 60


def add_cluster_args(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--process-id", type=int, required=True)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--port", type=int, required=True)
  ap.add_argument("--local-devices", type=int, default=2)
  ap.add_argument("--out", required=True)
  ap.add_argument("--timeout", type=int, default=120, help="the process kills itself after this")


def join_cluster(args) -> None:
  """Arms the alarm, pins the CPU devices and joins the cluster over 127.0.0.1 (gloo)."""
  signal.alarm(args.timeout)  # never outlive a lost parent or a hung collective
  _set_env(args.local_devices)
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{args.port}"
  jax.distributed.initialize(
    coordinator_address=address,
    coordinator_bind_address=address,  # loopback only
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=INIT_TIMEOUT_S,
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
  )
  n_global = args.num_processes * args.local_devices
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.local_device_count() == args.local_devices, jax.local_devices()
  assert jax.device_count() == n_global, jax.devices()


def setup_training(layout: str = "fsdp"):
  """The problem on the global mesh: (params, state, x, y, tx, step, param_sh).

  ``step(params, state, x, y)`` is jitted with donation and keeps the params' and the
  state's shardings.
  """
  import jax
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from dualopt_jax._sharding import fsdp_shardings, init_sharded, state_shardings

  model, params_np, x_np, y_np, make_tx = make_problem()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  if layout == "fsdp":
    param_sh = fsdp_shardings(params_np, mesh, "data")
  else:
    param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params_np)

  def global_array(host_value, sharding):
    # Every process holds the same host value; each supplies only its own slices.
    return jax.make_array_from_callback(host_value.shape, sharding, lambda idx: host_value[idx])

  params = jax.tree.map(global_array, params_np, param_sh)
  batch_sh = NamedSharding(mesh, P("data"))
  x, y = global_array(x_np, batch_sh), global_array(y_np, batch_sh)

  tx = make_tx()
  state_sh = state_shardings(tx, params)
  state = init_sharded(tx, params)

  def step(p, s, x, y):
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
  params, state = jax.block_until_ready((params, state))
  return params, state, x, y, tx, step, param_sh


# ---------------------------------------------------------------- the parent's side
def child_env(root: str, local_devices: int) -> dict:
  """The environment of a worker: CPU, ``local_devices`` devices, ``root`` importable."""
  env = dict(os.environ)
  # The children must not inherit conftest's 8 devices.
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_NUM_CPU_DEVICES"] = str(local_devices)
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
  )
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  return env


def free_port() -> int:
  import socket

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_workers(cmds, out_dir: str, env: dict, cwd: str) -> list:
  """One process per command, each in its own session, output to ``out_dir/worker{i}.log``."""
  import subprocess

  procs = []
  try:
    for i, cmd in enumerate(cmds):
      with open(os.path.join(out_dir, f"worker{i}.log"), "w") as log:
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
  except BaseException:
    kill_workers(procs)
    raise
  return procs


def wait_workers(procs, timeout_s: float, *, stop_on_failure: bool = True) -> dict:
  """Polls until all exited (or one failed, with ``stop_on_failure``); {index: exit time}."""
  import time

  exited: dict[int, float] = {}
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and len(exited) < len(procs):
    for i, p in enumerate(procs):
      if i not in exited and p.poll() is not None:
        exited[i] = time.time()
    if stop_on_failure and any(procs[i].returncode != 0 for i in exited):
      break
    time.sleep(0.05)
  return exited


def kill_workers(procs) -> None:
  """SIGKILL to each worker's process group (its own session: only what we started)."""
  import contextlib
  import subprocess

  for p in procs:
    if p.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    try:
      p.wait(timeout=10)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait(timeout=10)


def worker_logs(procs, out_dir: str) -> str:
  text = ""
  for i, p in enumerate(procs):
    with open(os.path.join(out_dir, f"worker{i}.log")) as f:
      text += f"--- worker {i} (exit {p.returncode}) ---\n{f.read()[-3000:]}\n"
  return text


# ---------------------------------------------------------------- the worker
def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  add_cluster_args(ap)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--layout", choices=("fsdp", "replicated"), default="fsdp")
  args = ap.parse_args(argv)
  if args.steps < 0:
    ap.error(f"--steps must be >= 0, got {args.steps}")
  join_cluster(args)
  import jax
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  params, state, x, y, _, step, _ = setup_training(args.layout)
  for _ in range(args.steps):  # one step in flight at a time (BUILD_NOTES.md, "Scale-out")
    params, state = jax.block_until_ready(step(params, state, x, y))

  # Anchor bytes per device: the FSDP layout keeps 1/n of it on each device.
  [(_, anchors)] = optax.tree_utils.tree_get_all_with_path(state, "anchor")
  anchor = anchors["Dense_0"]["kernel"]
  per_device = {s.device.id: s.data.nbytes for s in anchor.addressable_shards}
  assert len(set(per_device.values())) == 1, per_device
  local_bytes = next(iter(per_device.values()))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    np.savez(os.path.join(args.out, "params.npz"), **flat_params(gathered))
  with open(os.path.join(args.out, f"info_{args.process_id}.txt"), "w") as f:
    f.write(
      f"process {jax.process_index()}/{jax.process_count()} devices local "
      f"{jax.local_device_count()} global {jax.device_count()} "
      f"anchor_bytes_per_device {local_bytes} anchor_bytes_total {anchor.nbytes}\n"
    )

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(args.out, "ckpt"), {"params": params, "opt_state": state})
  ckpt.wait_until_finished()
  multihost_utils.sync_global_devices("saved")
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
