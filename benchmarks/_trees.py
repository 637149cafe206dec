"""Transformer-shaped parameter trees for the benchmarks.

One tree shape is used by every benchmark: a decoder-only transformer written
as a Flax Linen ``params`` dict, 7 leaves per block plus the token embedding
(``1 + 7 * n_layers`` leaves; 169 for 24 layers, like the tree the issue's H100
numbers were measured on)::

  params/embed/embedding                 (vocab, d)
  params/layers_{i}/ln1/scale            (d,)
  params/layers_{i}/attn/qkv/kernel      (d, 3d)
  params/layers_{i}/attn/out/kernel      (d, d)
  params/layers_{i}/ln2/scale            (d,)
  params/layers_{i}/mlp/fc1/kernel       (d, 4d)
  params/layers_{i}/mlp/fc1/bias         (4d,)
  params/layers_{i}/mlp/fc2/kernel       (4d, d)

About ``12 d^2`` parameters per block. ``d=1024, vocab=32768`` gives 335 M
parameters at 24 layers, ``d=2048`` gives 1.27 B.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LEAVES_PER_LAYER = 7


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """Shape of a transformer-shaped tree."""

  name: str
  d_model: int
  n_layers: int = 24
  vocab: int = 32768
  scanned: bool = False  # blocks stacked along a leading axis (nn.scan / nnx.scan): 8 leaves

  @property
  def layout(self) -> TreeSpec:
    """The same model with its blocks stacked (``scanned``), as a scan-over-layers model has."""
    return dataclasses.replace(self, name=f"{self.name} scanned", scanned=True)

  @property
  def n_leaves(self) -> int:
    return 1 + LEAVES_PER_LAYER * (1 if self.scanned else self.n_layers)

  @property
  def n_params(self) -> int:
    return sum(int(np.prod(s)) for s in _shapes(self).values())


# Default sizes: small enough that every method runs in a few seconds on 2 CPU cores.
CPU_SIZES = (
  TreeSpec("0.4M", d_model=32, n_layers=24, vocab=4096),
  TreeSpec("5.3M", d_model=128, n_layers=24, vocab=4096),
  TreeSpec("21M", d_model=256, n_layers=24, vocab=8192),
)
# GPU sizes (--large): the reference sizes.
LARGE_SIZES = (
  TreeSpec("92M", d_model=512, n_layers=24, vocab=32768),
  TreeSpec("335M", d_model=1024, n_layers=24, vocab=32768),
  TreeSpec("1.27B", d_model=2048, n_layers=24, vocab=32768),
)
TINY_SIZES = (TreeSpec("tiny", d_model=8, n_layers=2, vocab=16),)


def _shapes(spec: TreeSpec) -> dict[str, tuple[int, ...]]:
  d = spec.d_model
  block = {
    "ln1/scale": (d,),
    "attn/qkv/kernel": (d, 3 * d),
    "attn/out/kernel": (d, d),
    "ln2/scale": (d,),
    "mlp/fc1/kernel": (d, 4 * d),
    "mlp/fc1/bias": (4 * d,),
    "mlp/fc2/kernel": (4 * d, d),
  }
  shapes = {"embed/embedding": (spec.vocab, d)}
  if spec.scanned:
    shapes.update({f"layers/{k}": (spec.n_layers, *s) for k, s in block.items()})
    return shapes
  for i in range(spec.n_layers):
    shapes.update({f"layers_{i}/{k}": s for k, s in block.items()})
  return shapes


def spec_with_leaves(n_leaves: int, d_model: int = 16, vocab: int = 64) -> TreeSpec:
  """A tree with about ``n_leaves`` leaves (``1 + 7 * n_layers``), for compile-time scans."""
  n_layers = max(1, round((n_leaves - 1) / LEAVES_PER_LAYER))
  return TreeSpec(f"{1 + LEAVES_PER_LAYER * n_layers}leaves", d_model, n_layers, vocab)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return {"params": tree}


def make_params(spec: TreeSpec, *, seed: int = 0, dtype: Any = jnp.float32) -> dict[str, Any]:
  """Random parameters with the tree's shapes (norm scales 1, biases 0, kernels ~ N(0, 0.02))."""
  key = jax.random.PRNGKey(seed)
  flat = {}
  for i, (path, shape) in enumerate(_shapes(spec).items()):
    if path.endswith("scale"):
      flat[path] = jnp.ones(shape, dtype)
    elif path.endswith("bias"):
      flat[path] = jnp.zeros(shape, dtype)
    else:
      flat[path] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
  return _nest(flat)


def make_grads(params: Any, *, seed: int = 1) -> Any:
  """Random gradients shaped like ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.PRNGKey(seed)
  grads = [
    1e-3 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    for i, x in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, grads)


def shape_structs(spec: TreeSpec, dtype: Any = jnp.float32) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` tree of the params (no memory allocated)."""
  return _nest({k: jax.ShapeDtypeStruct(s, dtype) for k, s in _shapes(spec).items()})


