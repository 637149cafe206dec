"""Tunix: fine-tune a Llama-architecture model through Tunix's own trainer with ``dj.dualopt``.

The model is Tunix's own ``tunix.models.llama3.model.Llama3`` at a tiny size, pre-trained here for a
few steps with plain Adam on one half of a text (standing in for a downloaded checkpoint: nothing
is downloaded), then fine-tuned on the other half. The text is Python's own: the help topics that
ship with the standard library (``pydoc_data.topics``), as byte-level token ids, the topics
alternating between the two halves. Held-out loss on both is printed before and after.
Training runs through ``tunix.sft.peft_trainer.PeftTrainer`` with its ``TrainingConfig``; the
optimizer handed to it is ``dj.dualopt(...)``, and a Tunix ``TrainingHooks`` logs ``dj.drift``
every ``--log-every`` steps.

* ``--mode full``: full-weight fine-tuning; the trainer optimizes every ``nnx.Param``.
* ``--mode lora``: LoRA adapters from Qwix (``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``,
  as Tunix's own examples do); the trainer then optimizes only the ``nnx.LoRAParam`` s, and
  ``dj.dualopt(..., lora=...)`` rolls the merged weights ``W0 + A B`` back toward ``W0``.

Needs Tunix's trainer stack: ``pip install -e ".[tunix]"`` (see README, "Using it with NNX and
Tunix").

  python examples/tunix_finetune.py --mode full
  python examples/tunix_finetune.py --mode lora --steps 20 --log-every 5
"""

from __future__ import annotations

import argparse
import sys
from pydoc_data.topics import topics
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import hooks, peft_trainer
from tunix.sft import utils as sft_utils

import dualopt_jax as dj

PAD, BOS, OFFSET = 0, 1, 4     # token ids: 0 pad, 1 begin-of-sequence, 4 + byte value
VOCAB = OFFSET + 256


# --- data -----------------------------------------------------------------------------------------


def encode(text: str) -> np.ndarray:
  return OFFSET + np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def text_batches(seq_len: int, batch: int, *, seed: int) -> dict[str, list]:
  """Batches of ``TrainingInput`` from the pydoc help topics, for two tasks.

  Topics sorted by name alternate between the upstream (pre-training) and the downstream
  (fine-tuning) text; within each, every 10th topic is held out. Every example is ``BOS`` +
  ``seq_len - 1`` consecutive bytes of one topic (short topics are padded). Keys:
  ``up_train``, ``up_eval``, ``down_train``, ``down_eval``.
  """
  names = sorted(topics)
  out = {}
  rng = np.random.default_rng(seed)
  for split in ("up_train", "up_eval", "down_train", "down_eval"):
    task = names[0::2] if split.startswith("up") else names[1::2]
    held_out = split.endswith("eval")
    rows, masks = [], []
    for name in (n for i, n in enumerate(task) if (i % 10 == 0) == held_out):
      ids = encode(topics[name])
      for start in range(0, len(ids), seq_len - 1):
        chunk = ids[start:start + seq_len - 1]
        row = np.full(seq_len, PAD, np.int32)
        row[0], row[1:1 + len(chunk)] = BOS, chunk
        rows.append(row)
        masks.append(row != PAD)
    order = rng.permutation(len(rows))
    rows, masks = np.stack(rows)[order], np.stack(masks)[order]
    out[split] = [peft_trainer.TrainingInput(input_tokens=rows[i:i + batch],
                                             input_mask=masks[i:i + batch])
                  for i in range(0, len(rows) - batch + 1, batch)]
  return out


def model_inputs(x: peft_trainer.TrainingInput) -> dict[str, Any]:
  """TrainingInput -> the keyword inputs of Tunix's default loss (as Tunix's examples build)."""
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": sft_utils.build_positions_from_mask(x.input_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}


# --- model ----------------------------------------------------------------------------------------


