"""Parameters in the order the model's forward pass first reads them.

Definition order (dict insertion) and ``jax.tree`` order (sorted keys) are
both guesses at "input side to output side". The forward pass itself knows:
:func:`forward_order` traces it with ``jax.make_jaxpr`` (abstract values only,
nothing is computed) and ranks every parameter by the first equation that
consumes it. Casts, reshapes, transposes and other pass-through ops do not
count as reads, so mixed-precision code that casts all params up front in
sorted order still gets the order of use. Stacked layers (``nn.scan``,
``nnx.vmap`` + ``nnx.scan``, ``stack[i]`` in a loop) get one rank per slice.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from dualopt_jax import _paths

__all__ = ["forward_order"]

Pos = tuple[int, ...]
Rows = Sequence[int]  # a ``range`` or a tuple of slice indices along the leaf's axis 0

# Ops whose outputs are their operands' values (output k is operand k): never reads.
_PASS_THROUGH = frozenset(
  {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "optimization_barrier",
    "stop_gradient",
    "device_put",
    "pvary",
    "pcast",
    "mesh_cast",
    "reshard",
  }
)
# Ops whose single sub-jaxpr takes the eqn's operands one to one and returns its outputs.
_CALLS = frozenset(
  {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "call",
    "remat2",
    "remat",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "xla_call",
  }
)
_SUB_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_MAX_CONST_SIZE = 4096  # index arithmetic is folded on the host only for arrays this small
_MAX_UNREAD_NAMED = 10


class _Slot:
  """Placeholder source for one ``scan`` xs operand: the slice of the current iteration."""

  __slots__ = ()


@dataclasses.dataclass(frozen=True)
class _Tag:
  """A value derived from parameter ``source`` through pass-through ops only.

  ``rows`` are the leaf's axis-0 slices it comes from; ``aligned`` says the
  value's own axis 0 still runs over exactly those slices (so indexing it
  selects slices).
  """

  source: Any  # leaf index (int) or _Slot
  rows: Rows
  aligned: bool


@dataclasses.dataclass(frozen=True, eq=False)
class _Const:
  """A small integer/bool value known while tracing (index arithmetic on literals)."""

  value: np.ndarray


# ----------------------------------------------------------------------------- read recording


class _Reads:
  """First read position of every parameter leaf (whole) and of its slices."""

  def __init__(self, lengths: Sequence[int]):
    self.lengths = list(lengths)
    self.whole: dict[int, Pos] = {}
    self.rows: dict[int, dict[int, Pos]] = {}
    self.stacked: set[int] = set()

  def record(self, source: Any, rows: Rows, pos: Pos) -> None:
    if not isinstance(source, int):
      return
    if _covers(rows, self.lengths[source]):
      if source not in self.whole or pos < self.whole[source]:
        self.whole[source] = pos
      return
    table = self.rows.setdefault(source, {})
    for row in rows:
      if row not in table or pos < table[row]:
        table[row] = pos

  def mark_stacked(self, source: Any, *, always: bool = False) -> None:
    if isinstance(source, int) and (always or self.lengths[source] > 1):
      self.stacked.add(source)

  def first(self, source: int, row: int | None = None) -> Pos | None:
    """First read of slice ``row`` (or of any part of the leaf when ``row`` is None)."""
    candidates = []
    if source in self.whole:
      candidates.append(self.whole[source])
    table = self.rows.get(source, {})
    if row is None:
      candidates.extend(table.values())
    elif row in table:
      candidates.append(table[row])
    return min(candidates) if candidates else None


class _ScanReads:
  """Reads inside a ``scan`` body: slot reads are expanded to every iteration's slice."""

  def __init__(self, parent: Any, slots: dict[_Slot, _Tag], depth: int, length: int, reverse: bool):
    self.parent = parent
    self.slots = slots
    self.depth = depth  # index of the iteration component in a position
    self.length = length
    self.reverse = reverse
    self.firsts: dict[_Slot, Pos] = {}

  def record(self, source: Any, rows: Rows, pos: Pos) -> None:
    if isinstance(source, _Slot) and source in self.slots:
      if source not in self.firsts or pos < self.firsts[source]:
        self.firsts[source] = pos
    else:
      self.parent.record(source, rows, pos)

  def mark_stacked(self, source: Any, *, always: bool = False) -> None:
    self.parent.mark_stacked(source, always=always)

  def flush(self) -> None:
    d = self.depth
    for slot, pos in self.firsts.items():
      outer = self.slots[slot]
      for j, row in enumerate(outer.rows):
        t = self.length - 1 - j if self.reverse else j
        self.parent.record(outer.source, (row,), (*pos[:d], t, *pos[d + 1 :]))


