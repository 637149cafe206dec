"""Contexts for the optimizer contract: the ways users wrap one model's parameters and optimizer.

Depths are a pure function of the parameter tree's paths and shapes, computed at ``init`` and kept
in the optimizer state; every update reads them plus the transformation's current numbers. So every
wrapping of the same parameters must give the same results. This module holds what the contract
test runs (``tests/test_contract.py``; other modules may reuse it):

* the model: a small NNX CNN named as Flax's NNX MNIST example (``conv1``, ``conv2``,
  ``linear1``) plus a new ``head``, built once per process; its params as a plain nested dict
  whose dicts are in *reversed* insertion order, so nothing can pass through key order;
* fixed, non-zero gradients (deterministic random trees, one per step and path);
* :class:`Case`: one optimizer under test (a factory function and its keyword arguments);
* the reference run: ``tx.init`` eagerly on the plain dict, then ``STEPS`` jitted
  ``update`` + ``apply_updates`` steps;
* the contexts: functions ``context(case)`` that run the case in one wrapping and assert that
  it ends where the reference does -- parameters, the (inner) optimizer state, and the
  :func:`dualopt_jax.describe` rows (depths and per-step strengths) where the state holds them.
  :data:`CONTEXTS` lists them; :class:`FreshProcess` is the one that restores an Orbax
  checkpoint in a fresh process (one subprocess for all cases).

Comparisons are exact where the same compiled arithmetic runs on the same numbers, and
``assert_allclose(rtol=1e-6, atol=1e-7)`` (float32) where the program differs (another wrapper,
eager NNX updates, another summation order under sharding).

The last part holds the models and contexts other test modules share (no test module imports
another): the ecosystem matrix :func:`check_context` over :data:`ECOSYSTEM_CONTEXTS` (the
peer-method tests: projection, fix_norm, L2-SP, lr decay, SPD), the ViT-shaped Linen model
(drift, lr decay), the three-block params tree (describe, drift) and the 8-device MLP (data
parallel, sharding).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import dualopt_jax as dj
from dualopt_jax import _paths
from dualopt_jax._sharding import init_sharded

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
RTOL, ATOL = 1e-6, 1e-7
BF16_RTOL = 5e-2
HEAD = "head"

# --- the model, its params and the gradients ------------------------------------------------------


class Net(nnx.Module):
  """Flax's NNX MNIST example CNN (channels shrunk), with the classifier named ``head``."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(2 * 2 * 8, 16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.conv1(x)))
    x = pool(nnx.relu(self.conv2(x)))
    x = nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))
    return self.head(x)


@functools.cache
def model() -> Net:
  """The model, built once per process. Contexts that change it work on ``nnx.clone``."""
  return Net(rngs=nnx.Rngs(0))


def reversed_order(tree: Any) -> Any:
  """``tree`` with every dict's keys in reversed insertion order."""
  if isinstance(tree, Mapping):
    return {k: reversed_order(tree[k]) for k in reversed(list(tree))}
  return tree


def _dict_orders(tree: Any) -> list[list[Any]]:
  if not isinstance(tree, Mapping):
    return []
  return [list(tree), *(o for v in tree.values() for o in _dict_orders(v))]


def is_sorted(tree: Any) -> bool:
  """Whether every dict of ``tree`` iterates in sorted key order."""
  return all(keys == sorted(keys) for keys in _dict_orders(tree))


def is_reversed(tree: Any) -> bool:
  """Whether every dict of ``tree`` with more than one key iterates in reversed sorted order."""
  return all(keys == sorted(keys, reverse=True) for keys in _dict_orders(tree) if len(keys) > 1)


@functools.cache
def _params() -> dict[str, Any]:
  out = reversed_order(nnx.to_pure_dict(nnx.state(model(), nnx.Param)))
  assert is_reversed(out) and not is_sorted(out), "the params must not be in sorted key order"
  return out


def params() -> dict[str, Any]:
  """The model's params: nested dicts of arrays, every dict in reversed insertion order."""
  return _params()


def _path_key(path: Sequence[Any]) -> str:
  return "/".join(str(k) for k in _normalized(path))


@functools.cache
def _grads() -> tuple[Any, ...]:
  def leaf(step: int, path: Any, x: jax.Array) -> jax.Array:
    rng = np.random.default_rng([zlib.crc32(_path_key(path).encode()), step])
    return jnp.asarray(rng.normal(size=x.shape), x.dtype)

  return tuple(
    jax.tree_util.tree_map_with_path(functools.partial(leaf, step), params())
    for step in range(2 * STEPS)
  )


def grads(n: int = STEPS) -> tuple[Any, ...]:
  """``n`` gradient trees (``n <= 2 * STEPS``): fixed, non-zero, a function of path and step."""
  return _grads()[:n]