def forward_positions(spec: TreeSpec) -> dict[str, Any]:
  """The tree's forward order (``dj.forward_order``'s format), from the model spec itself.

  ``_shapes`` lists the leaves input to output (embedding, then per block the
  norm, attention, norm and MLP tensors); the names alone do not fix the
  order inside a block, which ``granularity="tensor"`` (``olor``) needs. For a
  ``scanned`` tree a stacked leaf has one position per slice.
  """
  if not spec.scanned:
    return {f"params/{path}": i for i, path in enumerate(_shapes(spec))}
  block = [p.removeprefix("layers/") for p in _shapes(spec) if p.startswith("layers/")]
  positions: dict[str, Any] = {"params/embed/embedding": 0}
  for j, name in enumerate(block):  # slice i of a stacked leaf is block i's tensor j
    positions[f"params/layers/{name}"] = tuple(
      1 + i * len(block) + j for i in range(spec.n_layers)
    )
  return positions


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree``."""
  return sum(
    int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
    if hasattr(x, "shape") and hasattr(x, "dtype")
  )


# ---------------------------------------------------------------------------------------------
# The optimizers under test.
# ---------------------------------------------------------------------------------------------

LR = 1e-4


@dataclasses.dataclass(frozen=True)
class Method:
  """An optimizer under test and the bytes per f32 parameter its step must move at least."""

  name: str
  make: Any  # (TreeSpec) -> optax.GradientTransformation for that tree
  ideal_bytes: float  # per parameter: reads + writes of params, grads, state
  note: str = ""


def _adamw():
  import optax

  return optax.adamw(LR, weight_decay=1e-2)


def _depth_scale(params: Any) -> Any:
  """Linear block-depth profile, 1 at the embedding to 0 after the last block (for the chains)."""

  def scale(key_path: Any, _leaf: Any) -> float:
    for key in key_path:
      name = getattr(key, "key", None)
      if isinstance(name, str) and name.startswith("layers_"):
        return 1.0 - (int(name.split("_")[1]) + 1) / 25.0
    return 1.0

  return jax.tree_util.tree_map_with_path(scale, params)


def _chain_finetune(anchor_dtype=None):
  import optax

  import dualopt_jax as dj

  return optax.chain(
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(LR),
    dj.rollback_to(rate=0.01, layer_scale=_depth_scale, anchor_dtype=anchor_dtype),
  )


def _chain_scratch():
  import optax

  import dualopt_jax as dj

  return optax.chain(
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(LR),
    dj.layerwise_decay(rate=1e-4, layer_scale=_depth_scale),
  )


def available_methods() -> tuple[dict[str, Method], list[str]]:
  """All benchmarked methods, and printable notes (none: every method is in ``dualopt_jax``)."""
  import dualopt_jax as dj

  notes = []
  methods = {"adamw": Method("adamw", lambda _spec: _adamw(), 28.0, "optax.adamw")}
  methods["dualopt_ft"] = Method(
    "dualopt_ft", lambda _spec: dj.dualopt(LR, mode="finetune"), 32.0, "f32 anchor"
  )
  methods["dualopt_ft_bf16"] = Method(
    "dualopt_ft_bf16",
    lambda _spec: dj.dualopt(LR, mode="finetune", anchor_dtype=jnp.bfloat16),
    30.0,
    "bf16 anchor",
  )
  methods["dualopt_scratch"] = Method(
    "dualopt_scratch", lambda _spec: dj.dualopt(LR, mode="scratch"), 28.0, "anchor 0"
  )
  methods["olor"] = Method(
    "olor", lambda spec: dj.olor(LR, order=forward_positions(spec)), 32.0, "f32 anchor"
  )
  methods["spd"] = Method(
    "spd", lambda _spec: _spd_factory(), 32.0,
    "one-pass bound; per-tensor norms need 2 passes",
  )
  methods["chain_ft"] = Method(
    "chain_ft", lambda _spec: _chain_finetune(), 32.0, "adam+lr+rollback_to chain"
  )
  methods["chain_ft_bf16"] = Method(
    "chain_ft_bf16", lambda _spec: _chain_finetune(jnp.bfloat16), 30.0, "chain, bf16 anchor"
  )
  methods["chain_scratch"] = Method(
    "chain_scratch", lambda _spec: _chain_scratch(), 28.0, "adam+lr+layerwise_decay chain"
  )
  return methods, notes


def _spd_factory():
  """SPD (``dj.spd``) wrapping ``optax.adam`` (SPD replaces any other decay)."""
  import optax

  import dualopt_jax as dj

  return dj.spd(optax.adam(LR), strength=1.0)


DEFAULT_METHODS = (
  "adamw", "dualopt_ft", "dualopt_ft_bf16", "dualopt_scratch", "olor", "spd",
)


def select_methods(names: Any = None) -> tuple[list[Method], list[str]]:
  """The requested methods that exist (adamw always first), and printable notes."""
  methods, notes = available_methods()
  wanted = list(names) if names else list(DEFAULT_METHODS)
  if "adamw" not in wanted:
    wanted.insert(0, "adamw")
  chosen = []
  for name in dict.fromkeys(wanted):
    if name in methods:
      chosen.append(methods[name])
    elif name not in ("dualopt_ft", "dualopt_ft_bf16", "dualopt_scratch", "olor", "spd"):
      raise ValueError(f"unknown method {name!r}; known: {sorted(methods)}")
  return chosen, notes


def make_step(tx):
  """``(params, opt_state, grads) -> (params, opt_state)``: update + apply, to be jitted."""
  import optax

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step
