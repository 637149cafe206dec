"""Vision transfer benchmark: a small CNN pre-trained on digits 0-4, fine-tuned on 5-9.

Protocol (the same for every method):

1. Pre-train one CNN per seed on digits 0-4 (Adam, cosine lr, ``pretrain_steps``).
2. Fine-tune on the few-shot digits 5-9 split with a new head (fresh init per
   seed), ``finetune_steps`` steps of batch ``batch``, cosine lr.
3. Each method's main hyper-parameter is chosen on the downstream
   *validation* split (mean accuracy over seeds; ties by validation loss).
   Adam goes first; the lr it chooses is the base lr of every method whose
   main hyper-parameter is not the lr.
4. Report, at the chosen value: downstream test accuracy, upstream retention
   (the pre-trained upstream head on the fine-tuned backbone, upstream test
   split) and forgetting = upstream test accuracy before minus after.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data as data_lib
from . import methods as methods_lib
from . import models, runner, stats, train


@dataclasses.dataclass
class VisionConfig:
  seeds: int = 5
  pretrain_steps: int = 600
  pretrain_lr: float = 3e-3
  finetune_steps: int = 300
  batch: int = 32
  methods: tuple[str, ...] | None = None  # None = all registered
  chunk: int = 50
  # None: plain Adam chooses the base lr on validation; a value fixes it (the sensitivity run).
  base_lr: float | None = None


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def classification_task(x: np.ndarray, y: np.ndarray, batch: int) -> train.Task:
  model = models.CNN()

  def loss_fn(params, b):
    return _xent(model.apply({"params": params}, b[0]), b[1])

  def sample(key, d):
    idx = jax.random.randint(key, (batch,), 0, d[0].shape[0])
    return d[0][idx], d[1][idx]

  return train.Task(loss_fn, sample, (jnp.asarray(x), jnp.asarray(y)), models.cnn_block_of)


def accuracy_and_loss(params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits = models.CNN().apply({"params": params}, x)
  return jnp.mean(jnp.argmax(logits, -1) == y), _xent(logits, y)


def init_params(keys: jax.Array) -> Any:
  x = jnp.zeros((1, 8, 8, 1))
  return jax.vmap(lambda k: models.CNN().init(k, x)["params"])(keys)


def pretrain(d: data_lib.TransferData, cfg: VisionConfig, progress: bool = True):
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(cfg.seeds))
  params = init_params(keys)
  task = classification_task(d.up_train.x, d.up_train.y, cfg.batch)
  run = train.train_grid(
    task, lambda hp: optax.adam(methods_lib.cosine(hp, cfg.pretrain_steps)), [cfg.pretrain_lr],
    params, jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys), steps=cfg.pretrain_steps,
    chunk=100, desc="pre-train", progress=progress,
  )
  pre = jax.tree.map(lambda x: x[0], run.params)
  acc = jax.vmap(accuracy_and_loss, in_axes=(0, None, None))(
    pre, jnp.asarray(d.up_test.x), jnp.asarray(d.up_test.y))[0]
  return pre, np.asarray(acc), run.seconds


def run(cfg: VisionConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
  t0 = time.perf_counter()
  d = data_lib.digits_transfer()
  seeds = list(range(cfg.seeds))
  pre, pre_acc, pre_s = pretrain(d, cfg, progress)
  log(f"pre-trained {cfg.seeds} CNNs on digits 0-4: upstream test acc "
      f"{pre_acc.mean() * 100:.1f} ± {pre_acc.std(ddof=1) * 100 if cfg.seeds > 1 else 0:.1f} % "
      f"({pre_s:.0f} s)")

  # New downstream head per seed (a fresh init with another key), pre-trained backbone.
  head_keys = jax.vmap(lambda s: jax.random.PRNGKey(1000 + s))(jnp.arange(cfg.seeds))
  fresh = init_params(head_keys)
  params0 = {"backbone": pre["backbone"], "head": fresh["head"]}
  up_head = pre["head"]

  task = classification_task(d.down_train.x, d.down_train.y, cfg.batch)
  xs = {k: (jnp.asarray(getattr(d, k).x), jnp.asarray(getattr(d, k).y))
        for k in ("down_val", "down_test", "up_val", "up_test")}
  for kind, split in data_lib.shifted_splits(d.down_test).items():
    xs[f"down_{kind}"] = (jnp.asarray(split.x), jnp.asarray(split.y))

  def metrics(pair: Any, splits: dict) -> dict[str, jax.Array]:
    params, head_up = pair
    out = {}
    for split in ("down_val", "down_test"):
      out[f"{split}_acc"], out[f"{split}_loss"] = accuracy_and_loss(params, *splits[split])
    shifted = [accuracy_and_loss(params, *splits[f"down_{k}"])[0] for k in data_lib.SHIFTS]
    for kind, acc in zip(data_lib.SHIFTS, shifted, strict=True):
      out[f"down_{kind}_acc"] = acc
    out["down_shift_acc"] = jnp.mean(jnp.stack(shifted))
    with_up_head = {"backbone": params["backbone"], "head": head_up}
    for split in ("up_val", "up_test"):
      out[f"{split}_acc"] = accuracy_and_loss(with_up_head, *splits[split])[0]
    return out

  def evaluate(params_hs: Any) -> dict[str, np.ndarray]:
    h = jax.tree.leaves(params_hs)[0].shape[0]
    head_up = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (h,) + x.shape), up_head)
    out = train.evaluate(metrics, (params_hs, head_up), xs)
    out["forgetting"] = pre_acc[None, :] - out["up_test_acc"]
    return out

  methods = methods_lib.transfer_methods()
  if cfg.methods is not None:
    methods = [m for m in methods if m.name in cfg.methods]
  methods_lib.check_grids(methods)
  protocol = runner.Protocol(
    steps=cfg.finetune_steps, select_metric="down_val_acc", select_higher=True,
    tiebreak_metric="down_val_loss", head="head", chunk=cfg.chunk,
    base_lr=cfg.base_lr or 1e-3, base_lr_from=None if cfg.base_lr else "adam",
  )
  seed_keys = jax.vmap(lambda s: jax.random.PRNGKey(2000 + s))(jnp.arange(cfg.seeds))
  template = models.CNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  results = runner.run_methods(methods, task, params0, seed_keys, evaluate, protocol,
                               progress=progress, log=log, template=template)
  return {
    "benchmark": "vision_transfer",
    "config": dataclasses.asdict(cfg),
    "data": {"upstream": "digits 0-4 (60/20/20)", "downstream": "digits 5-9, 20/class train, "
             "20/class val, rest test", "shifts": {
               "kinds": list(data_lib.SHIFTS), "noise_std": data_lib.NOISE_STD,
               "blur_sigma": data_lib.BLUR_SIGMA, "rotation_deg": data_lib.ROTATION_DEG,
               "contrast": data_lib.CONTRAST}, "sizes": {k: int(getattr(d, k).y.shape[0]) for k in (
               "up_train", "up_val", "up_test", "down_train", "down_val", "down_test")}},
    "seeds": seeds,
    "pretrain": {"up_test_acc": stats.summary(pre_acc), "seconds": pre_s},
    "selection": "grid value with the best mean downstream validation accuracy (ties: val loss)",
    "methods": results,
    "seconds_total": time.perf_counter() - t0,
    "jax": jax.__version__,
    "backend": jax.default_backend(),
  }


def table_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  header = ["method", "chosen hp", "downstream test acc %", "upstream retained acc %",
            "forgetting (pts)", "time s"]
  rows = []
  for name, e in res["methods"].items():
    if e.get("status") != "ok":
      rows.append([name, e.get("status", "?")[:60], "-", "-", "-", "-"])
      continue
    s = e["selected"]
    rows.append([
      name, stats.setting(e), stats.fmt(s["down_test_acc"], 100, 1),
      stats.fmt(s["up_test_acc"], 100, 1), stats.fmt(s["forgetting"], 100, 1),
      f"{e['seconds']:.0f}",
    ])
  return header, rows


def constrained_rows(res: dict[str, Any], min_up_val: float = 0.9
                     ) -> tuple[list[str], list[list[str]]]:
  """Selection with a retention constraint, still on validation splits only.

  Per method: among the grid values whose mean *upstream validation* accuracy
  is >= ``min_up_val``, the one with the best mean downstream validation
  accuracy; reported on the test splits. Answers "if I must keep the old task,
  what does each method give on the new one?".
  """
  header = ["method", f"chosen hp (up val acc >= {min_up_val:.0%})", "downstream test acc %",
            "upstream retained acc %", "forgetting (pts)"]
  rows = []
  for name, e in res["methods"].items():
    if e.get("status") != "ok":
      continue
    g = {k: np.asarray(v, np.float64) for k, v in e["grid_metrics"].items()}
    ok = g["up_val_acc"].mean(1) >= min_up_val
    if not ok.any():
      rows.append([name, "none qualifies", "-", "-", "-"])
      continue
    score = np.where(ok, g["down_val_acc"].mean(1), -np.inf)
    k = int(np.argmax(score))
    s = {m: stats.summary(g[m][k]) for m in ("down_test_acc", "up_test_acc", "forgetting")}
    rows.append([name, f"{e['hp_name']}={e['grid'][k]:g}", stats.fmt(s["down_test_acc"], 100, 1),
                 stats.fmt(s["up_test_acc"], 100, 1), stats.fmt(s["forgetting"], 100, 1)])
  return header, rows
