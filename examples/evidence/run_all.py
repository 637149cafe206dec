"""Runs the full evidence grids and writes JSON/CSV/PNG next to each other.

From the repository root::

  python -m examples.evidence.run_all vision            # = python examples/demo.py --full
  python -m examples.evidence.run_all language
  python -m examples.evidence.run_all scratch-vision
  python -m examples.evidence.run_all scratch-language
  python -m examples.evidence.run_all all --out results

Add ``--seeds N`` / ``--steps-scale F`` for a cheaper run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import curves, language, plots, runner, scratch, stats, summarize, vision

BENCHES = ("vision", "language", "scratch-vision", "scratch-language")


def _write(res: dict, out: str, stem: str, header: list[str], rows: list[list[str]]) -> str:
  text = stats.table(rows, header)
  stats.write_json(os.path.join(out, f"{stem}.json"), res)
  stats.write_csv(os.path.join(out, f"{stem}.csv"),
                  runner.csv_rows(res["benchmark"], res["methods"], res["seeds"]))
  spec = summarize.SPECS.get(f"{stem}.json")
  paired = ""
  if spec and res["methods"].get(spec[0], {}).get("status") == "ok":
    paired = (f"\n\nPaired by seed vs {spec[0]} (mean ± std of the per-seed difference, "
              f"t = mean/(std/√n)):\n" + summarize.paired_table(res, *spec))
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(f"`{res.get('command', '')}`\n\n{text}{paired}\n")
  return text + paired


def report(bench: str, res: dict, out: str) -> str:
  """Writes JSON, CSV, Markdown table and plots of one benchmark's results; returns the table."""
  os.makedirs(out, exist_ok=True)
  n = len(res["seeds"])
  if bench == "vision":
    text = _write(res, out, "vision_transfer", *vision.table_rows(res))
    text = curve_report(res, out, "vision_transfer", "digits 0-4 → 5-9") + \
      "\n\nAt the grid value chosen by downstream validation alone:\n\n" + text
  elif bench == "language":
    text = _write(res, out, "language_transfer", *language.table_rows(res))
    text = curve_report(
      res, out, "language_transfer", "stdlib source → pydoc prose, TinyGPT",
      x_label="upstream: stdlib source test loss (nats/char)",
      y_label="downstream: pydoc prose test loss (nats/char)",
    ) + "\n\nAt the grid value chosen by downstream validation alone:\n\n" + text
  else:
    kind = bench.split("-")[1]
    text = _write(res, out, f"scratch_{kind}", *scratch.table_rows(res))
    metric, label, scale_y = (("val_acc", "validation accuracy (%)", 100) if kind == "vision"
                              else ("val_loss", "validation loss", 1))
    plots.grid_curves(res, os.path.join(out, f"scratch_{kind}_ablation.png"), metric=metric,
                      y_label=label, y_scale=scale_y,
                      title=f"from scratch ({kind}), {n} seeds: decay grid per variant")
  return text


DRIFT_PANELS = ("adam", "wise_ft", "l2sp_decoupled", "spd", "dualopt_default", "dualopt_block",
                "uniform_rollback", "olor_ref")


def curve_report(res: dict, out: str, stem: str, title: str, **plot_labels: str) -> str:
  """The verdict, curve summary and shift tables (prepended to the .md) and the two figures."""
  n = len(res["seeds"])
  chosen = curves.chosen_indices(res)
  base = next((e.get("base_lr") for e in res["methods"].values() if e.get("base_lr")), None)
  spec = curves.spec_of(res)
  summary = stats.table(*reversed(curves.summary_rows(res)))
  kinds = res.get("data", {}).get("shifts", {}).get("kinds", [])
  shifts = stats.table(*reversed(curves.shift_rows(res, kinds))) if kinds else ""
  text = (f"{curves.default_verdict(res)}\n\n"
          f"Curves over each method's grid ({n} seeds, base lr {base:g}); hypervolume beyond the "
          f"chance-level reference point {spec.ref} of (upstream test, downstream test), "
          f"paired by seed:\n\n{summary}")
  if shifts:
    text += ("\n\nDownstream test results in distribution and under shift, at the constrained "
             f"choice:\n\n{shifts}")
  md = os.path.join(out, f"{stem}.md")
  with open(md) as f:
    command, _, rest = f.read().partition("\n\n")
  with open(md, "w") as f:
    f.write(f"{command}\n\n{text}\n\nAt the grid value chosen by downstream validation "
            f"alone (no retention constraint):\n\n{rest}")
  prefix = stem.replace("_transfer", "")
  plots.curves(res, os.path.join(out, f"{prefix}_curves.png"), chosen=chosen, spec=spec,
               title=f"{title}, {n} seeds, base lr {base:g}", **plot_labels)
  plots.drift_panels(res, os.path.join(out, f"{prefix}_drift.png"), methods=DRIFT_PANELS,
                     chosen=chosen, title="per-layer drift during fine-tuning at the constrained "
                     "choice (mean ± std over seeds)")
  return text


_STEMS = {"vision": "vision_transfer", "language": "language_transfer",
          "scratch-vision": "scratch_vision", "scratch-language": "scratch_language"}
_CONFIGS = {"vision": vision.VisionConfig, "language": language.LanguageConfig}
_RUNS = {"vision": vision.run, "language": language.run}


