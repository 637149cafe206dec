"""The anchor: the weights a fine-tuning transformation pulls toward, kept in its state.

One implementation for every anchored transformation (``rollback_to``,
``project_to_anchor``, L2-SP, SPD): checked against the params by path,
stored at an optional ``anchor_dtype``, always in a buffer of its own (never
the caller's params array, so a donated ``train_step`` can donate both), and
abstract when ``init`` is given ``jax.ShapeDtypeStruct`` s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from dualopt_jax import _paths


def check_dtype(anchor_dtype: Any, *, name: str) -> None:
  """Raises unless ``anchor_dtype`` is ``None`` or a floating (or complex) dtype."""
  if anchor_dtype is None:
    return
  try:
    dtype = jnp.dtype(anchor_dtype)
  except TypeError:
    raise ValueError(f"{name}: anchor_dtype must be a dtype, got {anchor_dtype!r}.") from None
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(
      f"{name}: anchor_dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype}; an "
      "integer anchor would truncate the pre-trained weights."
    )


def check_restored(anchor: Any, params: Any, *, name: str, stored: Any = None) -> None:
  """Raises, naming the first path, when a state's anchor does not fit these params.

  Run at trace time by ``update``: a state restored into a transformation
  with other ``head``/``mask``/``decay_to_zero`` settings, or for another
  model, has anchors missing, extra or of another shape. ``stored`` is the
  tree of bools ``init`` used (``None``: every leaf keeps an anchor).
  """
  table = _paths.PathTable(anchor, name=f"{name}: the state's anchor")
  keeps = {} if stored is None else dict(_paths.present_leaves(stored))
  for path, leaf in _paths.present_leaves(params):
    expected = keeps.get(path, True)
    found, value = table.lookup(path)
    if expected and not found:
      raise ValueError(
        f"{name}: the optimizer state holds no anchor for '{_paths.path_str(path)}', which this "
        "transformation pulls toward its anchor; the state was made with other head/mask "
        "settings (or for another model). Initialise the state with tx.init, or restore with "
        "the settings the run started with."
      )
    if found and not expected:
      raise ValueError(
        f"{name}: the optimizer state holds an anchor for '{_paths.path_str(path)}', which this "
        "transformation leaves out or decays toward 0; the state was made with other "
        "head/mask/decay_to_zero settings."
      )
    if found and tuple(np.shape(value)) != tuple(np.shape(leaf)):
      raise ValueError(
        f"{name}: the state's anchor for '{_paths.path_str(path)}' has shape "
        f"{tuple(np.shape(value))}, the parameter {tuple(np.shape(leaf))}."
      )


def check_matches(params0: Any, params: Any) -> _paths.PathTable:
  """``params0`` keyed by path; raises ``ValueError`` naming the first path that differs."""
  table = _paths.PathTable(params0, name="params0")
  seen = set()
  for path, leaf in _paths.leaves_with_paths(params):
    seen.add(_paths.canonical(path))
    if _paths.canonical(path) not in table.entries:
      raise ValueError(
        f"params0 does not match params: params has '{_paths.path_str(path)}' with shape "
        f"{tuple(np.shape(leaf)) if not _paths.is_masked_node(leaf) else '(masked)'}, "
        f"params0 has no such path."
      )
    if _paths.is_masked_node(leaf):
      continue
    anchor = table.get(path)
    if tuple(np.shape(anchor)) != tuple(np.shape(leaf)):
      raise ValueError(
        f"params0 does not match params at '{_paths.path_str(path)}': params0 has shape "
        f"{tuple(np.shape(anchor))}, params has shape {tuple(np.shape(leaf))}."
      )
    if jnp.dtype(anchor.dtype) != jnp.dtype(leaf.dtype):
      raise ValueError(
        f"params0 does not match params at '{_paths.path_str(path)}': params0 has dtype "
        f"{anchor.dtype} (shape {tuple(np.shape(anchor))}), params has dtype {leaf.dtype} "
        f"(shape {tuple(np.shape(leaf))})."
      )
  extra = [p for p in table.entries if p not in seen]
  if extra:
    raise ValueError(
      f"params0 does not match params: params0 has '{_paths.path_str(extra[0])}' with shape "
      f"{tuple(np.shape(table.entries[extra[0]]))}, params has no such path."
    )
  return table


def store(x: chex.Array, anchor_dtype: Any) -> chex.Array:
  """A copy of ``x`` in a new buffer (float leaves at ``anchor_dtype``); abstract if ``x`` is."""

  def copy(v: chex.Array) -> chex.Array:
    if anchor_dtype is not None and _paths.is_float_leaf(v):
      return jnp.array(v, dtype=anchor_dtype, copy=True)
    return jnp.array(v, copy=True)

  return _paths.on_value(copy, x)


def _check_finite(x: Any, path: _paths.Path, what: str) -> None:
  """Raises when a concrete float leaf holds NaN or inf (an anchor must be finite)."""
  if not _paths.is_float_leaf(x) or isinstance(x, (jax.ShapeDtypeStruct, jax.core.Tracer)):
    return
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return  # a global array of several processes: its value cannot be read here
  with jax.ensure_compile_time_eval():  # a concrete value read inside jit/eval_shape of init
    finite = jnp.all(jnp.isfinite(x))
  try:
    finite = bool(finite)
  except jax.errors.ConcretizationTypeError:
    return  # not known while tracing
  if not finite:
    raise ValueError(
      f"{what} holds NaN or inf at '{_paths.path_str(path)}'; the anchor the weights are pulled "
      "toward must be finite."
    )


def init(
  params: optax.Params,
  params0: optax.Params | None,
  *,
  anchor_dtype: Any,
  stored: Callable[[optax.Params], Any] | None = None,
) -> optax.Params:
  """The anchor for ``params``: ``params0`` (checked first) or a copy of ``params``.

  ``stored`` (``params -> tree of bools``) says which leaves keep an anchor;
  the others hold ``optax.MaskedNode()``, no buffer.
  """
  table = None if params0 is None else check_matches(params0, params)

  def anchor_leaf(path: _paths.Path, x: Any, *keep: bool) -> Any:
    if keep and not keep[0]:
      return optax.MaskedNode()
    source = x if table is None else table.get(path)
    _check_finite(source, path, "params0" if table is not None else "the params given to init")
    return store(source, anchor_dtype)

  keeps = () if stored is None else (stored(params),)
  return _paths.map_with_path(anchor_leaf, params, *keeps)
