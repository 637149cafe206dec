"""From-scratch benchmark: DualOpt scratch mode (real-time layer-wise decay) vs AdamW vs none.

Random init, the same step budget and cosine lr for every method. Plain Adam
(no decay) chooses the lr on validation first; every decay method then uses
that lr and tunes its decay on a grid of per-step decay fractions at the
peak lr (the same four values for all, so AdamW is expressed in the same
units: ``weight_decay = fraction / lr``). The ablation varies one factor of
DualOpt's scratch profile at a time:

* direction: ``shallow`` (input side decayed most, OLOR's direction),
  ``deep`` (output side most), ``flat`` (every layer the same);
* power of the depth profile: 1 or 2;
* whether the decay follows the lr schedule (``decay_follows_lr``).

Tasks: vision -- the CNN on all ten digits, 30 training images per class;
language -- TinyGPT on the stdlib source text.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dualopt_jax as dj

from . import data as data_lib
from . import language, models, runner, stats, train
from . import methods as methods_lib

# Six values per method (the transfer benchmarks use four): the best decay differs by task and
# direction by more than a four-value grid spans.
DECAY_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
LR_GRID = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)

# (name, decay_profile, power, decay_follows_lr)
VARIANTS = (
  ("dualopt_shallow_p1_lr", "shallow", 1.0, True),
  ("dualopt_shallow_p2_lr", "shallow", 2.0, True),
  ("dualopt_deep_p1_lr", "deep", 1.0, True),
  ("dualopt_deep_p2_lr", "deep", 2.0, True),
  ("dualopt_flat_lr", "flat", 1.0, True),
  ("dualopt_shallow_p1_const", "shallow", 1.0, False),
  ("dualopt_deep_p1_const", "deep", 1.0, False),
  ("dualopt_flat_const", "flat", 1.0, False),
)


def _adam(ctx: methods_lib.Context, hp: Any) -> optax.GradientTransformation:
  return optax.adam(methods_lib.cosine(hp, ctx.steps))


def _adamw(ctx: methods_lib.Context, hp: Any) -> optax.GradientTransformation:
  return optax.adamw(methods_lib.cosine(ctx.base_lr, ctx.steps), weight_decay=hp / ctx.base_lr)


def _variant(profile: str, power: float, follows: bool):
  def build(ctx: methods_lib.Context, hp: Any) -> optax.GradientTransformation:
    return dj.dualopt(methods_lib.cosine(ctx.base_lr, ctx.steps), mode="scratch", weight_decay=hp,
                      decay_profile=profile, power=power, decay_follows_lr=follows,
                      peak_learning_rate=ctx.base_lr)

  return build


def scratch_methods() -> list[methods_lib.Method]:
  out = [
    methods_lib.Method("adam_no_decay", "lr", LR_GRID, _adam, tunes_lr=True,
                       note="no weight decay; its lr is every other method's lr"),
    methods_lib.Method("adamw", "decay_per_step", DECAY_GRID, _adamw,
                       note="optax.adamw with weight_decay = fraction / lr"),
  ]
  for name, profile, power, follows in VARIANTS:
    out.append(methods_lib.Method(
      name, "decay_per_step", DECAY_GRID, _variant(profile, power, follows),
      note=f"dualopt(mode='scratch', decay_profile={profile!r}, power={power:g}, "
           f"decay_follows_lr={follows})"))
  return out


@dataclasses.dataclass
class ScratchConfig:
  seeds: int = 5
  vision_steps: int = 400
  vision_batch: int = 32
  language_steps: int = 400
  language: language.LanguageConfig = dataclasses.field(default_factory=language.LanguageConfig)
  methods: tuple[str, ...] | None = None
  chunk: int = 50


def _vision_setup(cfg: ScratchConfig):
  train_s, val_s, test_s = data_lib.digits_scratch()
  model = models.CNN(n_classes=10)

  def loss_fn(params, b):
    logits = model.apply({"params": params}, b[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

  def sample(key, d):
    idx = jax.random.randint(key, (cfg.vision_batch,), 0, d[0].shape[0])
    return d[0][idx], d[1][idx]

  task = train.Task(loss_fn, sample, (jnp.asarray(train_s.x), jnp.asarray(train_s.y)),
                    models.cnn_block_of)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(cfg.seeds))
  params0 = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)))["params"])(keys)
  template = model.init(keys[0], jnp.zeros((1, 8, 8, 1)))["params"]  # definition order

  splits = {"val": (jnp.asarray(val_s.x), jnp.asarray(val_s.y)),
            "test": (jnp.asarray(test_s.x), jnp.asarray(test_s.y))}

  def metrics(p, sp):
    out = {}
    for split, (x, y) in sp.items():
      logits = model.apply({"params": p}, x)
      out[f"{split}_acc"] = jnp.mean(jnp.argmax(logits, -1) == y)
      out[f"{split}_loss"] = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return out

  def evaluate(params_hs):
    return train.evaluate(metrics, params_hs, splits)

  protocol = runner.Protocol(steps=cfg.vision_steps, select_metric="val_acc",
                             select_higher=True, tiebreak_metric="val_loss",
                             base_lr_from="adam_no_decay", chunk=cfg.chunk)
  info = {"task": "CNN, digits 0-9 from random init, 30/class train, 30/class val, rest test",
          "sizes": [int(train_s.y.shape[0]), int(val_s.y.shape[0]), int(test_s.y.shape[0])]}
  return task, params0, evaluate, protocol, info, template


def _language_setup(cfg: ScratchConfig):
  lcfg = cfg.language
  d = data_lib.text_transfer(up_chars=lcfg.up_chars)
  model = language.model_of(lcfg)
  half = len(d.up_val) // 2
  val = jnp.asarray(data_lib.fixed_windows(d.up_val[:half], lcfg.eval_windows, lcfg.context))
  test = jnp.asarray(data_lib.fixed_windows(d.up_val[half:], lcfg.eval_windows, lcfg.context))
  task = language.lm_task(model, d.up_train, lcfg)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(cfg.seeds))
  params0 = language.init_params(model, keys, lcfg.context)
  template = model.init(keys[0], jnp.zeros((1, lcfg.context), jnp.int32))["params"]
  loss_of = lambda p, v, t: {"val_loss": language.lm_loss(model, p, v),
                             "test_loss": language.lm_loss(model, p, t)}

  def evaluate(params_hs):
    return train.evaluate(loss_of, params_hs, val, test)

  protocol = runner.Protocol(steps=cfg.language_steps, select_metric="val_loss",
                             select_higher=False, base_lr_from="adam_no_decay", chunk=cfg.chunk)
  info = {"task": f"TinyGPT d={lcfg.d} L={lcfg.n_layers} from random init on stdlib source; "
          "held-out 10% split in half: val (selection) / test (reported)"}
  return task, params0, evaluate, protocol, info, template


def run(cfg: ScratchConfig, bench: str, *, progress: bool = True, log=print) -> dict[str, Any]:
  t0 = time.perf_counter()
  setup = {"vision": _vision_setup, "language": _language_setup}[bench]
  task, params0, evaluate, protocol, info, template = setup(cfg)
  methods = scratch_methods()
  if cfg.methods is not None:
    methods = [m for m in methods if m.name in cfg.methods]
  methods_lib.check_grids(methods, len(DECAY_GRID))
  seed_keys = jax.vmap(lambda s: jax.random.PRNGKey(3000 + s))(jnp.arange(cfg.seeds))
  results = runner.run_methods(methods, task, params0, seed_keys, evaluate, protocol,
                               progress=progress, log=log, template=template)
  conf = dataclasses.asdict(cfg)
  if bench == "vision":
    conf.pop("language")
  return {"benchmark": f"scratch_{bench}", "config": conf, "data": info,
          "seeds": list(range(cfg.seeds)), "methods": results,
          "selection": f"best mean {protocol.select_metric} over seeds",
          "seconds_total": time.perf_counter() - t0, "jax": jax.__version__}


def table_rows(res: dict[str, Any], reference: str = "adam_no_decay"
               ) -> tuple[list[str], list[list[str]]]:
  vision_bench = res["benchmark"] == "scratch_vision"
  metric = "test_acc" if vision_bench else "test_loss"
  scale, digits = (100, 1) if vision_bench else (1, 3)
  header = ["method", "chosen hp", "val acc %" if vision_bench else "val loss",
            "test acc %" if vision_bench else "test loss",
            f"Δ test vs {reference} (paired; t)", "time s"]
  ref = res["methods"].get(reference, {})
  rows = []
  for name, e in res["methods"].items():
    if e.get("status") != "ok":
      rows.append([name, e.get("status", "?")[:60], "-", "-", "-", "-"])
      continue
    s = e["selected"]
    if vision_bench:
      cells = [stats.fmt(s["val_acc"], 100, 1), stats.fmt(s["test_acc"], 100, 1)]
    else:
      cells = [stats.fmt(s["val_loss"], 1, 3), stats.fmt(s["test_loss"], 1, 3)]
    delta = "-"
    if ref.get("status") == "ok" and name != reference:
      d = stats.paired(s[metric]["values"], ref["selected"][metric]["values"])
      delta = f"{stats.fmt(d, scale, digits)}; t={d['t']:.1f}"
    rows.append([name, f"{e['hp_name']}={e['selected_hp']:g}", *cells, delta,
                 f"{e['seconds']:.0f}"])
  return header, rows
