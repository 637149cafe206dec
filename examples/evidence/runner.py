"""Runs a list of methods on one task with the same budget, selects each on validation."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import dualopt_jax as dj

from . import methods as methods_lib
from . import stats, train


@dataclasses.dataclass
class Protocol:
  """How methods are compared: one step budget, one validation metric."""

  steps: int
  select_metric: str  # metric (H, S) used to choose the grid value
  select_higher: bool
  tiebreak_metric: str | None = None  # lower is better
  head: str | None = None
  base_lr: float = 1e-3  # replaced by the lr chosen for ``base_lr_from``
  base_lr_from: str | None = "adam"  # None: ``base_lr`` is fixed (the sensitivity run)
  chunk: int = 50
  drift_every: int = 5  # keep every k-th step of the drift trace


def run_methods(
  methods: list[methods_lib.Method],
  task: train.Task,
  params0: Any,
  seed_keys: Any,
  evaluate: Callable[[Any], dict[str, np.ndarray]],
  protocol: Protocol,
  *,
  progress: bool = True,
  log: Callable[[str], None] = print,
  template: Any = None,
) -> dict[str, Any]:
  """Trains every method on its grid x seeds; returns per-method results (JSON-ready)."""
  out: dict[str, Any] = {}
  base_lr = protocol.base_lr
  order = depths = None
  if template is not None:
    # Tensor-granularity profiles need the forward order where the names do not say it (the
    # norm, attention and MLP inside a Transformer block); it is traced from the loss once.
    batch = task.sample(jax.random.key(0), task.data)
    order = dj.forward_order(task.loss_fn, template, batch)
    depths = dj.layer_depths(template, head=protocol.head)
  trained: dict[str, Any] = {}  # (params, drift) of the methods a post-hoc method reads
  sources = {m.posthoc_of for m in methods if m.posthoc_of}
  bar = tqdm(methods, desc="methods", disable=not progress)
  for m in bar:
    bar.set_postfix_str(m.name)
    entry: dict[str, Any] = {
      "hp_name": m.hp_name, "grid": list(m.grid), "note": m.note, "tunes_lr": m.tunes_lr,
    }
    ctx = methods_lib.Context(steps=protocol.steps, base_lr=base_lr, head=protocol.head,
                              order=order, depths=depths)
    entry["base_lr"] = None if m.tunes_lr else base_lr
    start = time.perf_counter()
    try:
      if m.posthoc_of:
        run = _posthoc(m, ctx, trained, params0, task.group_of)
      else:
        run = train.train_grid(
          task, lambda hp, ctx=ctx, m=m: m.build(ctx, hp), m.grid, params0, seed_keys,
          steps=protocol.steps, chunk=protocol.chunk, desc=m.name, progress=progress,
          template=template,
        )
      metrics = evaluate(run.params)
    except Exception as e:  # a failing method must not stop the benchmark
      entry["status"] = f"error: {e.__class__.__name__}: {e}"
      entry["traceback"] = traceback.format_exc(limit=6)
      log(f"[error] {m.name}: {e.__class__.__name__}: {e}")
      out[m.name] = entry
      continue
    if m.name in sources:
      trained[m.name] = (m.grid, run)
    metrics["train_loss_end"] = run.final_loss
    k = stats.select(
      metrics[protocol.select_metric],
      metrics.get(protocol.tiebreak_metric) if protocol.tiebreak_metric else None,
      higher=protocol.select_higher,
    )
    keep = slice(protocol.drift_every - 1, None, protocol.drift_every)
    entry.update(
      status="ok",
      seconds=time.perf_counter() - start,
      vectorized_grid=run.vectorized,
      selected_index=k,
      selected_hp=float(m.grid[k]),
      grid_metrics={name: np.asarray(v).tolist() for name, v in metrics.items()},
      selected={name: stats.summary(np.asarray(v)[k]) for name, v in metrics.items()},
      drift_groups=run.groups,
      drift_steps=list(range(1, protocol.steps + 1))[keep],
      drift_selected_mean=run.drift[k].mean(axis=0)[keep],
      drift_selected_std=run.drift[k].std(axis=0)[keep],
      drift_grid_mean=run.drift.mean(axis=1)[:, keep],
      drift_grid_std=run.drift.std(axis=1)[:, keep],
    )
    log(f"[done] {m.name}: {m.hp_name}={m.grid[k]:g} chosen, {entry['seconds']:.0f} s"
        f"{'' if run.vectorized else ' (grid not vectorized: one compile per value)'}")
    if protocol.base_lr_from == m.name:
      base_lr = float(m.grid[k])
      entry["base_lr_index"] = k
      log(f"[base lr] {m.name} chose lr={base_lr:g} on validation; other methods use it")
    out[m.name] = entry
  bar.close()
  return out


def _posthoc(m: methods_lib.Method, ctx: methods_lib.Context, trained: dict[str, Any],
             params0: Any, group_of: Any) -> train.GridRun:
  """A post-hoc method's grid from the weights its source method reached at the base lr.

  The drift trace applies the same map to every step of the source's path:
  for an interpolation toward the anchor, a layer's relative drift is the
  source's times alpha (groups that the head pattern selects keep theirs).
  """
  if m.posthoc_of not in trained:
    raise ValueError(f"{m.name} reads {m.posthoc_of}'s weights; run {m.posthoc_of} first.")
  grid, src = trained[m.posthoc_of]
  hits = np.flatnonzero(np.isclose(np.asarray(grid), ctx.base_lr, rtol=1e-6))
  if not len(hits):
    raise ValueError(f"{m.name}: the base lr {ctx.base_lr:g} is not in {m.posthoc_of}'s grid.")
  k = int(hits[0])
  finetuned = jax.tree.map(lambda x: x[k], src.params)
  alphas = jnp.asarray(m.grid, jnp.float32)
  params = jax.vmap(lambda a: m.interpolate(ctx, finetuned, params0, a))(alphas)
  selects = dj.path_filter(ctx.head) if ctx.head else (lambda _p: False)
  scale = np.asarray([[1.0 if selects((g,)) else a for g in src.groups] for a in m.grid])
  drift = scale[:, None, None, :] * src.drift[k][None]
  loss = np.full((len(m.grid), src.final_loss.shape[1]), np.nan)
  return train.GridRun(params, drift, src.groups, 0.0, True, loss)


def csv_rows(benchmark: str, results: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
  """One row per (method, grid value, seed)."""
  rows = []
  for name, e in results.items():
    if e.get("status") != "ok":
      rows.append({"benchmark": benchmark, "method": name, "status": e.get("status")})
      continue
    for h, hp in enumerate(e["grid"]):
      for si, seed in enumerate(seeds):
        row = {"benchmark": benchmark, "method": name, "status": "ok", "hp_name": e["hp_name"],
               "hp": hp, "base_lr": e.get("base_lr"), "selected": h == e["selected_index"],
               "seed": seed}
        for metric, grid in e["grid_metrics"].items():
          row[metric] = grid[h][si]
        rows.append(row)
  return rows
