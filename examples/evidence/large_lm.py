"""A larger model: a byte-level Transformer (>= 1M parameters), stdlib source -> pydoc prose.

``python -m examples.evidence.large_lm`` (``--quick`` for a smoke run):

1. Pre-train one byte-level TinyGPT (vocab 256, ``d``/``n_layers`` below: about
   1.26M parameters) on the Python standard library's source for a fixed
   budget. The weights are cached under a content hash of everything that
   determines them (config, the training text, JAX version), in
   ``$DUALOPT_CACHE`` or ``~/.cache/dualopt_jax``; a rerun with the same
   inputs reuses them, nothing is downloaded.
2. Fine-tune on the pydoc topics prose with the main methods, each at one
   strength (the value the small language benchmark chose under the retention
   constraint, read from ``results/language_transfer.json``), at one base lr,
   over ``seeds`` fine-tuning seeds (batch order). WiSE-FT sweeps alpha over Adam's weights.
3. Report downstream test loss, loss on stdlib docstrings (the shifted prose),
   upstream test loss and forgetting, paired by seed against Adam.

One pre-trained model serves every seed (pre-training is the expensive part);
the seeds vary the fine-tuning batch order only -- a deviation from the small
benchmarks, where each seed also pre-trains its own model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import curves, models, runner, stats, train
from . import data as data_lib
from . import methods as methods_lib
from .language import lm_loss, lm_task  # the same loss and sampler; cfg gives context, batch

VOCAB = 256  # bytes

# One strength per method: the small language benchmark's constrained choice, read from its
# committed results (run `python -m examples.evidence.run_all language` first to change them).
SMALL_RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "results",
                             "language_transfer.json")
MAIN = ("adam", "wise_ft", "l2sp_decoupled", "spd", "uniform_rollback", "dualopt_default",
        "dualopt_block", "olor_ref")


@dataclasses.dataclass
class LargeConfig:
  seeds: int = 3
  d: int = 128
  n_layers: int = 6
  heads: int = 4
  context: int = 64
  batch: int = 16
  up_chars: int = 2_000_000
  pretrain_steps: int = 2000
  pretrain_lr: float = 1e-3
  finetune_steps: int = 150
  base_lr: float = 1e-3
  eval_windows: int = 64
  chunk: int = 50


def encode_bytes(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)


def model_of(cfg: LargeConfig) -> models.TinyGPT:
  return models.TinyGPT(vocab=VOCAB, d=cfg.d, n_layers=cfg.n_layers, heads=cfg.heads,
                        context=cfg.context)


def cache_dir() -> str:
  return os.environ.get("DUALOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "dualopt_jax")


def content_hash(cfg: LargeConfig, up_train: np.ndarray) -> str:
  keys = ("d", "n_layers", "heads", "context", "batch", "up_chars", "pretrain_steps",
          "pretrain_lr")
  h = hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
  h.update(up_train.tobytes())
  h.update(jax.__version__.encode())
  return h.hexdigest()[:16]


def pretrained(cfg: LargeConfig, up_train: np.ndarray, *, progress: bool, log=print
               ) -> tuple[Any, float, str]:
  """The pre-trained weights (from the cache when present); returns (params, seconds, path)."""
  model = model_of(cfg)
  template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.context), jnp.int32))["params"]
  path = os.path.join(cache_dir(), f"large_lm-{content_hash(cfg, up_train)}.msgpack")
  if os.path.exists(path):
    with open(path, "rb") as f:
      log(f"pre-trained weights from the cache: {path}")
      return flax.serialization.from_bytes(template, f.read()), 0.0, path
  params = jax.tree.map(lambda x: x[None], template)
  schedule = lambda lr: optax.warmup_cosine_decay_schedule(0.0, lr, cfg.pretrain_steps // 20,
                                                           cfg.pretrain_steps)
  run = train.train_grid(
    lm_task(model, up_train, cfg), lambda hp: optax.adam(schedule(hp)), [cfg.pretrain_lr],
    params, jax.random.PRNGKey(7)[None], steps=cfg.pretrain_steps, chunk=100,
    desc="pre-train", progress=progress,
  )
  pre = jax.tree.map(lambda x: x[0, 0], run.params)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(flax.serialization.to_bytes(pre))
  os.replace(path + ".tmp", path)
  return pre, run.seconds, path


def small_benchmark_strengths(path: str = SMALL_RESULTS) -> dict[str, float]:
  """Each method's constrained choice in the small language benchmark's results."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"large_lm: the strengths come from {path}; run "
                            "`python -m examples.evidence.run_all language` first")
  with open(path) as f:
    res = json.load(f)
  chosen = curves.chosen_indices(res)
  return {name: float(res["methods"][name]["grid"][k]) for name, k in chosen.items()
          if k is not None}


def main_methods(names: tuple[str, ...], cfg: LargeConfig,
                 strengths: dict[str, float]) -> list[methods_lib.Method]:
  """The registry's methods at one strength each (adam and olor_ref at the base lr)."""
  out = []
  for m in methods_lib.transfer_methods():
    if m.name not in names:
      continue
    if m.posthoc_of or m.fixed:
      out.append(m)
    elif m.name in ("adam", "olor_ref"):
      out.append(dataclasses.replace(m, grid=(cfg.base_lr,), fixed=True))
    else:
      if m.name not in strengths:
        raise KeyError(f"large_lm: {m.name} has no constrained choice in {SMALL_RESULTS}")
      out.append(dataclasses.replace(m, grid=(strengths[m.name],), fixed=True))
  return out