def param_state(tree: Any) -> nnx.State:
  """``tree`` (a pure dict over the params) as ``nnx.State`` of ``nnx.Param`` (as nnx.grad)."""
  state = nnx.state(nnx.clone(model()), nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
  return state


# --- the optimizers under test --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One optimizer under test: ``factory(**kwargs)``.

  Attributes:
    name: the test id.
    factory: a function of keyword arguments returning the transformation; numeric arguments
      can be injected with ``optax.inject_hyperparams(factory, static_args)``.
    kwargs: the arguments of the transformation under test.
    change: injected hyper-parameters and the values they are set to after the first step
      (``None``: nothing can be injected).
    static_args: ``static_args`` of ``optax.inject_hyperparams``.
    without_head: the keyword arguments that make ``factory`` exclude the head (``head=`` or
      ``mask=``), as ``optax.partition`` does when it sends the head to ``set_to_zero``
      (``{}``: ``kwargs`` already do); ``None`` where the factory has no such setting.
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: Mapping[str, Any]
  change: Mapping[str, Any] | None = None
  static_args: tuple[str, ...] = ()
  without_head: Mapping[str, Any] | None = None

  def make(self, **overrides: Any) -> optax.GradientTransformation:
    return self.factory(**{**self.kwargs, **overrides})

  def __str__(self) -> str:
    return self.name


@dataclasses.dataclass
class Run:
  """Where a run ends (params, state) and the state it started from."""

  params: Any
  state: Any
  init_state: Any


def train_step(tx: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  """``(params, state, grads) -> (params, state)``: ``update`` + ``apply_updates`` (not jitted)."""

  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


_TX: dict[str, optax.GradientTransformation] = {}
_STEP: dict[str, Callable[..., Any]] = {}
_REFERENCE: dict[str, Run] = {}


def tx_of(case: Case, variant: str = "", **overrides: Any) -> optax.GradientTransformation:
  """One transformation object per case (and variant), so its jitted step is compiled once."""
  key = f"{case.name}|{variant}"
  if key not in _TX:
    _TX[key] = case.make(**overrides)
  return _TX[key]


def step_of(case: Case, variant: str = "", **overrides: Any) -> Callable[..., Any]:
  """The jitted step of :func:`tx_of`, shared by every context that runs that transformation."""
  key = f"{case.name}|{variant}"
  if key not in _STEP:
    _STEP[key] = jax.jit(train_step(tx_of(case, variant, **overrides)))
  return _STEP[key]


def run_steps(step: Callable[..., Any], params: Any, state: Any, grad_trees: Sequence[Any]):
  for g in grad_trees:
    params, state = step(params, state, g)
  return params, state


def reference(case: Case, variant: str = "", **overrides: Any) -> Run:
  """``tx.init`` eagerly on the plain (reversed-order) dict, then ``STEPS`` jitted steps."""
  key = f"{case.name}|{variant}"
  if key not in _REFERENCE:
    tx = tx_of(case, variant, **overrides)
    state0 = tx.init(params())
    p, s = run_steps(step_of(case, variant, **overrides), params(), state0, grads())
    _REFERENCE[key] = Run(p, s, state0)
  return _REFERENCE[key]


def reference_without_head(case: Case) -> Run:
  """The reference run of the case with the head excluded (its own run if it already is)."""
  assert case.without_head is not None
  if not case.without_head:
    return reference(case)
  return reference(case, "without_head", **case.without_head)


# --- comparisons ----------------------------------------------------------------------------------

_VALUE_KEYS = ("value", "raw_value")


def _normalized(path: Sequence[Any]) -> tuple[Any, ...]:
  """A key path as plain keys; NNX ``Variable`` value steps dropped (``State``, opt_state)."""
  out = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      if key.name not in _VALUE_KEYS:
        out.append(key.name)
    elif isinstance(key, jax.tree_util.DictKey):
      out.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      out.append(key.idx)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      out.append(key.key)
    else:
      out.append(str(key))
  return tuple(out)


def flat(tree: Any) -> dict[tuple[Any, ...], Any]:
  """Leaves by normalized path (any wrapping: dicts, ``nnx.State``, Variables, NamedTuples)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {_normalized(p): x for p, x in leaves}
  assert len(out) == len(leaves), "two leaves share a normalized path"
  return out


def _show(path: tuple[Any, ...]) -> str:
  return "/".join(map(str, path)) or "<root>"


def assert_same_tree(got: Any, want: Any, *, exact: bool, what: str = "params",
                     rtol: float = RTOL, atol: float = ATOL) -> None:
  """Same paths, dtypes and values (bit for bit with ``exact``)."""
  g, w = flat(got), flat(want)
  assert sorted(map(_show, g)) == sorted(map(_show, w)), f"{what}: the paths differ"
  for path, want_leaf in w.items():
    a, b = np.asarray(g[path]), np.asarray(want_leaf)
    msg = f"{what} at {_show(path)}"
    assert a.dtype == b.dtype, f"{msg}: dtype {a.dtype} != {b.dtype}"
    if exact:
      np.testing.assert_array_equal(a, b, err_msg=msg)
    else:
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=msg)


def assert_same_params(got: Any, want: Any, *, exact: bool, only: Sequence[str] | None = None,
                       **tol: float) -> None:
  g, w = flat(got), flat(want)
  if only is not None:
    g = {p: x for p, x in g.items() if p[0] in only}
    w = {p: x for p, x in w.items() if p[0] in only}
  assert_same_tree(g, w, exact=exact, **tol)


def describe_rows(state: Any, tree: Any = None) -> list[dict[str, Any]] | None:
  """``dj.describe`` rows of ``state`` (``None`` where the state holds no depths/strengths)."""
  try:
    return list(dj.describe(params() if tree is None else tree, state))
  except ValueError as e:
    if "holds no" in str(e):
      return None
    raise


def assert_same_rows(state: Any, want_state: Any, *, tree: Any = None) -> None:
  """The ``describe`` rows (depth, multiplier, per-step strengths) of two states agree."""
  assert_rows_equal(describe_rows(state, tree), describe_rows(want_state))


def assert_rows_equal(got: Any, want: Any, *, exact: bool = False) -> None:
  assert (got is None) == (want is None), "describe: one state holds strengths, the other not"
  if want is None:
    return
  assert [r["path"] for r in got] == [r["path"] for r in want], "describe: rows differ"
  for g, w in zip(got, want, strict=True):
    assert g.keys() == w.keys(), f"describe: columns differ at {w['path']}"
    for key, value in w.items():
      msg = f"describe: {key} of {w['path']}"
      if value is None or key in ("path", "shape"):
        assert g[key] == value, msg
      elif exact or key == "depth":  # depths are stored numbers: bit for bit everywhere
        np.testing.assert_array_equal(g[key], value, err_msg=msg)
      else:
        assert g[key] is not None, msg
        np.testing.assert_allclose(g[key], value, rtol=RTOL, atol=ATOL, err_msg=msg)


def _check_run(case: Case, p: Any, state: Any, *, exact: bool,
               inner: Callable[[Any], Any] | None = None, want: Run | None = None) -> None:
  """Params, the (inner) state and the describe rows equal ``want`` (default: the reference)."""
  want = reference(case) if want is None else want
  assert_same_params(p, want.params, exact=exact)
  assert_same_tree((inner or (lambda s: s))(state), want.state, exact=exact, what="state")
  assert_same_rows(state, want.state)


def _run_from(case: Case, tree: Any, *, exact: bool) -> None:
  """``tx.init(tree)`` (eager), then the case's shared jitted steps: equal to the reference."""
  tx = tx_of(case)
  state0 = tx.init(tree)
  assert_same_tree(state0, reference(case).init_state, exact=True, what="init state")
  p, s = run_steps(step_of(case), tree, state0, grads())
  _check_run(case, p, s, exact=exact)


# --- the contexts ---------------------------------------------------------------------------------


def sorted_copy(case: Case) -> None:
  """``jax.tree.map(lambda x: x, params)``: the same params, every dict sorted."""
  tree = jax.tree.map(lambda x: x, params())
  assert is_sorted(tree)
  _run_from(case, tree, exact=True)


@functools.cache
def _orbax_params() -> Any:
  import orbax.checkpoint as ocp

  directory = Path(tempfile.mkdtemp(prefix="contract_params_"))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory / "params", params())
      checkpointer.wait_until_finished()
      return checkpointer.restore(directory / "params")  # no target: keys come back sorted
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def orbax_params(case: Case) -> None:
  """Params saved with Orbax's StandardCheckpointer and restored without a target."""
  tree = _orbax_params()
  assert is_sorted(tree)
  _run_from(case, tree, exact=True)


@functools.cache
def _msgpack_params() -> Any:
  return flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(params()))


