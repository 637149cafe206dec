"""Language transfer benchmark: a tiny char-level Transformer, stdlib source -> pydoc prose.

Pre-train one TinyGPT per seed on Python standard-library source code, then
fine-tune it (all weights; the output head is pre-trained too, no new head)
on the English prose of ``pydoc_data/topics.py``. Each method's main
hyper-parameter is chosen on the downstream validation windows (mean loss
over seeds); reported at the chosen value: the downstream *test* loss
(held-out windows never used for selection), the loss on prose from another
source (standard-library docstrings: the shifted set) and forgetting = the
rise of the upstream *test* loss over the pre-trained model's (the upstream
held-out text is split in half: validation for the retention constraint,
test for reporting).
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
class LanguageConfig:
  seeds: int = 5
  d: int = 64
  n_layers: int = 2
  heads: int = 4
  context: int = 32
  batch: int = 8
  pretrain_steps: int = 1000
  pretrain_lr: float = 3e-3
  finetune_steps: int = 150
  eval_windows: int = 64
  up_chars: int = 600_000
  methods: tuple[str, ...] | None = None
  chunk: int = 50
  # None: plain Adam chooses the base lr on validation; a value fixes it.
  base_lr: float | None = None


def model_of(cfg: LanguageConfig) -> models.TinyGPT:
  return models.TinyGPT(vocab=data_lib.VOCAB, d=cfg.d, n_layers=cfg.n_layers, heads=cfg.heads,
                        context=cfg.context)


def lm_loss(model: models.TinyGPT, params: Any, windows: jax.Array) -> jax.Array:
  logits = model.apply({"params": params}, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def lm_task(model: models.TinyGPT, tokens: np.ndarray, cfg: LanguageConfig) -> train.Task:
  n = cfg.context + 1

  def sample(key, toks):
    starts = jax.random.randint(key, (cfg.batch,), 0, toks.shape[0] - n)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(toks, (s,), (n,)))(starts)

  return train.Task(lambda p, b: lm_loss(model, p, b), sample, jnp.asarray(tokens),
                    models.gpt_block_of)


def init_params(model: models.TinyGPT, keys: jax.Array, context: int) -> Any:
  x = jnp.zeros((1, context), jnp.int32)
  return jax.vmap(lambda k: model.init(k, x)["params"])(keys)


def run(cfg: LanguageConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
  t0 = time.perf_counter()
  d = data_lib.text_transfer(up_chars=cfg.up_chars)
  model = model_of(cfg)
  half, up_half = len(d.down_val) // 2, len(d.up_val) // 2
  windows = {
    "up_val": data_lib.fixed_windows(d.up_val[:up_half], cfg.eval_windows, cfg.context),
    "up_test": data_lib.fixed_windows(d.up_val[up_half:], cfg.eval_windows, cfg.context),
    "down_val": data_lib.fixed_windows(d.down_val[:half], cfg.eval_windows, cfg.context),
    "down_test": data_lib.fixed_windows(d.down_val[half:], cfg.eval_windows, cfg.context),
    "down_docstrings": data_lib.fixed_windows(d.down_shift, cfg.eval_windows, cfg.context),
  }
  windows = {k: jnp.asarray(v) for k, v in windows.items()}
  seeds = list(range(cfg.seeds))
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(cfg.seeds))
  params = init_params(model, keys, cfg.context)

  pre_run = train.train_grid(
    lm_task(model, d.up_train, cfg),
    lambda hp: optax.adam(methods_lib.cosine(hp, cfg.pretrain_steps)), [cfg.pretrain_lr],
    params, jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys), steps=cfg.pretrain_steps,
    chunk=100, desc="pre-train", progress=progress,
  )
  pre = jax.tree.map(lambda x: x[0], pre_run.params)
  loss_of = lambda p, ws: {f"{k}_loss": lm_loss(model, p, w) for k, w in ws.items()}
  pre_up = np.asarray(jax.vmap(lambda p: lm_loss(model, p, windows["up_val"]))(pre))
  pre_up_test = np.asarray(jax.vmap(lambda p: lm_loss(model, p, windows["up_test"]))(pre))
  pre_down = np.asarray(jax.vmap(lambda p: lm_loss(model, p, windows["down_test"]))(pre))
  log(f"pre-trained {cfg.seeds} TinyGPTs on stdlib source: upstream val loss "
      f"{pre_up.mean():.3f}, downstream test loss before fine-tuning {pre_down.mean():.3f} "
      f"({pre_run.seconds:.0f} s)")

  def evaluate(params_hs: Any) -> dict[str, np.ndarray]:
    out = train.evaluate(loss_of, params_hs, windows)
    out["forgetting"] = out["up_test_loss"] - pre_up_test[None, :]
    out["down_shift_loss"] = out["down_docstrings_loss"]
    return out

  methods = methods_lib.transfer_methods()
  if cfg.methods is not None:
    methods = [m for m in methods if m.name in cfg.methods]
  methods_lib.check_grids(methods)
  protocol = runner.Protocol(
    steps=cfg.finetune_steps, select_metric="down_val_loss", select_higher=False, head=None,
    chunk=cfg.chunk, base_lr=cfg.base_lr or 1e-3, base_lr_from=None if cfg.base_lr else "adam",
  )
  seed_keys = jax.vmap(lambda s: jax.random.PRNGKey(2000 + s))(jnp.arange(cfg.seeds))
  template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.context), jnp.int32))["params"]
  results = runner.run_methods(methods, lm_task(model, d.down_train, cfg), pre, seed_keys,
                               evaluate, protocol, progress=progress, log=log, template=template)
  return {
    "benchmark": "language_transfer",
    "config": dataclasses.asdict(cfg),
    "data": {"upstream": f"Python {'.'.join(map(str, __import__('sys').version_info[:2]))} "
             "stdlib top-level *.py source (sorted, first up_chars chars), last 10% val",
             "downstream": "pydoc_data/topics.py prose; last 10% held out, split in half: "
             "val (selection) / test (reported)",
             "shifts": {"kinds": ["docstrings"], "docstrings": "stdlib module/class/function "
                        "docstrings (> 80 chars) of the modules after the upstream text"},
             "tokens": {"up_train": len(d.up_train), "down_train": len(d.down_train)}},
    "seeds": seeds,
    "pretrain": {"up_val_loss": stats.summary(pre_up), "up_test_loss": stats.summary(pre_up_test),
                 "down_test_loss": stats.summary(pre_down),
                 "seconds": pre_run.seconds},
    "selection": "grid value with the lowest mean downstream validation loss",
    "methods": results,
    "seconds_total": time.perf_counter() - t0,
    "jax": jax.__version__,
  }


def table_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  header = ["method", "chosen hp", "downstream test loss", "upstream test loss",
            "forgetting (loss rise)", "time s"]
  rows = []
  for name, e in res["methods"].items():
    if e.get("status") != "ok":
      rows.append([name, e.get("status", "?")[:60], "-", "-", "-", "-"])
      continue
    s = e["selected"]
    rows.append([name, stats.setting(e), stats.fmt(s["down_test_loss"], 1, 3),
                 stats.fmt(s["up_test_loss"], 1, 3), stats.fmt(s["forgetting"], 1, 3),
                 f"{e['seconds']:.0f}"])
  return header, rows
