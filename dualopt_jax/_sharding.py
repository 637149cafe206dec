"""Optimizer state sharded like the parameters (data parallel, FSDP, many hosts).

Every param-sized buffer of an Optax state -- Adam moments, the rollback
anchor, SPD's anchor -- is laid out exactly like the parameter it belongs to;
counters and other small leaves are replicated. These helpers compute those
shardings from the params' shardings with JAX's own machinery
(``jax.eval_shape``, the params' tree structure, ``jax.jit(...,
out_shardings=...)``); nothing here communicates by itself.

Typical use on a mesh (one host or many)::

  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  param_sh = fsdp_shardings(params, mesh, 'data')     # or replicate: P()
  params = jax.device_put(params, param_sh)
  state_sh = state_shardings(tx, params)
  opt_state = init_sharded(tx, params)                # == jax.device_put(tx.init(params), state_sh)
  step = jax.jit(step, out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from dualopt_jax import _paths

__all__ = [
  "abstract_state",
  "fsdp_shardings",
  "init_sharded",
  "replicated_like",
  "state_shardings",
]


def _is_leaf(x: Any) -> bool:
  return _paths.is_masked_node(x) or isinstance(x, Sharding | PartitionSpec)


def _param_shardings(params: Any, shardings: Any, mesh: Any) -> Any:
  """The params' shardings as a pytree of ``Sharding`` (validated, with paths in errors)."""
  if shardings is None:

    def get(path, leaf):
      sharding = getattr(leaf, "sharding", None)
      if sharding is None:
        raise ValueError(
          f"state_shardings: parameter '{_paths.path_str(path)}' ({type(leaf).__name__}) has no "
          "sharding; pass jax.Arrays placed with jax.device_put, ShapeDtypeStructs with "
          "sharding=..., or the shardings= argument."
        )
      return sharding

    return _paths.map_with_path(get, params)

  def convert(path, leaf, sharding):
    if isinstance(sharding, PartitionSpec):
      if mesh is None:
        raise ValueError(
          f"state_shardings: shardings for '{_paths.path_str(path)}' is a PartitionSpec "
          f"{sharding}; pass mesh= to turn PartitionSpecs into NamedShardings."
        )
      sharding = NamedSharding(mesh, sharding)
    if not isinstance(sharding, Sharding):
      raise ValueError(
        f"state_shardings: shardings for '{_paths.path_str(path)}' must be a "
        f"jax.sharding.Sharding or PartitionSpec, got {type(sharding).__name__}: {sharding!r}."
      )
    return sharding

  try:
    return _paths.map_with_path(convert, params, shardings)
  except ValueError as e:
    if "state_shardings" in str(e):
      raise
    raise ValueError(
      "state_shardings: shardings must have the structure of params (one Sharding or "
      f"PartitionSpec per parameter leaf): {e}"
    ) from e


def replicated_like(shardings: Any) -> Sharding:
  """A fully replicated sharding over the devices the given shardings use.

  Args:
    shardings: a pytree of ``jax.sharding.Sharding`` (the params' shardings).

  Returns:
    ``NamedSharding(mesh, PartitionSpec())`` for the mesh of the first
    ``NamedSharding`` found, or the ``SingleDeviceSharding`` when every leaf
    lives on that one device.
  """
  leaves = [s for s in jax.tree.leaves(shardings, is_leaf=_is_leaf) if isinstance(s, Sharding)]
  for s in leaves:
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, PartitionSpec())
  devices = {d for s in leaves for d in s.device_set}
  if len(devices) == 1:
    return SingleDeviceSharding(next(iter(devices)))
  raise ValueError(
    "replicated_like: cannot derive a replicated sharding from "
    f"{sorted({type(s).__name__ for s in leaves}) or 'no shardings'}; shard the params with "
    "jax.sharding.NamedSharding over a mesh (jax.make_mesh)."
  )


