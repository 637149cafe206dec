"""Flax NNX end to end: pre-train, checkpoint with Orbax, restore, new head, fine-tune with DualOpt.

The whole run uses NNX's own idioms: an ``nnx.Module`` CNN, ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` and ``nnx.jit`` train steps.

1. Pre-train on scikit-learn's bundled digits 0-4 (no download) with plain Adam.
2. Save ``nnx.state(model)`` with Orbax's ``StandardCheckpointer``.
3. Restore into a freshly built abstract model (``nnx.eval_shape`` + ``nnx.split``, then
   ``checkpointer.restore(path, abstract_state)`` and ``nnx.merge``), as the Flax docs do.
4. Replace the classifier ``head`` with a new, randomly initialised one.
5. Fine-tune on digits 5-9 with ``dj.dualopt(schedule, peak_learning_rate=..., head="head")``:
   ``dj.describe`` at the start, ``dj.drift`` every ``--log-every`` steps.
6. Print upstream (digits 0-4, the pre-trained head on the fine-tuned backbone) and downstream
   (digits 5-9) test accuracy before and after.

  python examples/nnx_digits.py                       # 1-2 minutes on two CPU cores
  python examples/nnx_digits.py --pretrain-steps 30 --finetune-steps 20 --log-every 10
  python examples/nnx_digits.py --compare-adam        # also fine-tune with plain Adam
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from sklearn.datasets import load_digits

import dualopt_jax as dj


class CNN(nnx.Module):
  """Two conv blocks and a hidden dense layer (the backbone), then ``head``."""

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(2 * 2 * 32, 64, rngs=rngs)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))   # 8x8 -> 4x4
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))   # 4x4 -> 2x2
    return nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


# --- data -----------------------------------------------------------------------------------------


def digit_splits(seed: int = 0, test_fraction: float = 0.3) -> dict[str, tuple[np.ndarray, ...]]:
  """Digits 0-4 ('up') and 5-9 ('down'), each split train/test; labels 0-4 within a task."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]   # (N, 8, 8, 1) in [0, 1]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  out = {}
  for task, classes in (("up", range(5)), ("down", range(5, 10))):
    idx = rng.permutation(np.flatnonzero(np.isin(labels, list(classes))))
    n_test = int(len(idx) * test_fraction)
    test, train = idx[:n_test], idx[n_test:]
    offset = min(classes)
    out[f"{task}_train"] = (images[train], labels[train] - offset)
    out[f"{task}_test"] = (images[test], labels[test] - offset)
  return out


def batches(data: tuple[np.ndarray, np.ndarray], batch: int, seed: int):
  x, y = data
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.choice(len(x), size=batch, replace=False)
    yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


# --- training -------------------------------------------------------------------------------------


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model: CNN, head: nnx.Linear, x: jax.Array, y: jax.Array) -> jax.Array:
  """Accuracy of ``head`` on ``model``'s backbone features (``head`` need not be model.head)."""
  return jnp.mean(jnp.argmax(head(model.features(x)), -1) == y)


