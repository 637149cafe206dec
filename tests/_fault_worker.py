"""One process of the 2-process cluster of tests/test_fault_recovery.py: train, checkpoint, die.

Same cluster and problem as ``tests/_multihost_worker.py`` (whose set-up it reuses): the
``dualopt`` fine-tune on the FSDP-sharded 4-device mesh, ``--steps`` steps, an Orbax
``CheckpointManager`` save of params + optimizer state every ``--save-every`` steps (async,
finalised by an atomic rename on process 0). At start it restores the latest complete
checkpoint, if any, into ``dj.abstract_state(tx, params)`` and continues from there. At the end
process 0 writes the gathered params and state to ``--out/final.npz``.

Faults, injected deterministically (the process writes ``killed_at`` then SIGKILLs itself):

* ``--crash train --crash-process P --crash-step N``: process P, once the checkpoints before step N
  are complete, dies instead of running step N (its peer is inside step N's collectives);
* ``--crash save --crash-step N``: process 0 dies while finalising the checkpoint of step N: every
  shard is written, the commit (the rename of the tmp directory) is not.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _multihost_worker as mh  # noqa: E402


def _die(out: str) -> None:
  with open(os.path.join(out, "killed_at"), "w") as f:
    f.write(repr(time.time()))
  os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  mh.add_cluster_args(ap)
  ap.add_argument("--steps", type=int, default=9)
  ap.add_argument("--save-every", type=int, default=3)
  ap.add_argument("--crash", choices=("none", "train", "save"), default="none")
  ap.add_argument("--crash-process", type=int, default=0)
  ap.add_argument("--crash-step", type=int, default=0)
  args = ap.parse_args(argv)
  mh.join_cluster(args)
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  import dualopt_jax as dj

  me = jax.process_index()
  params, state, x, y, tx, step, _ = mh.setup_training("fsdp")
  saved, commits = [], [0]  # the steps saved, in order; how many commits began

  def before_commit():  # on process 0 only, once per save, in save order (saves never overlap)
    step_saved = saved[commits[0]]
    commits[0] += 1
    if args.crash == "save" and step_saved == args.crash_step:
      _die(args.out)

  mngr = ocp.CheckpointManager(
    os.path.join(args.out, "ckpt"),
    options=ocp.CheckpointManagerOptions(
      save_interval_steps=args.save_every,
      enable_async_checkpointing=True,
      async_options=ocp.AsyncOptions(post_finalization_callback=before_commit),
    ),
  )
  start = mngr.latest_step()  # complete checkpoints only
  if start is not None:
    target = {
      "params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                             params),
      "opt_state": dj.abstract_state(tx, params),
    }
    restored = mngr.restore(start, args=ocp.args.StandardRestore(target))
    params, state = restored["params"], restored["opt_state"]
  with open(os.path.join(args.out, f"info_{me}.txt"), "w") as f:
    f.write(f"restored {start}\n")

  for i in range((start or 0) + 1, args.steps + 1):
    if args.crash == "train" and i == args.crash_step and me == args.crash_process:
      mngr.wait_until_finished()  # the earlier checkpoints are committed
      _die(args.out)
    params, state = jax.block_until_ready(step(params, state, x, y))
    if i % args.save_every == 0:
      saved.append(i)
      mngr.save(i, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
  mngr.wait_until_finished()

  gathered = multihost_utils.process_allgather({"params": params, "opt_state": state}, tiled=True)
  if me == 0:
    np.savez(os.path.join(args.out, "final.npz"), **mh.flat_params(gathered))
  mngr.close()
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