def _covers(rows: Rows, n: int) -> bool:
  if isinstance(rows, range):
    return rows == range(n)
  return len(set(rows)) == n


def _read_all(ins: Sequence[Any], here: Pos, rec: Any) -> None:
  for o, x in enumerate(ins):
    if isinstance(x, _Tag):
      rec.record(x.source, x.rows, (*here, o))


# ----------------------------------------------------------------------------- constants


def _is_index_dtype(dtype: Any) -> bool:
  try:
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_))
  except TypeError:  # extended dtypes (PRNG keys) numpy cannot interpret
    return False


def _small_const(value: Any) -> _Const | None:
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    value = np.asarray(value)
    dtype = value.dtype
  if not _is_index_dtype(dtype):
    return None
  if int(np.prod(np.shape(value))) > _MAX_CONST_SIZE:
    return None
  try:
    return _Const(np.asarray(value))
  except (TypeError, ValueError, jax.errors.JAXTypeError):  # not host-readable (a tracer)
    return None


_NUMPY_OPS = types.MappingProxyType({
  "add": np.add,
  "sub": np.subtract,
  "mul": np.multiply,
  "neg": np.negative,
  "max": np.maximum,
  "min": np.minimum,
  "abs": np.abs,
  "sign": np.sign,
  "rem": np.fmod,
  "lt": np.less,
  "le": np.less_equal,
  "gt": np.greater,
  "ge": np.greater_equal,
  "eq": np.equal,
  "ne": np.not_equal,
  "and": np.bitwise_and,
  "or": np.bitwise_or,
  "not": np.invert,
})


def _broadcast_in_dim(x: np.ndarray, *, shape: Sequence[int], broadcast_dimensions: Sequence[int],
                      **_: Any) -> np.ndarray:
  expanded = [1] * len(shape)
  for src, dst in enumerate(broadcast_dimensions):
    expanded[dst] = x.shape[src]
  return np.broadcast_to(x.reshape(expanded), tuple(shape))


def _eval_const(name: str, vals: list[np.ndarray], params: dict[str, Any]) -> np.ndarray | None:
  if name in _NUMPY_OPS:
    return _NUMPY_OPS[name](*vals)
  if name == "select_n":
    return np.choose(vals[0].astype(np.int32), vals[1:])
  if name == "clamp":
    return np.clip(vals[1], vals[0], vals[2])
  if name in ("convert_element_type", "copy", "copy_p", "stop_gradient"):
    return vals[0]
  if name == "broadcast_in_dim":
    return _broadcast_in_dim(vals[0], **params)
  if name == "reshape":
    return vals[0].reshape(tuple(params["new_sizes"]))
  if name == "squeeze":
    return np.squeeze(vals[0], axis=tuple(params["dimensions"]))
  if name == "concatenate":
    return np.concatenate(vals, axis=params["dimension"])
  return None


def _fold(eqn: Any, ins: list[Any]) -> list[Any]:
  """Evaluates small integer index arithmetic on known constants; unknown otherwise."""
  unknown = [None] * len(eqn.outvars)
  if len(eqn.outvars) != 1 or not ins or not all(isinstance(x, _Const) for x in ins):
    return unknown
  aval = eqn.outvars[0].aval
  dtype = getattr(aval, "dtype", None)
  if dtype is None or not _is_index_dtype(dtype):
    return unknown
  try:
    out = _eval_const(eqn.primitive.name, [x.value for x in ins], eqn.params)
    if out is None:
      return unknown
    out = np.asarray(out, dtype=dtype)
    if out.shape != tuple(aval.shape):
      return unknown
  except (ArithmeticError, TypeError, ValueError, IndexError):  # best effort; unknown is safe
    return unknown
  return [_small_const(out)]


def _scalar(x: Any) -> int | None:
  if isinstance(x, _Const) and x.value.size == 1:
    return int(x.value.reshape(()))
  return None


# ----------------------------------------------------------------------------- jaxpr walk