def params_of(model: nnx.Module) -> dict:
  """The model's ``nnx.Param`` values as a plain nested dict of NumPy arrays (a copy)."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# --- the run --------------------------------------------------------------------------------------


def save_checkpoint(model: nnx.Module, path: str) -> None:
  _, state = nnx.split(model)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()


def restore_checkpoint(path: str, num_classes: int) -> CNN:
  """The Flax-documented restore: an abstract model gives the target structure, no real init."""
  abstract_model = nnx.eval_shape(lambda: CNN(num_classes, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  state = ocp.StandardCheckpointer().restore(path, abstract_state)
  return nnx.merge(graphdef, state)


def evaluate(model: CNN, up_head: nnx.Linear, splits: dict) -> dict[str, float]:
  return {"upstream": float(accuracy(model, up_head, *splits["up_test"])),
          "downstream": float(accuracy(model, model.head, *splits["down_test"]))}


def finetune(model: CNN, splits: dict, args: argparse.Namespace, tx: optax.GradientTransformation,
             log: bool) -> tuple[list[dict[str, float]], Any]:
  """Fine-tunes ``model`` in place; returns the drift rows logged and ``dj.describe``'s table."""
  # A copy: nnx.state's leaves are the model's own Variables, which the optimizer updates in
  # place, so an uncopied state would follow the model and always show zero drift.
  params0 = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))   # includes the new head's init
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  table = dj.describe(nnx.state(model, nnx.Param), optimizer.opt_state, print_fn=print) if log \
    else None
  history = []
  data = batches(splits["down_train"], args.batch, seed=args.seed + 1)
  for step in range(1, args.finetune_steps + 1):
    loss = train_step(model, optimizer, *next(data))
    if step % args.log_every == 0 or step == args.finetune_steps:
      # Relative drift per block; params0 is passed so the new head is measured too (with
      # opt_state alone, drift reads the rollback anchor, which the head does not have).
      drift = dj.drift(nnx.state(model, nnx.Param), params0=params0, granularity="block")
      row = {"step": step, "loss": float(loss), **{k: float(v) for k, v in drift.items()}}
      history.append(row)
      if log:
        print(f"  step {step:4d}  loss {row['loss']:.3f}  "
              + "  ".join(f"{k[len('drift/'):]} {v:.3f}" for k, v in row.items()
                          if k.startswith("drift/")))
  return history, table


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrain-steps", type=int, default=600)
  parser.add_argument("--finetune-steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3, help="pre-training and peak fine-tune lr")
  parser.add_argument("--rollback", type=float, default=0.01)
  parser.add_argument("--log-every", type=int, default=50)
  parser.add_argument("--ckpt", default=None,
                      help="checkpoint folder (must not exist yet; default: a temporary folder)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--compare-adam", action="store_true",
                      help="also fine-tune a second restored copy with plain Adam")
  args = parser.parse_args(argv)
  if min(args.pretrain_steps, args.finetune_steps, args.log_every) < 1:
    parser.error("--pretrain-steps, --finetune-steps and --log-every must be >= 1")

  splits = digit_splits(args.seed)
  print(f"digits: {len(splits['up_train'][0])} train / {len(splits['up_test'][0])} test (0-4), "
        f"{len(splits['down_train'][0])} / {len(splits['down_test'][0])} (5-9)")

  # 1. Pre-train on 0-4 with plain Adam.
  model = CNN(5, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
  data = batches(splits["up_train"], args.batch, seed=args.seed)
  for _ in range(args.pretrain_steps):
    loss = train_step(model, optimizer, *next(data))
  pre_up = float(accuracy(model, model.head, *splits["up_test"]))
  print(f"pre-trained {args.pretrain_steps} steps: loss {float(loss):.3f}, "
        f"upstream test acc {pre_up:.3f}")

  # 2.-3. Save with Orbax, restore into a fresh abstract model.
  ckpt_root = args.ckpt or tempfile.mkdtemp(prefix="nnx_digits_")
  path = os.path.join(os.path.abspath(ckpt_root), "pretrained")
  saved = params_of(model)
  save_checkpoint(model, path)
  del model, optimizer
  model = restore_checkpoint(path, num_classes=5)
  restored = params_of(model)
  print(f"saved to and restored from {path}")

  # 4. Keep the upstream head (to measure forgetting), put a new random head in its place.
  up_head = model.head
  model.head = nnx.Linear(64, 5, rngs=nnx.Rngs(args.seed + 1000))
  before = evaluate(model, up_head, splits)
  print(f"before fine-tuning: upstream test acc {before['upstream']:.3f}, "
        f"downstream {before['downstream']:.3f} (new head)")

  # 5. Fine-tune on 5-9 with DualOpt.
  warmup = max(1, args.finetune_steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.finetune_steps)
  tx = dj.dualopt(schedule, peak_learning_rate=args.lr, rollback=args.rollback, head="head")
  compare = None
  if args.compare_adam:
    adam_model = restore_checkpoint(path, num_classes=5)
    adam_model.head = nnx.Linear(64, 5, rngs=nnx.Rngs(args.seed + 1000))
    adam_history, _ = finetune(adam_model, splits, args, optax.adam(schedule), log=False)
    compare = {**evaluate(adam_model, up_head, splits), "drift": adam_history[-1]}
  print("\nper-layer settings of the fine-tuning optimizer (dj.describe):")
  history, table = finetune(model, splits, args, tx, log=True)
  after = evaluate(model, up_head, splits)

  # 6. Report.
  print(f"\nafter {args.finetune_steps} fine-tuning steps with dj.dualopt:")
  print(f"  upstream (0-4) test acc   {before['upstream']:.3f} -> {after['upstream']:.3f}")
  print(f"  downstream (5-9) test acc {before['downstream']:.3f} -> {after['downstream']:.3f}")
  if compare is not None:
    print(f"  plain Adam, same schedule: upstream {compare['upstream']:.3f}, "
          f"downstream {compare['downstream']:.3f}")
    print("  final drift, dualopt vs Adam: " + "  ".join(
      f"{k[len('drift/'):]} {v:.3f} vs {compare['drift'][k]:.3f}"
      for k, v in history[-1].items() if k.startswith("drift/")))
  return {"pretrain_upstream": pre_up, "saved": saved, "restored": restored, "before": before,
          "after": after, "adam": compare, "drift": history, "describe": table, "ckpt": path}


if __name__ == "__main__":
  main()
  sys.exit(0)