def msgpack(case: Case) -> None:
  """A ``flax.serialization`` msgpack round trip (NumPy leaves)."""
  _run_from(case, _msgpack_params(), exact=True)


def device_put(case: Case) -> None:
  """``jax.device_put`` of the params onto a device (committed arrays, as Orbax restores them)."""
  device = jax.devices()[0]
  tree = jax.device_put(params(), device)
  tx = tx_of(case)
  state0 = tx.init(tree)
  assert_same_tree(state0, reference(case).init_state, exact=True, what="init state")
  p, s = run_steps(step_of(case), tree, state0, grads())
  assert all(leaf.committed for leaf in jax.tree.leaves(tree))
  for leaf in jax.tree.leaves(p):
    assert leaf.devices() == {device}
  _check_run(case, p, s, exact=True)


def nnx_state(case: Case) -> None:
  """``tx.init(nnx.state(model, nnx.Param))`` (Variable-wrapped); pure arrays to ``update``."""
  wrapped = nnx.state(model(), nnx.Param)
  state0 = tx_of(case).init(wrapped)
  assert any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(
    state0, is_leaf=lambda x: isinstance(x, nnx.Variable))), "init saw no Variables"
  assert_same_tree(state0, reference(case).init_state, exact=True, what="init state")
  p, s = run_steps(
    step_of(case), nnx.as_pure(nnx.state(model(), nnx.Param)), nnx.as_pure(state0),
    [nnx.as_pure(param_state(g)) for g in grads()],
  )
  _check_run(case, nnx.to_pure_dict(p), s, exact=True)


