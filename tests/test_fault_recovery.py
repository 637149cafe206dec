"""Faults survived, nothing lost: a 2-process cluster loses a process, resumes, ends bit-identical.

``tests/_fault_worker.py`` runs twice per cluster (the cluster, problem and helpers of
``tests/_multihost_worker.py``: gloo over 127.0.0.1, 2 CPU devices per process, ``dualopt``
fine-tune with FSDP-sharded params and state) for ``STEPS`` steps, saving params + optimizer
state with an Orbax ``CheckpointManager`` every ``SAVE_EVERY`` steps (async, committed by an
atomic rename). Each cluster below is compared bit for bit with the uninterrupted one:

* A: process 1 SIGKILLs itself instead of running step ``KILL_STEP`` (checkpoint 3 complete,
  process 0 inside that step's collectives);
* B: process 0 (the coordinator) SIGKILLs itself while committing checkpoint 6: its shards are all
  written, the tmp directory is not renamed.

Then: the survivor exits non-zero within ``DETECT_S`` of the kill (``join_cluster``'s heartbeat
and shutdown timeouts), only the complete checkpoints are listed, and a relaunched cluster
restores the latest of them (3, never the partial 6) and ends with params and optimizer state
equal to the uninterrupted run's. Every worker runs in its own session and is SIGKILLed with its
process group on any failure or after ``WORKER_TIMEOUT_S``; each also arms ``signal.alarm``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _multihost_worker as mh  # noqa: E402

pytestmark = pytest.mark.slow

N_PROC = 2
LOCAL_DEVICES = 2
STEPS = 9
SAVE_EVERY = 3
KILL_STEP = 5  # A: dies before step 5; checkpoint 3 is the latest complete one
SAVE_KILL_STEP = 6  # B: dies while committing checkpoint 6
DETECT_S = 30
WORKER_TIMEOUT_S = 75


def _cluster(out_dir: str, crash: list[str] | None = None) -> tuple[list, dict, str]:
  """One cluster run in ``out_dir``: (processes, {index: exit time}, logs)."""
  port = mh.free_port()
  cmds = [
    [
      sys.executable, os.path.join(HERE, "_fault_worker.py"),
      "--process-id", str(pid), "--num-processes", str(N_PROC), "--port", str(port),
      "--local-devices", str(LOCAL_DEVICES), "--out", out_dir, "--timeout",
      str(WORKER_TIMEOUT_S + 15), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
    ] + (crash or [])
    for pid in range(N_PROC)
  ]
  killed_at = os.path.join(out_dir, "killed_at")
  if os.path.exists(killed_at):
    os.remove(killed_at)
  procs = mh.start_workers(cmds, out_dir, mh.child_env(ROOT, LOCAL_DEVICES), ROOT)
  try:
    exited = mh.wait_workers(procs, WORKER_TIMEOUT_S, stop_on_failure=False)
  finally:
    mh.kill_workers(procs)
  return procs, exited, mh.worker_logs(procs, out_dir)


def _finished(out_dir: str, crash: list[str] | None = None) -> dict:
  procs, _, logs = _cluster(out_dir, crash)
  assert [p.returncode for p in procs] == [0] * N_PROC, logs
  with np.load(os.path.join(out_dir, "final.npz")) as z:
    return {k: z[k] for k in z.files}


def _restored_from(out_dir: str) -> list[str]:
  out = []
  for pid in range(N_PROC):
    with open(os.path.join(out_dir, f"info_{pid}.txt")) as f:
      out.append(f.read().split()[-1])
  return out


def _complete_steps(out_dir: str) -> list[int]:
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(os.path.join(out_dir, "ckpt"), options=options) as mngr:
    return list(mngr.all_steps())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
  out_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  final = _finished(out_dir)
  assert _restored_from(out_dir) == ["None"] * N_PROC
  assert _complete_steps(out_dir) == [3, 6, 9]
  return final


def _crash(out_dir: str, crash: list[str], victim: int) -> float:
  """Runs the cluster into the fault; checks the survivor exits non-zero in time; the delay."""
  procs, exited, logs = _cluster(out_dir, crash)
  assert procs[victim].returncode == -9, logs  # SIGKILL
  survivor = 1 - victim
  assert survivor in exited, f"the survivor hung; killed after {WORKER_TIMEOUT_S}s:\n{logs}"
  assert procs[survivor].returncode != 0, logs
  with open(os.path.join(out_dir, "killed_at")) as f:
    detect = exited[survivor] - float(f.read())
  print(f"survivor {survivor} exited {procs[survivor].returncode} {detect:.2f}s after the kill")
  assert 0 <= detect < DETECT_S, (detect, logs)
  return detect


def test_killed_during_training_resumes_bit_identical(tmp_path, uninterrupted):
  out_dir = str(tmp_path)
  crash = ["--crash", "train", "--crash-process", "1", "--crash-step", str(KILL_STEP)]
  _crash(out_dir, crash, 1)
  assert _complete_steps(out_dir) == [3]

  resumed = _finished(out_dir)
  assert _restored_from(out_dir) == ["3"] * N_PROC
  assert _complete_steps(out_dir) == [3, 6, 9]
  _assert_bit_identical(resumed, uninterrupted)


def test_killed_during_checkpoint_commit_restores_previous(tmp_path, uninterrupted):
  out_dir = str(tmp_path)
  crash = ["--crash", "save", "--crash-step", str(SAVE_KILL_STEP)]
  _crash(out_dir, crash, 0)
  ckpt = os.path.join(out_dir, "ckpt")
  # Every shard of step 6 is on disk, in the tmp directory that was never renamed ...
  partial = [n for n in os.listdir(ckpt) if n.startswith(f"{SAVE_KILL_STEP}.")]
  assert partial and "tmp" in partial[0], os.listdir(ckpt)
  assert not os.path.exists(os.path.join(ckpt, str(SAVE_KILL_STEP)))
  # ... and it is not a checkpoint: the latest complete one is 3.
  assert _complete_steps(out_dir) == [3]

  resumed = _finished(out_dir)
  assert _restored_from(out_dir) == ["3"] * N_PROC
  assert _complete_steps(out_dir) == [3, 6, 9]
  _assert_bit_identical(resumed, uninterrupted)


def _assert_bit_identical(got: dict, want: dict) -> None:
  assert got.keys() == want.keys()
  assert any("params" in k for k in want) and any("opt_state" in k for k in want), list(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