def _open(closed: Any) -> tuple[Any, list[Any]]:
  if isinstance(closed, jcore.ClosedJaxpr):
    return closed.jaxpr, list(closed.consts)
  return closed, []


def _value(env: dict[Any, Any], var: Any) -> Any:
  if isinstance(var, jcore.Literal):
    return _small_const(var.val)
  return env.get(var)


def _run(jaxpr: Any, consts: Sequence[Any], inputs: Sequence[Any], prefix: Pos, rec: Any) -> list:
  """Walks ``jaxpr`` with ``inputs`` (tags, constants or None); returns its outputs' values."""
  env: dict[Any, Any] = {}
  for var, const in zip(jaxpr.constvars, consts, strict=False):
    known = _small_const(const)
    if known is not None:
      env[var] = known
  for var, x in zip(jaxpr.invars, inputs, strict=False):
    if x is not None:
      env[var] = x
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [_value(env, v) for v in eqn.invars]
    outs = _eqn(eqn, ins, (*prefix, i), rec)
    for var, out in zip(eqn.outvars, outs, strict=False):
      if out is not None and not isinstance(var, jcore.DropVar):
        env[var] = out
  return [_value(env, v) for v in jaxpr.outvars]


def _eqn(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any]:
  name = eqn.primitive.name
  handler = _STRUCTURED.get(name) or (_call if name in _CALLS else None)
  if handler is None:
    if not any(isinstance(x, _Tag) for x in ins):
      return _fold(eqn, ins)
    handler = _TAG_OPS.get(name)
  outs = _try(handler, eqn, ins, here, rec)
  if outs is not None and len(outs) == len(eqn.outvars):
    return outs
  _read_all(ins, here, rec)  # an ordinary op (or one we cannot map): it reads its operands
  return [None] * len(eqn.outvars)


def _try(handler: Callable[..., list[Any] | None] | None, *args: Any) -> list[Any] | None:
  """A handler's outputs; None (the eqn reads its operands) for a form it does not know."""
  if handler is None:
    return None
  try:
    return handler(*args)
  except (KeyError, IndexError, TypeError, ValueError, AttributeError):
    return None  # an unfamiliar form of a known op (params from another JAX version)


def _shape(var: Any) -> tuple[int, ...]:
  return tuple(getattr(var.aval, "shape", ()))


def _index(tag: _Tag, rec: Any) -> _Tag:
  """``p[i]``: one slice selected and axis 0 removed -- the leaf is stacked."""
  rec.mark_stacked(tag.source)
  return _Tag(tag.source, tag.rows, aligned=False)