def nnx_optimizer(case: Case) -> None:
  """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``optimizer.update(model, grads)`` (eager)."""
  net = nnx.clone(model())
  optimizer = nnx.Optimizer(net, case.make(), wrt=nnx.Param)
  assert_same_tree(optimizer.opt_state, reference(case).init_state, exact=True,
                   what="init state")
  for g in grads():
    optimizer.update(net, param_state(g))
  _check_run(case, nnx.to_pure_dict(nnx.state(net, nnx.Param)), optimizer.opt_state, exact=False)


def _labels(head_label: str) -> Any:
  return {k: jax.tree.map(lambda _, k=k: head_label if k == HEAD else "a", v)
          for k, v in params().items()}


def partition_all(case: Case) -> None:
  """``optax.partition({'a': tx}, labels)`` with every label ``'a'``."""
  tx = optax.partition({"a": case.make()}, _labels("a"))
  state0 = tx.init(params())
  p, s = run_steps(jax.jit(train_step(tx)), params(), state0, grads())
  _check_run(case, p, s, exact=True, inner=lambda s: s.inner_states["a"].inner_state)


def partition_head_zero(case: Case) -> None:
  """``optax.partition`` sending the head to ``optax.set_to_zero()``.

  The backbone equals the factory run with the head excluded (``head=``/``mask=``) where the
  factory has that setting; the head never moves.
  """
  tx = optax.partition({"a": case.make(), "frozen": optax.set_to_zero()}, _labels("frozen"))
  p, s = run_steps(jax.jit(train_step(tx)), params(), tx.init(params()), grads())
  assert_same_params(p, params(), exact=True, only=[HEAD])
  body = [k for k in params() if k != HEAD]
  if case.without_head is None:
    moved = [np.any(np.asarray(p[k]["kernel"]) != np.asarray(params()[k]["kernel"])) for k in body]
    assert all(moved), "partition: the backbone did not move"
    return
  want = reference_without_head(case)
  assert_same_params(p, want.params, exact=False, only=body)
  assert_same_rows(s, want.state)


def masked_all(case: Case) -> None:
  """``optax.masked(tx, mask)`` with an all-True mask."""
  tx = optax.masked(case.make(), jax.tree.map(lambda _: True, params()))
  p, s = run_steps(jax.jit(train_step(tx)), params(), tx.init(params()), grads())
  _check_run(case, p, s, exact=True, inner=lambda s: s.inner_state)


def jit_init(case: Case) -> None:
  """``jax.jit(tx.init)``: init sees a tree rebuilt in sorted order, traced.

  Not bit for bit: a norm computed at init (fix_norm's targets) is reduced in another order.
  """
  state0 = jax.jit(tx_of(case).init)(params())
  assert_same_tree(state0, reference(case).init_state, exact=False, what="init state")
  p, s = run_steps(step_of(case), params(), state0, grads())
  _check_run(case, p, s, exact=False)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _assert_same_types(got: Any, want: Any, what: str) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want), f"{what}: structure differs"
  for path, w in flat(want).items():
    g = flat(got)[path]
    assert (g.shape, g.dtype) == (np.shape(w), w.dtype), f"{what} at {_show(path)}"


def eval_shape(case: Case) -> None:
  """``jax.eval_shape(tx.init, params)``: the real state's structure, shapes and dtypes."""
  tx, real = tx_of(case), reference(case).init_state
  _assert_same_types(jax.eval_shape(tx.init, params()), real, "eval_shape(init, params)")
  _assert_same_types(jax.eval_shape(tx.init, _abstract(params())), real,
                     "eval_shape(init, ShapeDtypeStructs)")


def abstract_init(case: Case) -> None:
  """``tx.init`` on ``jax.ShapeDtypeStruct`` s (as Optax's sharding tests call it).

  It returns a state: the parts that do not depend on the param values (counts, depths,
  profile numbers, Adam's zeros) are concrete and equal the reference's; the rest are
  ``ShapeDtypeStruct`` s with the right shapes and dtypes.
  """
  state = tx_of(case).init(_abstract(params()))
  real = reference(case).init_state
  assert jax.tree.structure(state) == jax.tree.structure(real), "structure differs"
  concrete = 0
  for path, want in flat(real).items():
    got = flat(state)[path]
    assert (got.shape, got.dtype) == (want.shape, want.dtype), _show(path)
    if not isinstance(got, jax.ShapeDtypeStruct):
      concrete += 1
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=_show(path))
  assert concrete > 0, "nothing concrete in the state"
  assert_same_rows(state, real)


