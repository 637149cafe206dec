"""Two processes on this machine form one JAX cluster and train with dualopt; Orbax round trip.

The test starts ``tests/_multihost_worker.py`` twice (process 0 and 1, 2 CPU
devices each, gloo collectives over 127.0.0.1, a free port picked now). They
train ``STEPS`` steps on the global 4-device mesh with the params and the
optimizer state FSDP-sharded, gather the params and save params + state with
Orbax. This process (a single JAX process) then checks

* the 2-process params equal a single-process run of the same steps;
* the checkpoint restores into ``jax.eval_shape(tx.init, params)`` here and
  ``MORE`` further steps equal the uninterrupted single-process run, while a
  fresh optimizer state would not.

Workers run in their own session and are killed (SIGKILL to their process
group) on any failure or after ``WORKER_TIMEOUT_S``; each also arms
``signal.alarm`` so it cannot outlive a lost parent.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _multihost_worker as worker  # noqa: E402

N_PROC = 2
LOCAL_DEVICES = 2
N_GLOBAL = N_PROC * LOCAL_DEVICES
STEPS = 5
MORE = 5
WORKER_TIMEOUT_S = 90


def _launch(out_dir: str, layout: str, *, broken: int | None = None) -> tuple[bool, str, list]:
  """Runs the cluster once; (ok, logs, processes). ``broken``: that process gets a bad argument."""
  port = worker.free_port()
  cmds = [
    [
      sys.executable, os.path.join(HERE, "_multihost_worker.py"),
      "--process-id", str(pid), "--num-processes", str(N_PROC), "--port", str(port),
      "--local-devices", str(LOCAL_DEVICES), "--steps", str(STEPS), "--layout", layout,
      "--out", out_dir, "--timeout", str(WORKER_TIMEOUT_S + 15),
    ] + (["--steps", "-1"] if pid == broken else [])
    for pid in range(N_PROC)
  ]
  procs = worker.start_workers(cmds, out_dir, worker.child_env(ROOT, LOCAL_DEVICES), ROOT)
  try:
    worker.wait_workers(procs, WORKER_TIMEOUT_S)
    ok = all(p.poll() == 0 for p in procs)
  finally:
    worker.kill_workers(procs)
  assert all(p.poll() is not None for p in procs), "a worker survived"
  return ok, worker.worker_logs(procs, out_dir), procs


def _single_process_reference(model, params_np, x, y, make_tx, steps):
  """One device; the gradient is the sum of the per-device shard gradients in device order."""
  dev = jax.devices()[0]
  tx = make_tx()
  per = x.shape[0] // N_GLOBAL

  def grads_pinned(p, x, y):
    g = None
    for k in range(N_GLOBAL):
      xs, ys = x[k * per : (k + 1) * per], y[k * per : (k + 1) * per]
      gk = jax.grad(worker.loss_fn, argnums=1)(model, p, xs, ys)
      g = gk if g is None else jax.tree.map(jnp.add, g, gk)
    return jax.tree.map(lambda a: a / N_GLOBAL, g)

  @jax.jit
  def step(p, s, x, y):
    updates, s = tx.update(grads_pinned(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  params = jax.device_put(params_np, dev)
  state = tx.init(params)
  x, y = jax.device_put(x, dev), jax.device_put(y, dev)
  trace = {0: (params, state)}
  for i in range(1, steps + 1):
    params, state = step(params, state, x, y)
    trace[i] = (params, state)
  return tx, step, trace


def _assert_close(got, want, what, rel=1e-6):
  """rtol 1e-6 with an absolute floor of 1e-6 * max|want| per tensor (see test_data_parallel)."""
  got_flat, want_flat = worker.flat_params(got), worker.flat_params(want)
  assert got_flat.keys() == want_flat.keys(), what
  for k, w in want_flat.items():
    scale = float(np.max(np.abs(w))) if w.size and w.dtype.kind == "f" else 0.0
    np.testing.assert_allclose(got_flat[k], w, rtol=rel, atol=rel * scale, err_msg=f"{what} {k}")


@pytest.mark.parametrize("layout", ["fsdp", "replicated"])
def test_two_process_cluster_matches_single_process(tmp_path, layout):
  out_dir = str(tmp_path)
  ok, logs, _ = _launch(out_dir, layout)
  if not ok and ("in use" in logs or "bind" in logs.lower()):  # lost the port race: once more
    ok, logs, _ = _launch(out_dir, layout)
  assert ok, f"2-process run failed or timed out after {WORKER_TIMEOUT_S}s:\n{logs}"
  for i in range(N_PROC):
    with open(os.path.join(out_dir, f"info_{i}.txt")) as f:
      info = f.read()
    assert f"process {i}/{N_PROC} devices local {LOCAL_DEVICES} global {N_GLOBAL}" in info, info
    here, total = (int(v) for v in info.split()[-3::2])
    # FSDP: each device stores 1/4 of the anchor; replicated: all of it.
    assert here * (N_GLOBAL if layout == "fsdp" else 1) == total, info

  model, params_np, x, y, make_tx = worker.make_problem()
  tx, step, trace = _single_process_reference(model, params_np, x, y, make_tx, STEPS + MORE)

  # 1. The cluster's params after STEPS equal the single-process run.
  with np.load(os.path.join(out_dir, "params.npz")) as z:
    cluster = {k: z[k] for k in z.files}
  ref_flat = worker.flat_params(trace[STEPS][0])
  assert cluster.keys() == ref_flat.keys()
  moved = max(float(np.max(np.abs(ref_flat[k] - v))) for k, v in
              worker.flat_params(params_np).items())
  assert moved > 1e-2
  for k, v in ref_flat.items():
    np.testing.assert_allclose(cluster[k], v, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(v))),
                               err_msg=k)

  # 2. The 2-process checkpoint restores in this single process ...
  import orbax.checkpoint as ocp

  dev = jax.devices()[0]
  params_here = jax.device_put(params_np, dev)
  single = SingleDeviceSharding(dev)

  def on_dev(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single)

  target = {
    "params": jax.tree.map(on_dev, jax.eval_shape(lambda p: p, params_here)),
    "opt_state": jax.tree.map(on_dev, jax.eval_shape(tx.init, params_here)),
  }
  restored = ocp.StandardCheckpointer().restore(os.path.join(out_dir, "ckpt"), target)
  r_params, r_state = restored["params"], restored["opt_state"]
  assert jax.tree.structure(r_state) == jax.tree.structure(trace[STEPS][1])
  counts = [
    int(c) for c in jax.tree.leaves(r_state) if c.ndim == 0 and jnp.issubdtype(c.dtype, jnp.integer)
  ]
  assert counts and all(c == STEPS for c in counts), counts
  _assert_close(r_params, trace[STEPS][0], "restored params")
  _assert_close(r_state, trace[STEPS][1], "restored state")
  [(_, anchor)] = optax.tree_utils.tree_get_all_with_path(r_state, "anchor")
  for k, v in worker.flat_params(anchor).items():  # the anchor is the pre-trained weights, exactly
    np.testing.assert_array_equal(v, worker.flat_params(params_np)[k])

  # ... and continues identically to the uninterrupted run.
  xd, yd = jax.device_put(x, dev), jax.device_put(y, dev)
  p, s = r_params, r_state
  for _ in range(MORE):
    p, s = step(p, s, xd, yd)
  _assert_close(p, trace[STEPS + MORE][0], "continued params")
  _assert_close(s, trace[STEPS + MORE][1], "continued state")

  # A fresh optimizer state (anchor = current weights, zero moments) would not.
  p_fresh, s_fresh = r_params, tx.init(r_params)
  for _ in range(MORE):
    p_fresh, s_fresh = step(p_fresh, s_fresh, xd, yd)
  gap = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(p_fresh), jax.tree.leaves(trace[STEPS + MORE][0]), strict=True)
  )
  assert gap > 1e-4, gap


def test_failed_worker_takes_the_cluster_down(tmp_path):
  """Process 1 exits at once: process 0 (waiting for its peer) is killed, nothing is left."""
  start = time.monotonic()
  ok, logs, procs = _launch(str(tmp_path), "fsdp", broken=1)
  assert not ok
  assert procs[1].returncode not in (None, 0), logs
  assert procs[0].returncode is not None, "process 0 must have been stopped"
  assert time.monotonic() - start < WORKER_TIMEOUT_S / 2, "the failure must be seen at once"
  for p in procs:
    with pytest.raises(ProcessLookupError):
      os.killpg(p.pid, 0)  # no process of that group is left