def tiny_llama(seed: int) -> llama3.Llama3:
  """Tunix's Llama3 at a tiny size with random weights (``main`` pre-trains it a little).

  Tunix zero-initializes the MLP kernels (a fresh model to be loaded into); with all three zero
  the MLP gets no gradient at all, so they are filled with N(0, 0.02^2) as a trained model's are.
  """
  config = llama3.ModelConfig(num_layers=2, vocab_size=VOCAB, embed_dim=64, hidden_dim=128,
                              num_heads=4, head_dim=16, num_kv_heads=2, rope_theta=10_000,
                              norm_eps=1e-5, weight_tying=False)
  with flax.config.temp_flip_flag("always_shard_variable", False):  # no mesh here
    model = llama3.Llama3(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [0.02 * jax.random.normal(k, x.shape, x.dtype) if not jnp.any(x) else x
            for x, k in zip(leaves, keys, strict=True)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


LORA_MODULES = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"
LORA_ALPHA = 2.0     # Qwix scales A B by alpha / rank; alpha = LORA_ALPHA * rank
LORA_B = "**/*_lora_b"   # Qwix's B factors: <weight>_lora_b next to <weight>


def with_lora(model: llama3.Llama3, rank: int, seed: int) -> nnx.Module:
  """Qwix LoRA on every attention and MLP projection, as Tunix's PEFT examples apply it."""
  provider = qwix.LoraProvider(module_path=LORA_MODULES, rank=rank, alpha=LORA_ALPHA * rank)
  example = model_inputs(peft_trainer.TrainingInput(input_tokens=jnp.ones((1, 8), jnp.int32),
                                                     input_mask=jnp.ones((1, 8), bool)))
  return qwix.apply_lora_to_model(model, provider, example["input_tokens"], example["positions"],
                                  None, example["attention_mask"], rngs=nnx.Rngs(seed))


def held_out_loss(model: nnx.Module, batches: list) -> float:
  """Mean next-token cross-entropy over ``batches`` (the trainer's default loss, per batch)."""

  @nnx.jit
  def loss(model, x):
    inputs = model_inputs(x)
    logits, _ = model(inputs["input_tokens"], inputs["positions"], None,
                      inputs["attention_mask"])
    mask = inputs["input_mask"][:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                          inputs["input_tokens"][:, 1:])
    return jnp.sum(nll * mask) / jnp.sum(mask)

  return float(np.mean([loss(model, x) for x in batches]))


# --- logging through Tunix's hooks ----------------------------------------------------------------


def unit_of(path: str) -> str:
  """A parameter's unit for ``dj.drift``'s groups: its top-level module, or ``layers/i``."""
  keys = path.split("/")
  return "/".join(keys[:2]) if keys[0] == "layers" else keys[0]


def unit_names(params: Any) -> Any:
  """``unit_of`` for every leaf of an NNX state."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: unit_of("/".join(str(getattr(k, "key", getattr(k, "name", k)))
                                     for k in path)), params)


class DriftHooks(hooks.TrainingHooks):
  """Logs ``dj.drift`` of the trained parameters every ``every`` steps."""

  def __init__(self, every: int, lora: bool, print_fn=print):
    self.every, self.lora, self.print_fn = every, lora, print_fn
    self.history: list[dict[str, float]] = []

  def on_train_step_end(self, train_ctx, train_step: int, train_loss: float) -> None:
    if train_step % self.every:
      return
    if self.lora:
      # The adapters carry no anchor (B is rolled toward 0): drift measures each adapter's merged
      # drift ||A B|| / ||W0|| (without Qwix's constant alpha/rank), keyed by its B factor.
      drift = dj.drift(nnx.state(train_ctx.model, nnx.LoRAParam), train_ctx.optimizer.opt_state,
                       lora=LORA_B, full_params=nnx.state(train_ctx.model, nnx.Param))
    else:
      params = nnx.state(train_ctx.model, nnx.Param)
      drift = dj.drift(params, train_ctx.optimizer.opt_state, groups=unit_names)
    row = {"step": int(train_step), "loss": float(train_loss),
           **{k: float(np.max(v)) for k, v in drift.items() if k.startswith("drift/")}}
    self.history.append(row)
    top = sorted((k for k in row if k.startswith("drift/")), key=row.get, reverse=True)[:4]
    self.print_fn(f"  step {row['step']:4d}  loss {row['loss']:.3f}  largest drift: "
                  + "  ".join(f"{k[len('drift/'):]} {row[k]:.4f}" for k in top))

  def on_train_start(self, train_ctx) -> None:
    pass

  def on_train_end(self, train_ctx) -> None:
    pass

  def on_train_step_start(self, train_ctx) -> None:
    pass

  def on_eval_step_start(self, train_ctx) -> None:
    pass

  def on_eval_step_end(self, train_ctx, eval_loss: float) -> None:
    pass


# --- the run --------------------------------------------------------------------------------------


def decoder_order(model: nnx.Module) -> Any:
  """The model's forward order, from tracing one forward pass (nothing is computed)."""
  example = model_inputs(peft_trainer.TrainingInput(input_tokens=jnp.ones((1, 8), jnp.int32),
                                                     input_mask=jnp.ones((1, 8), bool)))
  return dj.forward_order(model, example["input_tokens"], example["positions"], None,
                          example["attention_mask"])


def make_optimizer(args: argparse.Namespace, model: nnx.Module,
                   order: Any) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps)
  if args.mode == "full":
    return dj.dualopt(schedule, peak_learning_rate=args.lr, rollback=args.rollback, order=order)
  # The trainer optimizes only the adapters (nnx.Optimizer(..., wrt=nnx.LoRAParam)): full_params
  # gives every adapter its base weight's depth in the whole model. Rolling Qwix's B factors
  # (<weight>_lora_b) toward 0 rolls the merged weight W0 + A B back toward W0.
  return dj.dualopt(schedule, peak_learning_rate=args.lr, rollback=args.rollback, order=order,
                    lora=LORA_B, full_params=nnx.state(model, nnx.Param))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("full", "lora"), default="full")
  parser.add_argument("--pretrain-steps", type=int, default=100,
                      help="plain-Adam steps on the upstream text first (0: none)")
  parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--lr", type=float, default=None,
                      help="peak learning rate (default 1e-3 full, 3e-3 lora)")
  parser.add_argument("--rollback", type=float, default=0.01)
  parser.add_argument("--lora-rank", type=int, default=4)
  parser.add_argument("--log-every", type=int, default=20)
  parser.add_argument("--eval-batches", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if (min(args.steps, args.log_every, args.batch, args.eval_batches) < 1 or args.seq_len < 2
      or args.pretrain_steps < 0):
    parser.error("--steps, --log-every, --batch, --eval-batches must be >= 1, --seq-len >= 2, "
                 "--pretrain-steps >= 0")
  if args.lr is None:
    args.lr = 1e-3 if args.mode == "full" else 3e-3

  data = text_batches(args.seq_len, args.batch, seed=args.seed)
  held_out = {task: data[f"{task}_eval"][:args.eval_batches] for task in ("up", "down")}
  print("pydoc topics as bytes, batches of "
        f"{args.batch}x{args.seq_len}: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))

  def evaluate(model):
    return {"upstream": held_out_loss(model, held_out["up"]),
            "downstream": held_out_loss(model, held_out["down"])}

  def steps_of(batches, n):
    return [batches[i % len(batches)] for i in range(n)]

  model = tiny_llama(args.seed)
  if args.pretrain_steps:
    # A stand-in for a real checkpoint: plain Adam on the upstream text, through the trainer.
    pre = peft_trainer.PeftTrainer(
      model, optax.adam(1e-3), peft_trainer.TrainingConfig(
        eval_every_n_steps=args.pretrain_steps, max_steps=args.pretrain_steps,
        pbar_description=None)).with_gen_model_input_fn(model_inputs)
    pre.train(steps_of(data["up_train"], args.pretrain_steps))
    print(f"pre-trained {args.pretrain_steps} steps (plain Adam): held-out loss "
          + ", ".join(f"{k} {v:.3f}" for k, v in evaluate(model).items()))
  base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  if args.mode == "lora":
    model = with_lora(model, args.lora_rank, args.seed)
  wrt = nnx.LoRAParam if args.mode == "lora" else nnx.Param
  # The names do not give the order inside a decoder layer (norms, attention, MLP), nor where
  # final_norm and lm_head go: the forward pass does.
  order = decoder_order(model)
  tx = make_optimizer(args, model, order)
  before = evaluate(model)

  trainer = peft_trainer.PeftTrainer(
    model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=args.steps, max_steps=args.steps,
                                           pbar_description=None))
  trainer = trainer.with_gen_model_input_fn(model_inputs)
  log = DriftHooks(args.log_every, lora=args.mode == "lora")
  trainer.with_training_hooks(log)
  print(f"\nPeftTrainer ({args.mode}): dj.describe of its optimizer state")
  table = dj.describe(nnx.state(model, wrt), trainer.optimizer.opt_state, print_fn=print)

  trainer.train(steps_of(data["down_train"], args.steps))
  after = evaluate(model)
  print(f"\nafter {trainer.train_steps} fine-tuning steps ({args.mode}), held-out loss "
        "(nats/byte):")
  for task in ("upstream", "downstream"):
    print(f"  {task:10s} {before[task]:.3f} -> {after[task]:.3f}")
  after_base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {"before": before, "after_loss": after, "steps": trainer.train_steps,
          "drift": log.history, "describe": table, "base": base, "after": after_base,
          "train_loss": trainer.metrics_logger.get_metric_history("", "loss", "train")}


if __name__ == "__main__":
  main()
  sys.exit(0)