def inject_hyperparams(case: Case) -> None:
  """``optax.inject_hyperparams(factory)(**kwargs)``: same run; changing a value recompiles nothing.

  After the first step ``case.change`` is written into ``state.hyperparams``; steps 2-3 must
  equal the factory rebuilt with those values resuming from the state after step 1, in one
  compilation (counted traces).
  """
  if case.change is None:
    pytest.skip(f"{case.name}: no hyper-parameter to inject")
  tx = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.kwargs)
  for name in case.change:
    assert name in tx.init(params()).hyperparams, f"{name} is not injected"
  traces = []

  def body(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
    traces.append(1)
    return train_step(tx)(p, s, g)

  step = jax.jit(body)
  p, s = run_steps(step, params(), tx.init(params()), grads())
  _check_run(case, p, s, exact=True, inner=lambda s: s.inner_state)
  unchanged = p

  g = grads()
  p, s = step(params(), tx.init(params()), g[0])
  for name, value in case.change.items():
    s.hyperparams[name] = jnp.asarray(value, s.hyperparams[name].dtype)
  p, s = run_steps(step, p, s, g[1:])
  assert len(traces) == 1, f"{len(traces)} traces: changing an injected value recompiled"
  ref = reference(case)
  p1, s1 = step_of(case)(params(), ref.init_state, g[0])
  want_p, want_s = run_steps(
    step_of(case, "changed", **case.change), p1, s1, g[1:]
  )
  assert_same_params(p, want_p, exact=False)
  assert_same_tree(s.inner_state, want_s, exact=False, what="state")
  changed = flat(p)
  assert any(not np.array_equal(changed[k], v) for k, v in flat(unchanged).items()), (
    "the injected change had no effect")


def multi_steps(case: Case) -> None:
  """``optax.MultiSteps(tx, 2)``: the factory updated with the mean gradient every 2 micro-steps."""
  tx = optax.MultiSteps(case.make(), every_k_schedule=2)
  step = jax.jit(train_step(tx))
  micro = grads(2 * STEPS)
  p, s = params(), tx.init(params())
  for i, g in enumerate(micro):
    before = p
    p, s = step(p, s, g)
    if i % 2 == 0:
      assert_same_params(p, before, exact=True)  # accumulating: no move
  means = [jax.tree.map(lambda a, b: (a + b) / 2, micro[i], micro[i + 1])
           for i in range(0, len(micro), 2)]
  ref = reference(case)
  want_p, want_s = run_steps(step_of(case), params(), ref.init_state, means)
  _check_run(case, p, s, exact=False, inner=lambda s: s.inner_opt_state,
             want=Run(want_p, want_s, ref.init_state))


def _param_shaped(state: Any, tree: Any) -> list[tuple[tuple[Any, ...], Any, Any]]:
  """``(path, state leaf, param)`` for every state leaf with a param's shape whose path ends with
  that param's path."""
  by_path = flat(tree)
  out = []
  for path, leaf in flat(state).items():
    for start in range(len(path)):
      param = by_path.get(path[start:])
      if param is not None and np.shape(param) == np.shape(leaf):
        out.append((path, leaf, param))
        break
  return out


def _assert_sharded_like_params(state: Any, tree: Any, what: str) -> None:
  found = _param_shaped(state, tree)
  assert found, f"{what}: no param-shaped state leaf"
  for path, leaf, param in found:
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (
      f"{what}: {_show(path)} has {leaf.sharding}, its parameter {param.sharding}")


@functools.cache
def fsdp_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def fsdp(case: Case) -> None:
  """8-device FSDP: ``dj.fsdp_shardings`` params, ``dj.init_sharded`` state, jitted steps."""
  shardings = dj.fsdp_shardings(params(), fsdp_mesh(), "data")
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
  tree = jax.device_put(params(), shardings)
  state0 = dj.init_sharded(tx_of(case), tree)
  _assert_sharded_like_params(state0, tree, "init_sharded")
  # init_sharded runs init under jax.jit: norms taken at init are reduced in another order.
  assert_same_tree(state0, reference(case).init_state, exact=False, what="init state")
  grad_trees = [jax.device_put(g, shardings) for g in grads()]
  p, s = run_steps(step_of(case), tree, state0, grad_trees)
  _assert_sharded_like_params(s, p, f"after {STEPS} steps")
  for leaf, sharding in zip(jax.tree.leaves(p), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  _check_run(case, p, s, exact=False)


def donation(case: Case) -> None:
  """``jax.jit(step, donate_argnums=(0, 1))`` with warnings as errors: donated, same result."""
  tx = tx_of(case)
  step = jax.jit(train_step(tx), donate_argnums=(0, 1))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    p = jax.tree.map(jnp.copy, params())
    s = tx.init(p)
    for g in grads():
      # Every param-sized buffer is donated (scalars the step does not read may be pruned).
      donated = [*jax.tree.leaves(p), *(leaf for _, leaf, _ in _param_shaped(s, p))]
      p, s = step(p, s, g)
      assert all(x.is_deleted() for x in donated), "a param-sized buffer was not donated"
  _check_run(case, p, s, exact=True)


def bfloat16(case: Case) -> None:
  """bfloat16 params and grads: updates and params stay bfloat16, finite, near the f32 run."""
  tx = tx_of(case)

  @jax.jit
  def step(p: Any, s: Any, g: Any) -> tuple[Any, Any, Any]:
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, updates

  def bf16(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)

  p, s = bf16(params()), tx.init(bf16(params()))
  for g in grads():
    p, s, updates = step(p, s, bf16(g))
    for what, tree in (("updates", updates), ("params", p)):
      for path, leaf in flat(tree).items():
        assert leaf.dtype == jnp.bfloat16, f"{what} at {_show(path)} is {leaf.dtype}"
        assert bool(jnp.all(jnp.isfinite(leaf))), f"{what} at {_show(path)} is not finite"
  want = flat(reference(case).params)
  for path, leaf in flat(p).items():
    got, ref = np.asarray(leaf, np.float32), np.asarray(want[path], np.float32)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= BF16_RTOL, f"bf16 {_show(path)}: relative error {err:.3g}"
  assert_same_rows(s, reference(case).state)


def _typeof(tree: Any) -> dict[str, Any]:
  return {_show(p): jax.typeof(x) for p, x in flat(tree).items()}


def explicit_sharding_types(case: Case) -> None:
  """Optax's ``sharding_test``: under an Explicit-axis mesh, ``jax.typeof`` of the state is the
  same after ``init``, ``jax.jit(init)``, ``update`` and ``jax.jit(update)``."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = case.make()
  with jax.set_mesh(mesh):
    shardings = dj.fsdp_shardings(params(), mesh, "x")
    tree = jax.device_put(params(), shardings)
    g = jax.device_put(grads(1)[0], shardings)
    state0 = tx.init(tree)
    types0 = _typeof(state0)
    assert any(t.sharding.spec != jax.sharding.PartitionSpec() for t in types0.values())
    assert _typeof(jax.jit(tx.init)(tree)) == types0, "jax.jit(init) changed the state's types"
    _, state1 = tx.update(g, state0, tree)
    assert _typeof(state1) == types0, "update changed the state's types"
    _, state2 = jax.jit(tx.update)(g, state0, tree)
    assert _typeof(state2) == _typeof(state1), "jax.jit(update) changed the state's types"


CONTEXTS: dict[str, Callable[[Case], None]] = {
  "sorted_copy": sorted_copy,
  "orbax_params": orbax_params,
  "msgpack": msgpack,
  "device_put": device_put,
  "nnx_state": nnx_state,
  "nnx_optimizer": nnx_optimizer,
  "partition_all": partition_all,
  "partition_head_zero": partition_head_zero,
  "masked_all": masked_all,
  "jit_init": jit_init,
  "eval_shape": eval_shape,
  "abstract_init": abstract_init,
  "inject_hyperparams": inject_hyperparams,
  "multi_steps": multi_steps,
  "fsdp": fsdp,
  "donation": donation,
  "bfloat16": bfloat16,
  "explicit_sharding_types": explicit_sharding_types,
}

# --- an Orbax checkpoint restored in a fresh process ----------------------------------------------


def load_cases(source: str) -> Sequence[Case]:
  """The cases at ``source``, ``'module:attribute'`` (e.g. ``'tests.test_contract:CASES'``)."""
  module, _, attr = source.partition(":")
  return getattr(importlib.import_module(module), attr)


def save_after_first_step(cases: Sequence[Case], directory: Path) -> None:
  """Orbax checkpoints ``directory/<case>`` of ``{'params', 'state'}`` after the first step."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    for case in cases:
      p, s = step_of(case)(params(), reference(case).init_state, grads(1)[0])
      checkpointer.save(directory / case.name, {"params": p, "state": s})
    checkpointer.wait_until_finished()


def restore_and_finish(cases: Sequence[Case], directory: Path) -> dict[str, dict[str, Any]]:
  """What the fresh process does: restore into ``dj.abstract_state``, run steps 2..STEPS."""
  import orbax.checkpoint as ocp

  out: dict[str, dict[str, Any]] = {}
  with ocp.StandardCheckpointer() as checkpointer:
    for case in cases:
      try:
        tx = case.make()
        target = {"params": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params()),
          "state": dj.abstract_state(tx, params())}
        restored = checkpointer.restore(directory / case.name, target)
        p, s = run_steps(jax.jit(train_step(tx)), restored["params"], restored["state"],
                         grads()[1:])
        out[case.name] = {"params": {_show(k): np.asarray(v) for k, v in flat(p).items()},
                          "rows": describe_rows(s)}
      except Exception as e:  # noqa: BLE001 -- reported per case by the parent process
        out[case.name] = {"error": f"{type(e).__name__}: {e}"}
  return out


class FreshProcess:
  """The context "Orbax save after step 1, restore in a fresh process, steps 2..STEPS there".

  Every case at ``source`` (``'module:attribute'``) is saved here; one subprocess
  (``tests/_contract_worker.py``) restores them all into ``dj.abstract_state(tx, params)`` and
  finishes the run. Each case must equal the in-process run bit for bit, describe rows too.
  :meth:`start` launches the subprocess early (it then compiles beside this process);
  calling the context starts it if needed and waits.
  """

  def __init__(self, source: str, *, timeout: float = 600):
    self.source, self.timeout = source, timeout
    self.results: dict[str, dict[str, Any]] = {}
    self._proc: subprocess.Popen | None = None
    self._dir: Path | None = None

  def start(self) -> None:
    if self._proc is not None or self.results:
      return
    self._dir = Path(tempfile.mkdtemp(prefix="contract_ckpt_"))
    save_after_first_step(load_cases(self.source), self._dir)
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "tests._contract_worker", self.source, str(self._dir),
       str(self._dir / "results.pkl")],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )

  def _wait(self) -> None:
    self.start()
    assert self._proc is not None and self._dir is not None
    try:
      output, _ = self._proc.communicate(timeout=self.timeout)
      assert self._proc.returncode == 0, f"worker failed:\n{output}"
      self.results.update(pickle.loads((self._dir / "results.pkl").read_bytes()))
    finally:
      self.close()

  def close(self) -> None:
    if self._proc is not None and self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()
    self._proc = None
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
      self._dir = None

  def __call__(self, case: Case) -> None:
    if not self.results:
      self._wait()
    got = self.results[case.name]
    if "error" in got:
      raise AssertionError(f"fresh process: {got['error']}")
    want = reference(case)
    assert_same_tree(got["params"], {_show(k): v for k, v in flat(want.params).items()},
                     exact=True)
    assert_rows_equal(got["rows"], describe_rows(want.state), exact=True)