def merge_bench(bench: str, out: str, methods: tuple[str, ...], *, progress: bool) -> str:
  """Reruns ``methods`` with the configuration stored in ``out``'s JSON and replaces their rows.

  For a method whose code changed (a library default, say): the base lr is the one stored,
  the pre-training is redone from the same seeds and must reproduce the stored upstream
  numbers, so the merged rows are comparable with the rest.
  """
  if bench not in _CONFIGS:
    raise SystemExit(f"--merge: only {sorted(_CONFIGS)} are merged, not {bench!r}")
  path = os.path.join(out, _STEMS[bench] + ".json")
  with open(path) as f:
    old = json.load(f)
  base = [e["base_lr"] for e in old["methods"].values() if e.get("base_lr")]
  if not base:
    raise SystemExit(f"--merge: {path} records no base lr to rerun at")
  cfg = _CONFIGS[bench](**{**old["config"], "methods": methods, "base_lr": base[0]})
  new = _RUNS[bench](cfg, progress=progress)
  for key, value in old["pretrain"].items():
    if isinstance(value, dict) and not np.allclose(new["pretrain"][key]["values"], value["values"],
                                                   rtol=1e-5, atol=1e-7):
      raise SystemExit(f"--merge: pre-training did not reproduce {key} ({new['pretrain'][key]} "
                       f"vs {value}); rerun the whole benchmark instead")
  missing = [m for m in methods if m not in new["methods"]]
  if missing:
    raise SystemExit(f"--merge: no such method(s) {missing}")
  failed = {m: e["status"] for m, e in new["methods"].items() if e.get("status") != "ok"}
  if failed:  # e.g. a post-hoc method merged without the method it reads
    raise SystemExit(f"--merge: nothing written, these did not run: {failed}")
  old["methods"].update(new["methods"])
  old.setdefault("merged", []).append(
    {"methods": list(methods), "seconds": new["seconds_total"], "jax": new["jax"],
     "command": f"python -m examples.evidence.run_all {bench} --out {out} "
                f"--merge {','.join(methods)}"})
  return report(bench, old, out)


def run_bench(bench: str, out: str, *, seeds: int | None, scale: float, progress: bool,
              base_lr: float | None = None, methods: tuple[str, ...] | None = None) -> str:
  s = lambda n: max(1, int(round(n * scale)))
  cmd = "python -m examples.evidence.run_all " + bench + (f" --seeds {seeds}" if seeds else "") + (
    f" --steps-scale {scale:g}" if scale != 1 else "") + (
    f" --base-lr {base_lr:g}" if base_lr else "") + (
    f" --methods {','.join(methods)}" if methods else "")
  if bench == "vision":
    cfg = vision.VisionConfig()
    cfg.pretrain_steps, cfg.finetune_steps = s(cfg.pretrain_steps), s(cfg.finetune_steps)
    cfg.seeds = seeds or cfg.seeds
    cfg.base_lr, cfg.methods = base_lr, methods
    res = vision.run(cfg, progress=progress)
  elif bench == "language":
    cfg = language.LanguageConfig()
    cfg.pretrain_steps, cfg.finetune_steps = s(cfg.pretrain_steps), s(cfg.finetune_steps)
    cfg.seeds = seeds or cfg.seeds
    cfg.base_lr, cfg.methods = base_lr, methods
    res = language.run(cfg, progress=progress)
  else:
    cfg = scratch.ScratchConfig()
    cfg.vision_steps, cfg.language_steps = s(cfg.vision_steps), s(cfg.language_steps)
    cfg.seeds = seeds or cfg.seeds
    res = scratch.run(cfg, bench.split("-")[1], progress=progress)
  res["command"] = cmd
  return report(bench, res, out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="full evidence grids")
  parser.add_argument("bench", choices=(*BENCHES, "all"))
  parser.add_argument("--out", default="results")
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--steps-scale", type=float, default=1.0)
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--base-lr", type=float, default=None,
                      help="vision: fix the base lr instead of letting Adam choose it on val "
                      "(the sensitivity run; write it to another --out)")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset of the transfer methods (default: all)")
  parser.add_argument("--merge", default=None,
                      help="comma-separated methods to rerun into the JSON already in --out "
                      "(same configuration and base lr); the other rows are kept")
  parser.add_argument("--from-json", action="store_true",
                      help="do not train: rewrite tables and plots from the JSON in --out")
  args = parser.parse_args(argv)
  if args.merge:
    ignored = [flag for flag, given in (("--methods", args.methods), ("--base-lr", args.base_lr),
                                         ("--seeds", args.seeds),
                                         ("--steps-scale", args.steps_scale != 1.0),
                                         ("--from-json", args.from_json)) if given]
    if ignored:
      parser.error(f"--merge reruns with the configuration stored in --out; {', '.join(ignored)} "
                   "would be ignored")
  for bench in BENCHES if args.bench == "all" else (args.bench,):
    start = time.perf_counter()
    if args.merge:
      text = merge_bench(bench, args.out, tuple(args.merge.split(",")),
                         progress=not args.no_progress)
      print(f"\n== {bench} (merged, {time.perf_counter() - start:.0f} s)\n{text}\n", flush=True)
      continue
    if args.from_json:
      path = os.path.join(args.out, _STEMS[bench] + ".json")
      if os.path.exists(path):
        with open(path) as f:
          print(f"\n== {bench}\n{report(bench, json.load(f), args.out)}\n")
      continue
    text = run_bench(bench, args.out, seeds=args.seeds, scale=args.steps_scale,
                     progress=not args.no_progress, base_lr=args.base_lr,
                     methods=tuple(args.methods.split(",")) if args.methods else None)
    print(f"\n== {bench} ({time.perf_counter() - start:.0f} s)\n{text}\n", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

