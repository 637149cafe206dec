"""A training loop vectorized over (hyper-parameter value, seed) with ``jax.vmap``.

One compiled program trains every grid value and every seed of a method at
once: the optimizer is built *inside* the vmapped function from the traced
hyper-parameter, so a grid of 4 values x 5 seeds is one batched run of 20
models. When an optimizer factory needs a concrete hyper-parameter (it checks
its value in Python), the loop falls back to one vmapped run over seeds per
grid value -- same results, more compiles.

Steps run in ``lax.scan`` chunks so a tqdm bar can report progress.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import dualopt_jax as dj

TxFactory = Callable[[Any], optax.GradientTransformation]

_CONCRETE_ERRORS = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerArrayConversionError,
  jax.errors.TracerIntegerConversionError,
  TypeError,  # e.g. a factory hashing its (traced) hyper-parameter
)


@dataclasses.dataclass(frozen=True)
class Task:
  """What to train: a loss, a batch sampler and the data both read.

  ``loss_fn(params, batch) -> scalar``; ``sample(key, data) -> batch`` (pure
  JAX, runs inside the scan); ``data`` is a pytree of arrays passed to the
  compiled program as an argument (not baked in as a constant);
  ``group_of(path) -> str`` names the layer a parameter belongs to for the
  drift trace.
  """

  loss_fn: Callable[[Any, Any], jax.Array]
  sample: Callable[[jax.Array, Any], Any]
  data: Any
  group_of: Callable[[tuple], str]


@dataclasses.dataclass
class GridRun:
  params: Any  # leaves of shape (H, S, ...)
  drift: np.ndarray  # (H, S, steps, G): ||theta_g - theta0_g|| / ||theta0_g|| after each step
  groups: list[str]
  seconds: float
  vectorized: bool  # True when the grid axis was vmapped too (one compile)
  final_loss: np.ndarray  # (H, S) mean training loss over the last chunk


def path_keys(key_path: Any) -> tuple:
  """A ``jax.tree_util`` key path as a tuple of keys: ``('backbone', 'Conv_0', 'bias')``."""
  return tuple(jax.tree_util.keystr(tuple(key_path), simple=True, separator="/").split("/"))


def drift_groups(
  params: Any, group_of: Callable[[tuple], str]
) -> tuple[list[str], list[list[int]]]:
  """Group names input to output (by depth), and per group its leaves' indices in jax.tree order."""
  flat_depths, _ = jax.tree_util.tree_flatten_with_path(dj.layer_depths(params))
  depths = {path_keys(kp): float(np.min(d)) for kp, d in flat_depths}
  flat_paths = [path_keys(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  first: dict[str, tuple[float, str]] = {}
  for p in flat_paths:
    g = group_of(p)
    first[g] = min(first.get(g, (np.inf, "")), (depths[p], "/".join(map(str, p))))
  names = sorted(first, key=lambda g: first[g])
  members = [[i for i, p in enumerate(flat_paths) if group_of(p) == g] for g in names]
  return names, members


def _drift_fn(members: list[list[int]]) -> Callable[[Any, Any], jax.Array]:
  def drift(params: Any, anchor: Any) -> jax.Array:
    p = jax.tree.leaves(params)
    a = jax.tree.leaves(anchor)
    out = []
    for idx in members:
      num = sum(jnp.sum(jnp.square(p[i] - a[i])) for i in idx)
      den = sum(jnp.sum(jnp.square(a[i])) for i in idx)
      out.append(jnp.sqrt(num) / jnp.maximum(jnp.sqrt(den), 1e-12))
    return jnp.stack(out)

  return drift


def stack_trees(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _repeat(tree: Any, h: int) -> Any:
  """(S, ...) -> (H*S, ...): every grid value gets every seed."""
  return jax.tree.map(lambda x: jnp.tile(x, (h,) + (1,) * (x.ndim - 1)), tree)


def train_grid(
  task: Task,
  make_tx: TxFactory,
  hps: Sequence[float],
  params0: Any,
  seed_keys: jax.Array,
  *,
  steps: int,
  chunk: int = 50,
  desc: str = "",
  progress: bool = True,
  vectorize_grid: bool = True,
  template: Any = None,
) -> GridRun:
  """Trains ``len(hps) x S`` models for ``steps`` steps each.

  Args:
    task: loss, sampler, data, layer grouping.
    make_tx: hyper-parameter -> optimizer (called inside ``vmap``; the value
      may be a tracer).
    hps: the grid (H values).
    params0: initial parameters with a leading seed axis (S, ...); also the
      reference for the drift trace.
    seed_keys: (S, 2) uint32 keys for batch order.
    steps: the step budget (the same for every method).
    chunk: steps per compiled call (progress granularity).
    template: one model's parameters (e.g. ``model.init(...)['params']``),
      for the drift groups.

  Returns:
    A :class:`GridRun`.
  """
  start = time.perf_counter()
  hps_arr = np.asarray(hps, np.float32)
  h, s = len(hps_arr), int(seed_keys.shape[0])
  one = template if template is not None else jax.tree.map(lambda x: x[0], params0)
  groups, members = drift_groups(one, task.group_of)
  drift = _drift_fn(members)
  chunk = max(1, min(chunk, steps))

  def run_chunk(hp, params, opt_state, key, anchor, data, first_step, n):
    tx = make_tx(hp)

    def step(carry, i):
      params, opt_state = carry
      batch = task.sample(jax.random.fold_in(key, first_step + i), data)
      loss, grads = jax.value_and_grad(task.loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (drift(params, anchor), loss)

    (params, opt_state), (d, losses) = jax.lax.scan(step, (params, opt_state), jnp.arange(n))
    return params, opt_state, d, jnp.mean(losses)

  def compiled(n: int):
    fn = jax.vmap(run_chunk, in_axes=(0, 0, 0, 0, 0, None, None, None))
    return jax.jit(fn, static_argnums=(7,))

  chunk_fn = compiled(chunk)
  init_fn = jax.jit(jax.vmap(lambda hp, p: make_tx(hp).init(p)))

  def run(hp_vec, params, keys, bar):
    opt_state = init_fn(hp_vec, params)
    anchor = params
    drifts, done, loss = [], 0, None
    while done < steps:
      n = min(chunk, steps - done)
      fn = chunk_fn if n == chunk else compiled(n)
      params, opt_state, d, loss = fn(hp_vec, params, opt_state, keys, anchor, task.data, done, n)
      drifts.append(np.asarray(d))
      done += n
      if bar is not None:
        bar.update(n)
    return params, np.concatenate(drifts, axis=1), np.asarray(loss)

  vectorized = vectorize_grid
  bar = tqdm(total=steps * (1 if vectorize_grid else h), desc=desc, leave=False,
             disable=not progress, unit="step")
  try:
    if vectorize_grid:
      try:
        params, d, loss = run(jnp.repeat(jnp.asarray(hps_arr), s), _repeat(params0, h),
                              jnp.tile(seed_keys, (h, 1)), bar)
      except _CONCRETE_ERRORS:
        vectorized = False
        bar.reset(total=steps * h)
    if not vectorized:
      chunk_fn = None
      outs = []
      for value in hps_arr:
        hp_value = float(value)
        make_concrete = (lambda v: lambda _hp: make_tx(v))(hp_value)
        sub = train_grid(task, make_concrete, [hp_value], params0, seed_keys, steps=steps,
                         chunk=chunk, progress=False, vectorize_grid=True, template=template)
        outs.append(sub)
        bar.update(steps)
      params = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[o.params for o in outs])
      d = np.concatenate([o.drift for o in outs])
      loss = np.concatenate([o.final_loss for o in outs])
      return GridRun(params, d, groups, time.perf_counter() - start, False, loss)
  finally:
    bar.close()
  params = jax.tree.map(lambda x: x.reshape((h, s) + x.shape[1:]), params)
  return GridRun(params, d.reshape((h, s) + d.shape[1:]), groups,
                 time.perf_counter() - start, True, loss.reshape(h, s))


def evaluate(fn: Callable[..., dict], params: Any, *args: Any) -> dict[str, np.ndarray]:
  """Applies ``fn(params, *args) -> dict of scalars`` over the leading (H, S) axes."""
  lead = jax.tree.leaves(params)[0].shape[:2]
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), params)
  out = jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * len(args)))(flat, *args)
  return {k: np.asarray(v).reshape(lead) for k, v in out.items()}