# --- shared by other test modules: the ecosystem matrix -------------------------------------------
# check_context runs one transformation in each of ECOSYSTEM_CONTEXTS and compares it with a plain
# run (tests/test_projection.py, test_fixnorm.py, test_l2sp.py, test_lr_decay.py, test_spd.py).

ECOSYSTEM_CONTEXTS = (
  "inject_hyperparams", "multisteps", "masked", "nnx", "trainstate", "bf16", "sharded"
)


def model_params(dtype: Any = jnp.float32) -> dict[str, Any]:
  """A small transformer-shaped tree in definition order (embed, 2 blocks, head)."""
  rng = np.random.default_rng(0)
  shapes = {
    "embed": {"embedding": (8, 4)},
    "layers_0": {"kernel": (4, 8), "bias": (8,)},
    "layers_1": {"kernel": (8, 8), "bias": (8,)},
    "head": {"kernel": (8, 8), "bias": (8,)},
  }
  return {
    mod: {k: jnp.asarray(rng.normal(size=s) * 0.5, dtype) for k, s in leaves.items()}
    for mod, leaves in shapes.items()
  }


def grads_at(step: int, params: Any) -> Any:
  """Deterministic gradients that depend on the params (so gates open and close)."""
  sign = 1.0 if step % 3 else -1.0
  return jax.tree.map(
    lambda p: (sign * jnp.sin(3.0 * p.astype(jnp.float32) + step) + 0.05 * step).astype(p.dtype),
    params,
  )