def run(cfg: LargeConfig, *, names: tuple[str, ...] = MAIN, progress: bool = True,
        log=print) -> dict[str, Any]:
  t0 = time.perf_counter()
  up = encode_bytes(data_lib.stdlib_source_text(cfg.up_chars))
  cut = int(0.95 * len(up))
  up_train, up_held = up[:cut], up[cut:]
  down = encode_bytes(data_lib.pydoc_topics_text())
  down_cut = int(0.9 * len(down))
  down_train, down_held = down[:down_cut], down[down_cut:]
  shift = encode_bytes(data_lib.stdlib_docstrings_text(skip_chars=cfg.up_chars))
  model = model_of(cfg)
  n_params = sum(x.size for x in jax.tree.leaves(
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.context), jnp.int32))["params"]))
  pre, pre_s, cache_path = pretrained(cfg, up_train, progress=progress, log=log)

  def windows(tokens: np.ndarray) -> jax.Array:
    return jnp.asarray(data_lib.fixed_windows(tokens, cfg.eval_windows, cfg.context))

  h_up, h_down = len(up_held) // 2, len(down_held) // 2
  evals = {"up_val": windows(up_held[:h_up]), "up_test": windows(up_held[h_up:]),
           "down_val": windows(down_held[:h_down]), "down_test": windows(down_held[h_down:]),
           "down_docstrings": windows(shift)}
  loss_of = lambda p, ws: {f"{k}_loss": lm_loss(model, p, w) for k, w in ws.items()}
  pre_metrics = {k: float(v) for k, v in jax.jit(loss_of)(pre, evals).items()}
  log(f"{n_params / 1e6:.2f}M-parameter byte-level TinyGPT: upstream test loss "
      f"{pre_metrics['up_test_loss']:.3f}, downstream test loss before fine-tuning "
      f"{pre_metrics['down_test_loss']:.3f} (pre-training {pre_s:.0f} s)")

  def evaluate(params_hs: Any) -> dict[str, np.ndarray]:
    out = train.evaluate(loss_of, params_hs, evals)
    out["forgetting"] = out["up_test_loss"] - pre_metrics["up_test_loss"]
    out["down_shift_loss"] = out["down_docstrings_loss"]
    return out

  params0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.seeds,) + x.shape), pre)
  protocol = runner.Protocol(steps=cfg.finetune_steps, select_metric="down_val_loss",
                             select_higher=False, head=None, chunk=cfg.chunk,
                             base_lr=cfg.base_lr, base_lr_from=None)
  seed_keys = jax.vmap(lambda s: jax.random.PRNGKey(2000 + s))(jnp.arange(cfg.seeds))
  template = jax.tree.map(lambda x: x, pre)
  strengths = small_benchmark_strengths()
  results = runner.run_methods(main_methods(names, cfg, strengths),
                               lm_task(model, down_train, cfg),
                               params0, seed_keys, evaluate, protocol, progress=progress,
                               log=log, template=template)
  return {
    "benchmark": "large_language_transfer",
    "config": dataclasses.asdict(cfg),
    "n_params": int(n_params),
    "seeds": list(range(cfg.seeds)),
    "pretrain": {**pre_metrics, "seconds": pre_s, "cache": os.path.basename(cache_path)},
    "strengths": {m: strengths[m] for m in names if m in strengths},
    "methods": results,
    "seconds_total": time.perf_counter() - t0,
    "jax": jax.__version__,
  }


def table(res: dict[str, Any]) -> str:
  adam = res["methods"].get("adam", {})
  header = ["method", "setting", "down test loss", "docstrings loss (shift)", "upstream test loss",
            "Δ forgetting vs adam (t)"]
  rows = []
  for name, e in res["methods"].items():
    if e.get("status") != "ok":
      rows.append([name, e.get("status", "?")[:60], "-", "-", "-", "-"])
      continue
    g = {m: np.asarray(v, np.float64) for m, v in e["grid_metrics"].items()}
    k = e["selected_index"]
    delta = "-"
    if adam.get("status") == "ok" and name != "adam":
      p = stats.paired(g["forgetting"][k], np.asarray(adam["grid_metrics"]["forgetting"])[0])
      delta = f"{p['mean']:+.3f} ± {p['std']:.3f} (t={p['t']:.1f})"
    label = stats.setting(e, k)
    rows.append([name, label, *(stats.fmt(stats.summary(g[m][k]), 1, 3) for m in (
      "down_test_loss", "down_shift_loss", "up_test_loss")), delta])
  return stats.table(rows, header)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  cfg = LargeConfig()
  if args.quick:
    cfg = LargeConfig(seeds=2, d=32, n_layers=1, context=16, batch=4, up_chars=50_000,
                      pretrain_steps=10, finetune_steps=4, eval_windows=4, chunk=4)
  res = run(cfg, progress=not args.no_progress)
  res["command"] = "python -m examples.evidence.large_lm" + (" --quick" if args.quick else "")
  text = table(res)
  os.makedirs(args.out, exist_ok=True)
  stats.write_json(os.path.join(args.out, "large_language_transfer.json"), res)
  with open(os.path.join(args.out, "large_language_transfer.md"), "w") as f:
    f.write(f"`{res['command']}` ({res['n_params'] / 1e6:.2f}M parameters, {cfg.seeds} seeds, "
            f"{res['seconds_total']:.0f} s)\n\n{text}\n")
  print(text)
  print(f"\n{res['seconds_total']:.0f} s in all")
  return 0


if __name__ == "__main__":
  sys.exit(main())