def _shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _param_shaped_subtrees(
  abstract_state: Any, params: Any, param_sh: Any, replicated: Sharding
) -> Any:
  """Shardings for a state: its subtrees with the params' structure are matched leaf by leaf.

  A subtree of the state whose tree structure is the params' (Adam's moments,
  an anchor, with ``optax.MaskedNode`` where a mask left a leaf out) gets,
  per leaf, the parameter's sharding when the shapes agree and a replicated
  one otherwise (per-leaf scalars); every other leaf is replicated. This is
  how ``optax.tree_map_params`` recognises parameter trees, without running
  ``tx.init`` on placeholders (which our transformations refuse: they read
  shapes and check an anchor at ``init``).
  """
  params_def = jax.tree_util.tree_structure(params, is_leaf=_paths.is_masked_node)
  param_leaves = jax.tree_util.tree_leaves(params, is_leaf=_paths.is_masked_node)
  sharding_leaves = jax.tree_util.tree_leaves(param_sh, is_leaf=_paths.is_masked_node)

  def is_params_like(node: Any) -> bool:
    if _paths.is_masked_node(node):
      return False
    return jax.tree_util.tree_structure(node, is_leaf=_paths.is_masked_node) == params_def

  def per_subtree(node: Any) -> Any:
    if not is_params_like(node):
      return jax.tree.map(lambda _: replicated, node)
    leaves = jax.tree_util.tree_leaves(node, is_leaf=_paths.is_masked_node)
    out = [
      leaf if _paths.is_masked_node(leaf)
      else sharding if _shape_of(leaf) == _shape_of(param) else replicated
      for leaf, param, sharding in zip(leaves, param_leaves, sharding_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(params_def, out)

  return jax.tree.map(
    per_subtree, abstract_state,
    is_leaf=lambda x: _paths.is_masked_node(x) or is_params_like(x),
  )


def state_shardings(
  tx: optax.GradientTransformation,
  params: optax.Params,
  shardings: Any = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Any:
  r"""Shardings for ``tx.init(params)``: each param-sized buffer sharded like its parameter.

  Adam's moments, the rollback anchor (at any ``anchor_dtype``) and every other
  state leaf with the shape of a parameter get that parameter's sharding; step
  counters and all other leaves are replicated over the same devices. The
  state is never computed (``jax.eval_shape``), so this is free for any model
  size. Param-shaped subtrees are the subtrees of the state with the params'
  tree structure (what ``optax.tree_map_params`` looks for), matched leaf by
  leaf; a leaf of another shape there (a per-leaf scalar) is replicated.

  Since every DualOpt transform is elementwise per parameter (or reduces one
  tensor at a time), a state sharded like the params needs no communication
  beyond the gradient reduction: with FSDP each device stores and updates only
  its slice.

  Args:
    tx: the optimizer (any ``optax.GradientTransformation``).
    params: the parameters: ``jax.Array`` s (their ``.sharding`` is used) or
      ``jax.ShapeDtypeStruct`` s (with ``sharding=`` or with ``shardings``).
    shardings: optional pytree over ``params`` of ``jax.sharding.Sharding``
      (or ``PartitionSpec`` with ``mesh``) overriding the params' own.
    mesh: the mesh for ``PartitionSpec`` leaves in ``shardings``.

  Returns:
    A pytree with the structure of ``tx.init(params)`` whose leaves are
    ``jax.sharding.Sharding`` s (``optax.MaskedNode`` where the state has one),
    usable as ``out_shardings`` of ``jax.jit`` and with ``jax.device_put``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import dualopt_jax as dj
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = jax.device_put({'w': jnp.ones((4, 2))}, NamedSharding(mesh, P('data')))
    >>> tx = optax.chain(optax.adam(1e-3), dj.rollback_to(rate=0.01))
    >>> sh = dj.state_shardings(tx, params)
    >>> sh[1].anchor['w'].spec, sh[1].count.spec
    (P('data',), P())

  References:
    Optax, ``optax.tree_map_params``; JAX, "Distributed arrays and automatic
    parallelization".
  """
  param_sh = _param_shardings(params, shardings, mesh)
  replicated = replicated_like(param_sh)
  abstract_params = _paths.map_with_path(
    lambda _p, x: jax.ShapeDtypeStruct(_shape_of(x), x.dtype), params
  )
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return _param_shaped_subtrees(abstract_state, abstract_params, param_sh, replicated)


def init_sharded(
  tx: optax.GradientTransformation,
  params: optax.Params,
  shardings: Any = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> optax.OptState:
  """``tx.init(params)`` created directly in its sharded layout.

  Runs ``jax.jit(tx.init, out_shardings=state_shardings(...))``: each device
  materializes only its slice of the moments and the anchor, never the full
  state on one device (a bare ``jax.jit(tx.init)`` may put the whole state on
  device 0). Works on one host or many (every process calls it).

  Args:
    tx: the optimizer.
    params: the parameters (``jax.Array`` s placed with their shardings).
    shardings: optional param shardings; see :func:`state_shardings`.
    mesh: the mesh for ``PartitionSpec`` leaves in ``shardings``.

  Returns:
    The optimizer state, each leaf with the sharding :func:`state_shardings`
    gives.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import dualopt_jax as dj
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = jax.device_put({'w': jnp.ones((4, 2))}, NamedSharding(mesh, P('data')))
    >>> state = dj.init_sharded(optax.chain(optax.adam(1e-3), dj.rollback_to(rate=0.01)), params)
    >>> state[1].anchor['w'].sharding.spec
    P('data',)
  """
  out = state_shardings(tx, params, shardings, mesh=mesh)
  return jax.jit(tx.init, out_shardings=out)(params)


def abstract_state(
  tx: optax.GradientTransformation,
  params: optax.Params,
  shardings: Any = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Any:
  """``jax.eval_shape(tx.init, params)`` with every leaf's sharding set.

  The target to restore a sharded optimizer state into (e.g. Orbax
  ``StandardCheckpointer().restore(path, target)``): each process reads only
  its own slices. Nothing is computed or allocated.

  Args:
    tx: the optimizer.
    params: the parameters (arrays or ``ShapeDtypeStruct`` s with shardings).
    shardings: optional param shardings; see :func:`state_shardings`.
    mesh: the mesh for ``PartitionSpec`` leaves in ``shardings``.

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` with the structure of
    ``tx.init(params)`` and the shardings of :func:`state_shardings`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import dualopt_jax as dj
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = jax.device_put({'w': jnp.ones((4, 2))}, NamedSharding(mesh, P('data')))
    >>> target = dj.abstract_state(optax.adam(1e-3), params)
    >>> target[0].mu['w'].sharding.spec
    P('data',)
  """
  sh = state_shardings(tx, params, shardings, mesh=mesh)
  abstract_params = _paths.map_with_path(
    lambda _p, x: jax.ShapeDtypeStruct(_shape_of(x), x.dtype), params
  )
  return jax.tree.map(
    lambda a, s: a if _paths.is_masked_node(a) else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                          sharding=s),
    jax.eval_shape(tx.init, abstract_params),
    sh,
    is_leaf=_paths.is_masked_node,
  )


def fsdp_shardings(
  params: optax.Params,
  mesh: jax.sharding.Mesh,
  axis: str | tuple[str, ...] = "data",
  *,
  min_size: int = 0,
) -> Any:
  """FSDP layout: each parameter sharded along one dimension over ``axis``.

  For each leaf the largest dimension divisible by the size of ``axis`` is
  sharded (ties: the first); leaves with no such dimension, or with fewer
  than ``min_size`` elements, are replicated.

  Args:
    params: the parameters (arrays or ``ShapeDtypeStruct`` s).
    mesh: the device mesh.
    axis: the mesh axis (or tuple of axes) to shard over.
    min_size: replicate leaves smaller than this many elements.

  Returns:
    A pytree over ``params`` of ``NamedSharding``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> dj.fsdp_shardings({'w': jnp.ones((3, 4))}, mesh)['w'].spec
    P(None, 'data')
  """
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  for name in names:
    if name not in mesh.shape:
      raise ValueError(
        f"fsdp_shardings: axis '{name}' is not an axis of the mesh {dict(mesh.shape)}."
      )
  size = int(np.prod([mesh.shape[n] for n in names]))
  spec_axis = names[0] if len(names) == 1 else names

  def per_leaf(_path, leaf):
    shape = _shape_of(leaf)
    if int(np.prod(shape, dtype=np.int64)) < min_size:
      return NamedSharding(mesh, PartitionSpec())
    best = None
    for dim, n in enumerate(shape):
      if n % size == 0 and n > 0 and (best is None or n > shape[best]):
        best = dim
    if best is None:
      return NamedSharding(mesh, PartitionSpec())
    spec: list[str | tuple[str, ...] | None] = [None] * len(shape)
    spec[best] = spec_axis
    return NamedSharding(mesh, PartitionSpec(*spec))

  return _paths.map_with_path(per_leaf, params)