def run_plain(tx: optax.GradientTransformation, params: Any, steps: int = 4) -> tuple[Any, Any]:
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, grads_at(i, params))
  return params, state


def _close(a: Any, b: Any, **tol: float) -> None:
  for (path, x), (_, y) in zip(
    _paths.leaves_with_paths(a), _paths.leaves_with_paths(b), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=_paths.path_str(path), **tol
    )


class _Holder(nnx.Module):
  def __init__(self, tree: dict[str, Any]):
    for key, value in tree.items():
      setattr(self, key, _Holder(value) if isinstance(value, dict) else nnx.Param(value))


def _shard_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
  for axis, size in enumerate(shape):
    if size % n == 0:
      return PartitionSpec(*([None] * axis), "d")
  return PartitionSpec()


def check_context(
  context: str,
  factory: Callable[..., optax.GradientTransformation],
  hyper: dict[str, Any],
  *,
  static: dict[str, Any] | None = None,
  wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation] = (
    lambda t: optax.chain(optax.adam(1e-2), t)
  ),
  params: Any = None,
) -> None:
  """Runs ``wrap(factory(**hyper, **static))`` in ``context`` and compares with a plain run."""
  static = static or {}
  params = model_params() if params is None else params
  make = lambda: wrap(factory(**hyper, **static))
  want, _ = run_plain(make(), params)
  if context == "inject_hyperparams":
    injected = optax.inject_hyperparams(factory, static_args=tuple(static))(**hyper, **static)
    got, state = run_plain(wrap(injected), params)
    _close(got, want, rtol=1e-6, atol=1e-6)
  elif context == "multisteps":
    tx = optax.MultiSteps(make(), every_k_schedule=2)
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for i in range(8):  # 4 outer steps, each the mean of the gradients at 2i and 2i+1
      updates, state = step(grads_at(2 * (i // 2) + i % 2, p), state, p)
      p = optax.apply_updates(p, updates)
    plain, s = make(), None
    s, q = plain.init(params), params
    for i in range(4):
      g = jax.tree.map(lambda a, b: (a + b) / 2, grads_at(2 * i, q), grads_at(2 * i + 1, q))
      updates, s = jax.jit(plain.update)(g, s, q)
      q = optax.apply_updates(q, updates)
    _close(p, q, rtol=2e-5, atol=2e-6)
  elif context == "masked":
    is_body = lambda tree: _paths.map_with_path(lambda path, _x: path[0] != "head", tree)
    got, _ = run_plain(wrap(optax.masked(factory(**hyper, **static), is_body)), params)
    bare, _ = run_plain(wrap(optax.masked(optax.identity(), is_body)), params)
    _close(got["head"], bare["head"], rtol=1e-6, atol=1e-7)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
  elif context == "nnx":
    model = _Holder(params)
    opt = nnx.Optimizer(model, make(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, grads):
      opt.update(model, grads)

    for i in range(4):
      current = nnx.state(model, nnx.Param)
      grads = grads_at(i, nnx.to_pure_dict(current))
      grad_state = nnx.state(model, nnx.Param)
      nnx.replace_by_pure_dict(grad_state, grads)
      step(model, opt, grad_state)
    _close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), want, rtol=1e-5, atol=1e-6)
  elif context == "trainstate":
    ts = train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=make())
    apply = jax.jit(lambda ts, g: ts.apply_gradients(grads=g))
    for i in range(4):
      ts = apply(ts, grads_at(i, ts.params))
    _close(ts.params, want, rtol=1e-6, atol=1e-6)
  elif context == "bf16":
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    got, _ = run_plain(make(), bf)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    _close(got, want, rtol=0.1, atol=0.05)
  elif context == "sharded":
    n = jax.device_count()
    assert n == 8, "tests/conftest.py sets 8 CPU devices"
    mesh = jax.make_mesh((n,), ("d",))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, _shard_spec(x.shape, n)), params)
    sp = jax.device_put(params, shardings)
    tx = make()
    state = init_sharded(tx, sp)
    by_shape = {tuple(x.shape): s for x, s in zip(
      jax.tree.leaves(sp), jax.tree.leaves(shardings), strict=True)}
    sharded_leaves = 0
    for leaf in jax.tree.leaves(state):
      if tuple(leaf.shape) in by_shape and leaf.ndim >= 1:
        assert leaf.sharding.is_equivalent_to(by_shape[tuple(leaf.shape)], leaf.ndim)
        sharded_leaves += 1
    assert sharded_leaves >= len(jax.tree.leaves(params))  # at least Adam's moments
    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
      *tx.update(g, s, p)))
    for i in range(4):
      sp, state = step(sp, state, grads_at(i, sp))
    for leaf, sh in zip(jax.tree.leaves(sp), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    _close(sp, want, rtol=1e-5, atol=1e-6)
  else:  # pragma: no cover
    raise AssertionError(context)


# --- shared by other test modules: a ViT-shaped Linen model (test_drift, test_lr_decay) ----------


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(4)(nn.LayerNorm()(x))


class ViT(nn.Module):
  """``patch_embed``, ``pos_embed`` (if asked for), ``Block_0`` .. ``Block_{n-1}``, ``norm``,
  ``head``."""

  num_blocks: int
  pos_embed: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="patch_embed")(x)
    if self.pos_embed:
      x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, 4))
    for i in range(self.num_blocks):
      x = Block(name=f"Block_{i}")(x)
    x = nn.LayerNorm(name="norm")(x)
    return nn.Dense(3, name="head")(x)


