"""DualOpt on several hosts: one JAX cluster, FSDP-sharded state, Orbax checkpoint.

Every process runs this same script; ``jax.distributed.initialize`` joins them
into one cluster whose devices form one global mesh. Params, Adam moments and
the rollback anchor are FSDP-sharded over all devices of all hosts; the batch
is split the same way. After training, every process takes part in an Orbax
save; a single process can restore the checkpoint and continue.

Two processes on one machine (CPU, 2 devices each; loopback only)::

  # terminal 1
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 python examples/multihost.py \
      --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 --out /tmp/dualopt_mh
  # terminal 2
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 python examples/multihost.py \
      --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1 --out /tmp/dualopt_mh
  # then, in one process: restore, continue, and compare with a 1-process run
  JAX_PLATFORMS=cpu python examples/multihost.py --check /tmp/dualopt_mh

Or all of the above at once (starts the 2 processes, then checks)::

  python examples/multihost.py --launch-local 2

Several real hosts: the same command on each host with ``--coordinator
HOST0:PORT`` (host 0's address, reachable from all hosts), its own
``--process-id`` and the shared ``--num-processes``; ``--out`` must be a
directory all hosts can write (e.g. a GCS bucket or NFS). On Cloud TPU pods,
SLURM or Open MPI, omit ``--coordinator``: ``jax.distributed.initialize()``
finds the cluster by itself. On GPUs and TPUs leave out the CPU variables.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

GLOBAL_BATCH = 64
STEPS = 20
MORE = 10


def problem():
  """Model, host params, data and optimizer: identical in every process."""
  import flax.linen as nn
  import jax
  import numpy as np

  import dualopt_jax as dj

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.gelu(nn.Dense(64)(x))
      x = nn.gelu(nn.Dense(64)(x))
      return nn.Dense(8, name="head")(x)

  model = MLP()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(GLOBAL_BATCH, 32)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(32, 8)), axis=1).astype(np.int32)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), x[:1])["params"])
  tx = dj.dualopt(3e-3, mode="finetune", rollback=0.02, head="head")
  return model, params, x, y, tx


def make_step(model, tx, out_shardings=None):
  import jax
  import optax

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y
    ).mean()

  def step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  return jax.jit(step, out_shardings=out_shardings)


def run_process(args) -> None:
  """One process of the cluster."""
  import jax

  # CPU devices of different processes reduce through gloo (no effect on GPUs/TPUs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # A dead peer must stop the others in seconds, not minutes (BUILD_NOTES.md, "Fault recovery").
  # heartbeat_timeout_seconds: a process silent for this long is declared dead and the
  # coordination service fails every other process (jax default 100 s).
  # shutdown_timeout_seconds: how long an exiting process waits for its peers at the shutdown
  # barrier (default 300 s); a survivor whose collective failed exits after it.
  # Measured (2 CPU processes, SIGKILL to exit of the survivor): 0.3 s when the coordinator
  # (process 0) dies, about 6 s when another process dies during a step, about 9.5 s when it dies
  # while no collective is running. Raise both on slow or busy hosts (long compiles and
  # checkpoint writes do not stop the heartbeats; a stalled host does).
  timeouts = dict(heartbeat_timeout_seconds=10, shutdown_timeout_seconds=5)
  if args.coordinator:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      **timeouts,
    )
  else:
    jax.distributed.initialize(**timeouts)  # TPU pods, SLURM, Open MPI: detected
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import dualopt_jax as dj

  me = jax.process_index()
  print(f"[{me}] process {me}/{jax.process_count()}: {jax.local_device_count()} local devices, "
        f"{jax.device_count()} in the cluster", flush=True)
  model, params_np, x_np, y_np, tx = problem()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  param_sh = dj.fsdp_shardings(params_np, mesh, "data")

  def global_array(host_value, sharding):  # each process supplies only its own slices
    return jax.make_array_from_callback(host_value.shape, sharding, lambda i: host_value[i])

  params = jax.tree.map(global_array, params_np, param_sh)
  batch_sh = NamedSharding(mesh, P("data"))
  # Real input pipelines load only this process's rows and use
  # jax.make_array_from_process_local_data(batch_sh, local_rows).
  x, y = global_array(x_np, batch_sh), global_array(y_np, batch_sh)

  state_sh = dj.state_shardings(tx, params)
  state = dj.init_sharded(tx, params)  # each device materializes only its slice
  step = make_step(model, tx, (param_sh, state_sh, NamedSharding(mesh, P())))
  for i in range(args.steps):
    params, state, loss = step(params, state, x, y)
    if jax.default_backend() == "cpu":  # finish each collective step first (BUILD_NOTES.md)
      jax.block_until_ready((params, state))
    if me == 0 and (i + 1) % 5 == 0:
      print(f"[0] step {i + 1:3d} loss {float(loss):.6f}", flush=True)

  ckpt = ocp.StandardCheckpointer()
  path = os.path.abspath(os.path.join(args.out, "ckpt"))
  ckpt.save(path, {"params": params, "opt_state": state}, force=True)  # force: overwrite
  ckpt.wait_until_finished()
  full = multihost_utils.process_allgather(params, tiled=True)
  if me == 0:
    np.savez(os.path.join(args.out, "params.npz"),
             **{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(full)})
    print(f"[0] saved {path}", flush=True)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


def check(args) -> bool:
  """Single process: restore the cluster's checkpoint, continue, compare with one process."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import SingleDeviceSharding

  model, params_np, x, y, tx = problem()
  dev = jax.devices()[0]
  step = make_step(model, tx)
  p, s = jax.device_put(params_np, dev), tx.init(jax.device_put(params_np, dev))
  trace = {}
  for i in range(1, args.steps + MORE + 1):
    p, s, _ = step(p, s, x, y)
    trace[i] = p

  def gap(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / np.max(np.abs(np.asarray(v))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

  with np.load(os.path.join(args.check, "params.npz")) as z:
    cluster = [z[jax.tree_util.keystr(k)] for k, _ in jax.tree_util.tree_leaves_with_path(p)]
  g1 = gap(cluster, jax.tree.leaves(trace[args.steps]))
  print(f"cluster vs 1 process after {args.steps} steps: max rel gap {g1:.1e}")

  # The restore target: the state's structure, shapes and dtypes (no values), on one device.
  def here(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(dev))

  target = {"params": jax.tree.map(here, jax.eval_shape(lambda q: q, params_np)),
            "opt_state": jax.tree.map(here, jax.eval_shape(tx.init, params_np))}
  restored = ocp.StandardCheckpointer().restore(
    os.path.abspath(os.path.join(args.check, "ckpt")), target)
  p, s = restored["params"], restored["opt_state"]
  for _ in range(MORE):
    p, s, _ = step(p, s, x, y)
  g2 = gap(p, trace[args.steps + MORE])
  print(f"restored in 1 process + {MORE} steps vs {args.steps + MORE} uninterrupted: "
        f"max rel gap {g2:.1e}")
  ok = g1 < 1e-5 and g2 < 1e-5  # only the gradient's summation order differs (float32)
  print("OK: the cluster and the restored run match the single-process run" if ok else "MISMATCH")
  return ok


def launch_local(args) -> int:
  """Starts ``n`` processes on this machine (127.0.0.1, 2 CPU devices each), then checks."""
  import tempfile

  out = args.out or tempfile.mkdtemp(prefix="dualopt_multihost_")
  os.makedirs(out, exist_ok=True)
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
  env["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                env.get("PYTHONPATH")) if p)
  cmds = [[sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", str(args.launch_local), "--process-id", str(i), "--out", out,
           "--steps", str(args.steps)] for i in range(args.launch_local)]
  for c in cmds:
    print("$ JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 python " + " ".join(c[1:]))
  procs = [subprocess.Popen(c, env=env, start_new_session=True) for c in cmds]
  deadline = time.monotonic() + args.timeout
  try:
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
    ok = all(p.poll() == 0 for p in procs)
  finally:
    for p in procs:  # stop whatever is left (hung peer, timeout)
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  if not ok:
    print(f"a process failed or the cluster exceeded {args.timeout}s")
    return 1
  args.check = out
  return 0 if check(args) else 1


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--coordinator", help="HOST:PORT of process 0 (omit on TPU pods / SLURM)")
  ap.add_argument("--num-processes", type=int)
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--out", help="checkpoint directory (shared by all hosts)")
  ap.add_argument("--steps", type=int, default=STEPS)
  ap.add_argument("--check", metavar="DIR", help="restore DIR's checkpoint in one process")
  ap.add_argument("--launch-local", type=int, metavar="N", help="start N processes here")
  ap.add_argument("--timeout", type=int, default=300)
  args = ap.parse_args()
  if args.launch_local:
    return launch_local(args)
  if args.check:
    return 0 if check(args) else 1
  if not args.out:
    ap.error("--out is required for a cluster process")
  os.makedirs(args.out, exist_ok=True)
  run_process(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