def _pass_through(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  if len(eqn.outvars) == len(ins):
    return list(ins)
  if len(eqn.outvars) == 1:
    return [ins[0]]
  return None


def _reshape(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag) or eqn.params.get("dimensions") is not None:
    return None
  old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  if x.aligned and old and old[0] == 1 and new == old[1:]:
    return [_index(x, rec)]
  aligned = x.aligned and bool(old) and bool(new) and new[0] == old[0]
  return [dataclasses.replace(x, aligned=aligned)]


def _squeeze(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag):
    return None
  dims = tuple(eqn.params["dimensions"])
  if 0 in dims and x.aligned:
    return [_index(x, rec)]
  return [dataclasses.replace(x, aligned=x.aligned and 0 not in dims)]


def _broadcast(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag):
    return None
  old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
  dims = tuple(eqn.params["broadcast_dimensions"])
  aligned = x.aligned and bool(old) and dims[0] == 0 and new[0] == old[0]
  return [dataclasses.replace(x, aligned=aligned)]


def _transpose(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  perm = tuple(eqn.params["permutation"])
  return [dataclasses.replace(x, aligned=x.aligned and bool(perm) and perm[0] == 0)]


def _select_rows(x: _Tag, rows: Rows, whole_rest: bool, here: Pos, rec: Any) -> list[Any]:
  """Axis-0 selection: a new tag if the other axes are whole, else a read of those slices."""
  if whole_rest:
    return [_Tag(x.source, rows, aligned=True)]
  rec.record(x.source, rows, (*here, 0))
  return [None]


def _slice(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag) or not x.aligned:
    return None
  shape = _shape(eqn.invars[0])
  start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params.get("strides") or (1,) * len(shape)
  rows = x.rows[start[0] : limit[0] : strides[0]]
  whole_rest = all(
    start[d] == 0 and limit[d] == shape[d] and strides[d] == 1 for d in range(1, len(shape))
  )
  return _select_rows(x, rows, whole_rest, here, rec)


def _dynamic_slice(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag) or not x.aligned or any(isinstance(i, _Tag) for i in ins[1:]):
    return None
  first = _scalar(ins[1]) if len(ins) > 1 else None
  if first is None:
    return None  # a traced index: the whole leaf is read here
  shape = _shape(eqn.invars[0])
  sizes = tuple(eqn.params["slice_sizes"])
  start = min(max(first, 0), shape[0] - sizes[0])
  whole_rest = all(sizes[d] == shape[d] for d in range(1, len(shape)))
  return _select_rows(x, x.rows[start : start + sizes[0]], whole_rest, here, rec)


def _gather(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x, indices = ins[0], ins[1]
  if not isinstance(x, _Tag) or not x.aligned or not isinstance(indices, _Const):
    return None
  dnums = eqn.params["dimension_numbers"]
  if tuple(dnums.start_index_map) != (0,) or tuple(getattr(dnums, "operand_batching_dims", ())):
    return None
  shape, out_ndim = _shape(eqn.invars[0]), len(_shape(eqn.outvars[0]))
  sizes = tuple(eqn.params["slice_sizes"])
  ind = indices.value
  if ind.ndim == 0 or ind.shape[-1] != 1:
    return None
  batch = ind.shape[:-1]
  starts = np.clip(ind[..., 0].reshape(-1), 0, shape[0] - sizes[0])
  whole_rest = sizes[1:] == shape[1:]
  offset_dims = tuple(dnums.offset_dims)
  collapsed = tuple(dnums.collapsed_slice_dims)
  if collapsed == (0,):
    rows = tuple(x.rows[int(s)] for s in starts)
    if whole_rest and batch == ():
      return [_index(_Tag(x.source, rows, aligned=True), rec)]
    if whole_rest and len(batch) == 1 and 0 not in offset_dims:
      return [_Tag(x.source, rows, aligned=True)]
    rec.record(x.source, rows, (*here, 0))
    return [None]
  if collapsed == () and batch == () and offset_dims == tuple(range(out_ndim)):
    start = int(starts[0])
    return _select_rows(x, x.rows[start : start + sizes[0]], whole_rest, here, rec)
  return None


def _split(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag) or not x.aligned or eqn.params.get("axis") != 0:
    return None
  outs, offset = [], 0
  for size in eqn.params["sizes"]:
    outs.append(_Tag(x.source, x.rows[offset : offset + size], aligned=True))
    offset += size
  return outs


def _unstack(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  x = ins[0]
  if not isinstance(x, _Tag) or not x.aligned or eqn.params.get("axis") != 0:
    return None
  return [_index(_Tag(x.source, x.rows[k : k + 1], aligned=True), rec) for k in range(len(x.rows))]


_TAG_OPS = types.MappingProxyType({
  **{name: _pass_through for name in _PASS_THROUGH},
  "reshape": _reshape,
  "squeeze": _squeeze,
  "broadcast_in_dim": _broadcast,
  "transpose": _transpose,
  "slice": _slice,
  "dynamic_slice": _dynamic_slice,
  "gather": _gather,
  "split": _split,
  "unstack": _unstack,
})


def _sub_jaxpr(eqn: Any) -> Any | None:
  for key in _SUB_JAXPR_KEYS:
    if key in eqn.params:
      return eqn.params[key]
  return None


def _call(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  closed = _sub_jaxpr(eqn)
  if closed is None:
    return None
  jaxpr, consts = _open(closed)
  if len(jaxpr.invars) != len(ins) or len(jaxpr.outvars) != len(eqn.outvars):
    return None
  return _run(jaxpr, consts, ins, here, rec)


def _axis0_split(spec: Any) -> bool:
  try:
    return len(spec) > 0 and spec[0] is not None
  except TypeError:
    return True  # an unknown spec format: assume the local value is a shard


def _shard_map(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  jaxpr, consts = _open(eqn.params["jaxpr"])
  in_specs = tuple(eqn.params.get("in_specs", ()))
  out_specs = tuple(eqn.params.get("out_specs", ()))
  if len(jaxpr.invars) != len(ins) or len(in_specs) != len(ins):
    return None
  local = []
  for x, spec in zip(ins, in_specs, strict=True):
    if isinstance(x, _Tag) and _axis0_split(spec):
      x = dataclasses.replace(x, aligned=False)
    elif isinstance(x, _Const) and _axis0_split(spec):
      x = None
    local.append(x)
  outs = _run(jaxpr, consts, local, here, rec)
  if len(out_specs) != len(outs):
    return [None] * len(eqn.outvars)
  merged = []
  for x, spec in zip(outs, out_specs, strict=True):
    if isinstance(x, _Tag):
      merged.append(dataclasses.replace(x, aligned=x.aligned and not _axis0_split(spec)))
    else:
      merged.append(None)
  return merged


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, _Const) and isinstance(b, _Const):
    return a.value.shape == b.value.shape and bool(np.all(a.value == b.value))
  return isinstance(a, _Tag) and a == b


def _cond(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  if isinstance(ins[0], _Tag):
    rec.record(ins[0].source, ins[0].rows, (*here, -1))  # the index is read before any branch
  results = []
  for branch in eqn.params["branches"]:
    jaxpr, consts = _open(branch)
    if len(jaxpr.invars) != len(ins) - 1:
      return None
    results.append(_run(jaxpr, consts, ins[1:], here, rec))
  first = results[0]
  return [x if all(_same(x, other[k]) for other in results[1:]) else None
          for k, x in enumerate(first)]


def _loop_carry(xs: Sequence[Any]) -> list[Any]:
  """Loop carries: a parameter enters at iteration 0; values change later, so no constants."""
  return [x if isinstance(x, _Tag) else None for x in xs]


def _while(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  params = eqn.params
  n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
  cond_jaxpr, cond_consts = _open(params["cond_jaxpr"])
  body_jaxpr, body_consts = _open(params["body_jaxpr"])
  carry = _loop_carry(ins[n_cond + n_body :])
  _run(cond_jaxpr, cond_consts, [*ins[:n_cond], *carry], (*here, 0, 0), rec)
  _run(body_jaxpr, body_consts, [*ins[n_cond : n_cond + n_body], *carry], (*here, 0, 1), rec)
  return [None] * len(eqn.outvars)


def _scan(eqn: Any, ins: list[Any], here: Pos, rec: Any) -> list[Any] | None:
  params = eqn.params
  n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
  jaxpr, consts = _open(params["jaxpr"])
  if len(jaxpr.invars) != len(ins):
    return None
  slots: dict[_Slot, _Tag] = {}
  body_in = [*ins[:n_consts], *_loop_carry(ins[n_consts : n_consts + n_carry])]
  for x in ins[n_consts + n_carry :]:
    if isinstance(x, _Tag) and x.aligned and len(x.rows) == length:
      slot = _Slot()
      slots[slot] = x
      rec.mark_stacked(x.source, always=True)
      body_in.append(_Tag(slot, (0,), aligned=False))
    elif isinstance(x, _Tag):
      body_in.append(dataclasses.replace(x, aligned=False))  # every iteration sees all its rows
    else:
      body_in.append(None)
  body_rec = _ScanReads(rec, slots, len(here), length, bool(params.get("reverse", False)))
  _run(jaxpr, consts, body_in, (*here, 0), body_rec)
  body_rec.flush()
  return [None] * len(eqn.outvars)


_STRUCTURED = types.MappingProxyType({
  "scan": _scan,
  "while": _while,
  "cond": _cond,
  "shard_map": _shard_map,
})


# ----------------------------------------------------------------------------- public API


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _describe_fn(fn: Any) -> str:
  name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
  return f"{name}(params, *args, **kwargs)"


def _bind(
  fn: Any, params: Any, args: tuple, kwargs: dict
) -> tuple[Callable[..., Any], Any, tuple, str]:
  """The function to trace as ``call(params, *args, **kwargs)``, its params and inputs."""
  if isinstance(fn, nnx.Module):
    if not callable(fn):
      raise TypeError(
        f"forward_order: the NNX module {type(fn).__name__} has no __call__; pass a function "
        "fn(params, *args) instead."
      )
    inputs = (params, *args) if (params is not None or args) else ()
    graphdef, state, rest = nnx.split(fn, nnx.Param, ...)

    def call(p: Any, *a: Any, **kw: Any) -> Any:
      return nnx.merge(graphdef, p, rest, copy=True)(*a, **kw)

    return call, state, inputs, f"{type(fn).__name__}(*inputs, **kwargs)"
  if not callable(fn):
    raise TypeError(
      f"forward_order: fn must be callable (fn(params, *args, **kwargs) or an nnx.Module), "
      f"got {type(fn).__name__}."
    )
  if params is None:
    raise TypeError("forward_order(fn, params, *args): params is required unless fn is an "
                    "nnx.Module.")
  return fn, params, args, _describe_fn(fn)


def _param_leaves(params: Any) -> tuple[list[_paths.Path], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths, leaves = [], []
  for key_path, leaf in flat:
    path = _paths.normalize_path(key_path)
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
      raise TypeError(
        f"forward_order: parameter '{_paths.path_str(path)}' is a {type(leaf).__name__}, not an "
        "array; params leaves must be arrays or jax.ShapeDtypeStruct."
      )
    if isinstance(leaf, jax.core.Tracer):
      leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    paths.append(path)
    leaves.append(leaf)
  return paths, leaves, treedef


def _trace(call: Callable[..., Any], treedef: Any, leaves: list[Any], inputs: tuple,
           kwargs: dict, desc: str) -> Any:
  flat, in_def = jax.tree_util.tree_flatten(
    (inputs, kwargs), is_leaf=lambda x: isinstance(x, nnx.Module)
  )
  dynamic = [_is_dynamic(x) for x in flat]

  def traced(param_leaves: list[Any], dyn_leaves: list[Any]) -> list[Any]:
    it = iter(dyn_leaves)
    merged = [next(it) if d else x for x, d in zip(flat, dynamic, strict=True)]
    a, kw = jax.tree_util.tree_unflatten(in_def, merged)
    out = call(jax.tree_util.tree_unflatten(treedef, param_leaves), *a, **kw)
    return [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]

  dyn = [x for x, d in zip(flat, dynamic, strict=True) if d]
  try:
    return jax.make_jaxpr(traced)(leaves, dyn)
  except (TypeError, ValueError, IndexError, KeyError, AttributeError, ArithmeticError) as e:
    raise ValueError(
      f"forward_order: tracing {desc} with jax.make_jaxpr failed; the example inputs must be "
      f"valid for the forward pass. {type(e).__name__}: {e}"
    ) from e


def _units(reads: _Reads, tracked: list[int], paths: list[_paths.Path], shapes: list[tuple],
           desc: str) -> list[tuple[Pos, int, int, int | None]]:
  """Every unit (leaf, or slice of a stacked leaf) with its first read; raises on unread."""
  units, unread = [], []
  for k in tracked:
    if k in reads.stacked and shapes[k]:
      rows = {row: reads.first(k, row) for row in range(shapes[k][0])}
      read = [pos for pos in rows.values() if pos is not None]
      if len(read) == len(rows):
        units.extend((pos, row, k, row) for row, pos in rows.items())
      elif read:  # only some rows indexed (an embedding's row 0): a table, not a stack
        units.append((min(read), 0, k, None))
      else:
        unread.append(_paths.path_str(paths[k]))
    else:
      pos = reads.first(k)
      if pos is None:
        unread.append(_paths.path_str(paths[k]))
      else:
        units.append((pos, 0, k, None))
  if unread:
    more = len(unread) - _MAX_UNREAD_NAMED
    names = ", ".join(unread[:_MAX_UNREAD_NAMED]) + (f" and {more} more" if more > 0 else "")
    raise ValueError(
      f"forward_order: {len(unread)} parameter(s) never read by {desc}: {names}. The example "
      "inputs must exercise every parameter (e.g. train=True, or inputs that take the head's "
      "branch)."
    )
  return units


def forward_order(
  fn: Callable[..., Any] | nnx.Module, params: Any = None, /, *args: Any, **kwargs: Any
) -> dict[str, int | tuple[int, ...]]:
  """Ranks parameters by where the model's forward pass first reads them.

  Traces ``fn(params, *args, **kwargs)`` with ``jax.make_jaxpr`` -- abstract
  values only, nothing is computed or allocated -- and orders the parameter
  leaves by the first equation that consumes each one: rank 0 is the first
  parameter the computation touches (the input side), the last rank the
  parameter read last (the output side). This is the order of use, unlike
  definition order or ``jax.tree``'s sorted keys.

  What counts as a read:

  * Pass-through ops (``convert_element_type``, ``reshape``, ``squeeze``,
    ``broadcast_in_dim``, ``transpose``, ``copy``, ``reduce_precision``,
    ``sharding_constraint``, ``optimization_barrier``, ...) are not reads;
    the first real op on their result is. Casting every param to bfloat16 at
    the top of the forward pass does not define the order.
  * Nested computations are followed: ``jit``, ``remat``, ``custom_jvp`` /
    ``custom_vjp``, ``shard_map``, ``cond`` / ``switch`` (the earliest read
    over the branches), ``while`` (the first iteration) and ``scan``.
    An op whose nested computation cannot be mapped reads all its operands.
  * A leaf consumed slice by slice along axis 0 is *stacked* and each slice
    is ranked on its own: a ``scan`` over it (``nn.scan``, ``nnx.scan`` over
    an ``nnx.vmap`` stack; slice ``j`` is read at iteration ``j``, or
    ``L - 1 - j`` with ``reverse=True``) or static indexing ``p[i]`` of every
    row. A leaf read whole before it is sliced gives every slice that position;
    a leaf only some of whose rows are indexed (``table[0]``) is one read.

  Args:
    fn: the forward pass, called as ``fn(params, *args, **kwargs)``; or an
      ``nnx.Module``, called as ``forward_order(module, *inputs, **kwargs)``,
      whose ``nnx.Param`` state is ranked (other state is kept as it is).
    params: the parameter pytree (Linen dicts, NNX ``State``, any pytree) of
      arrays or ``jax.ShapeDtypeStruct`` s. Integer and bool leaves are
      ignored. For an ``nnx.Module`` this is the first input.
    *args: example inputs; arrays and ``jax.ShapeDtypeStruct`` s are traced,
      anything else (``train=True``) is passed as a static value.
    **kwargs: example keyword inputs, treated like ``args``.

  Returns:
    A ``dict`` from each floating-point parameter's path (``'a/b/0/c'``) to
    its rank: an ``int``, or for a stacked leaf a ``tuple`` with one rank per
    slice. Ranks are ``0 .. N - 1`` over all leaves and slices; the dict is
    ordered by (first) rank.

  Raises:
    TypeError: ``fn`` is not callable, or a params leaf is not an array.
    ValueError: tracing failed, or some parameter is never read by the traced
      call (the example inputs must exercise every parameter).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import dualopt_jax as dj
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = jax.nn.relu(nn.Dense(4, name='z')(x))
    ...     return nn.Dense(2, name='a')(x)
    >>> model = MLP()
    >>> x = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    >>> params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
    >>> dj.forward_order(lambda p, x: model.apply({'params': p}, x), params, x)
    {'z/kernel': 0, 'z/bias': 1, 'a/kernel': 2, 'a/bias': 3}
  """
  call, params, inputs, desc = _bind(fn, params, args, kwargs)
  paths, leaves, treedef = _param_leaves(params)
  closed = _trace(call, treedef, leaves, inputs, kwargs, desc)
  shapes = [tuple(leaf.shape) for leaf in leaves]
  tracked = [k for k, leaf in enumerate(leaves) if _paths.is_float_leaf(leaf)]
  lengths = [s[0] if s else 1 for s in shapes]
  inputs_in: list[_Tag | None] = [None] * len(closed.jaxpr.invars)
  for k in tracked:
    inputs_in[k] = _Tag(k, range(lengths[k]), aligned=bool(shapes[k]))
  reads = _Reads(lengths)
  _run(closed.jaxpr, closed.consts, inputs_in, (), reads)
  units = _units(reads, tracked, paths, shapes, desc)
  units.sort(key=lambda u: (u[0], u[1], u[2]))
  ranks: dict[int, list[tuple[int | None, int]]] = {}
  for rank, (_pos, _tie, k, row) in enumerate(units):
    ranks.setdefault(k, []).append((row, rank))
  out: dict[str, int | tuple[int, ...]] = {}
  for k, entries in ranks.items():  # first-rank order: units were visited by rank
    if entries[0][0] is None:
      out[_paths.path_str(paths[k])] = entries[0][1]
    else:
      out[_paths.path_str(paths[k])] = tuple(rank for _row, rank in sorted(entries))
  return out