# --- shared by other test modules: three numbered blocks and a head (test_describe, test_drift) --

PEAK = 1e-2
DEPTH = {"Dense_0": 0.0, "Dense_1": 0.5, "Dense_2": 1.0}  # three numbered blocks; head excluded


def make_params():
  """Three numbered blocks and a head; biases non-zero so that decay acts on every leaf."""
  shapes = {"Dense_0": (3, 4), "Dense_1": (4, 4), "Dense_2": (4, 4), "head": (4, 2)}
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {
    name: {"kernel": jax.random.normal(k, shape), "bias": jnp.linspace(0.5, 1.0, shape[1])}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


def schedule(count):
  return optax.warmup_cosine_decay_schedule(2e-3, PEAK, 3, 8, 1e-3)(count)


# --- shared by other test modules: an MLP on 8 devices (test_data_parallel, test_sharding) --------

N_DEV = 8


class MLP(nn.Module):
  """Every dimension divisible by 8, so every tensor can be split over 8 devices."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(32)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(8)(x)


def mlp_loss(params, x, y):
  logits = MLP().apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def data_mesh(axis_type=AxisType.Auto):
  """The 8-device mesh with one axis, ``"data"``."""
  assert jax.device_count() == N_DEV, "tests/conftest.py must give 8 CPU devices"
  return jax.make_mesh((N_DEV,), ("data",), axis_types=(axis_type,))
