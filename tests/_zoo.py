"""Realistic parameter trees from real model zoos, for testing layer depths.

Every ``Zoo`` holds a model's parameter tree exactly as the model's own code
builds it (a real init with a tiny config and random weights; nothing is ever
downloaded), a function ``apply(params, *inputs)`` that runs the model's real
forward pass with that tree, small example ``inputs``, and ``forward_units``:
the model's units (path prefixes, keys joined with ``/``, integer keys as
decimal strings) in TRUE forward-pass order, written by hand from reading each
model's source code -- never computed from the tree. A stacked (scanned /
vmapped) layer stack is one unit written ``'<prefix> [stacked L]'``; the root
unit ``''`` covers a whole tree that has no layer structure.

Optional zoos need packages that ``pyproject.toml`` does not declare; their
builders import them lazily and raise ``ImportError`` (use ``load_or_skip``):

* ``hf_*``: ``transformers<5`` (Flax classes; checked with 4.57.6, no torch).
* ``tunix_*``: ``google-tunix==0.1.7`` installed with ``--no-deps`` plus
  ``jaxtyping`` (checked with 0.3.11). ``tunix/__init__.py`` imports the whole
  trainer stack (grain, datasets, qwix, ...), so the model modules are imported
  through a bare stand-in ``tunix`` package that skips that ``__init__``.

Path convention used here (and by ``check_units``): a ``jax.tree_util`` key
path with NNX ``Variable`` steps (``.value`` / ``.raw_value``) dropped; dict
keys, sequence indices and attribute names become strings.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_STACKED = re.compile(r"^(.*?)\s*\[stacked (\d+)\]$")


@dataclasses.dataclass(frozen=True)
class Zoo:
  """One model: its parameter tree, its forward pass and its true unit order."""

  name: str
  params: Any
  apply: Callable[..., Any]
  inputs: tuple
  forward_units: list[str]
  notes: str = ""
  source: str = ""  # where the definition comes from (package + class, or 'hand-written')

  def run(self) -> Any:
    """``apply(params, *inputs)``."""
    return self.apply(self.params, *self.inputs)

  @property
  def units(self) -> list[tuple[tuple[str, ...], int | None]]:
    """``forward_units`` parsed: (prefix components, stack length or None), in order."""
    return [parse_unit(u) for u in self.forward_units]

  @property
  def stacked(self) -> dict[str, int]:
    """Stacked units: prefix string -> number of layers on the leading axis."""
    return {"/".join(p): n for p, n in self.units if n is not None}


def parse_unit(unit: str) -> tuple[tuple[str, ...], int | None]:
  """``'a/b [stacked 3]'`` -> ``(('a', 'b'), 3)``; ``'a/b'`` -> ``(('a', 'b'), None)``."""
  match = _STACKED.match(unit)
  length = None
  if match:
    unit, length = match.group(1), int(match.group(2))
  return (tuple(unit.split("/")) if unit else ()), length


def key_str(key: Any) -> str | None:
  """One ``jax.tree_util`` key as a string; ``None`` for an NNX Variable's value step."""
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name in ("value", "raw_value") else key.name
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """Leaves of ``tree`` (``jax.tree`` flatten order) with string-component paths."""
  out = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = tuple(s for s in (key_str(k) for k in key_path) if s is not None)
    out.append((parts, leaf))
  return out


def check_units(zoo: Zoo) -> dict[str, list[str]]:
  """Every leaf lies under exactly one forward unit; every unit holds a leaf.

  A stacked unit's leaves all have that many layers on their leading axis.
  Returns unit -> the '/'-joined leaf paths under it. Raises AssertionError.
  """
  units = zoo.units
  assert len(set(zoo.forward_units)) == len(zoo.forward_units), f"{zoo.name}: duplicate units"
  covered: dict[str, list[str]] = {u: [] for u in zoo.forward_units}
  leaves = leaf_paths(zoo.params)
  assert leaves, f"{zoo.name}: no leaves"
  for path, leaf in leaves:
    hits = [i for i, (prefix, _) in enumerate(units) if path[: len(prefix)] == prefix]
    where = "/".join(path) or "<root>"
    assert len(hits) == 1, (
      f"{zoo.name}: leaf '{where}' lies under {len(hits)} units "
      f"{[zoo.forward_units[i] for i in hits]}"
    )
    (i,) = hits
    length = units[i][1]
    if length is not None:
      shape = np.shape(leaf)
      assert len(shape) >= 1 and shape[0] == length, (
        f"{zoo.name}: leaf '{where}' of shape {shape} under stacked unit "
        f"'{zoo.forward_units[i]}' lacks a leading axis of {length}"
      )
    covered[zoo.forward_units[i]].append(where)
  empty = [u for u, paths in covered.items() if not paths]
  assert not empty, f"{zoo.name}: units with no leaf: {empty}"
  return covered


def check_apply(zoo: Zoo) -> Any:
  """Runs the forward pass; asserts every output array is finite. Returns the output."""
  out = zoo.run()
  for x in jax.tree_util.tree_leaves(out):
    assert np.all(np.isfinite(np.asarray(x))), f"{zoo.name}: non-finite output"
  return out


def unit_sequence(zoo: Zoo, order: str = "sorted") -> list[str]:
  """The units in the order the tree itself presents them (to contrast with forward order).

  ``order='sorted'``: ``jax.tree`` flatten order (dict keys sorted). ``order='insertion'``:
  the containers' own iteration order (dict insertion order; NNX State is already sorted).
  Each unit is listed at its first leaf; a unit split by another one appears again.
  """
  from collections.abc import Mapping

  def walk(tree, prefix=()):
    if _is_variable(tree):
      yield prefix
    elif isinstance(tree, Mapping):
      for k, v in tree.items():
        yield from walk(v, (*prefix, str(k)))
    elif isinstance(tree, (list, tuple)):
      for i, v in enumerate(tree):
        yield from walk(v, (*prefix, str(i)))
    else:
      yield prefix

  if order == "sorted":
    paths = [p for p, _ in leaf_paths(zoo.params)]
  elif order == "insertion":
    paths = list(walk(zoo.params))
  else:
    raise ValueError(f"order must be 'sorted' or 'insertion', got {order!r}")
  out: list[str] = []
  for path in paths:
    unit = next(s for (u, _), s in zip(zoo.units, zoo.forward_units, strict=True)
                if path[: len(u)] == u)
    if not out or out[-1] != unit:
      out.append(unit)
  return out


def _is_variable(x: Any) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Variable)


def with_noise(zoo: Zoo, scale: float = 0.02, seed: int = 0) -> Zoo:
  """The same zoo with Gaussian noise added to every float leaf (structure and Variables kept).

  For tests that need non-zero gradients everywhere: several zoos zero-initialize
  parameters (tunix MLP kernels and Gemma norm scales, nnx.LoRA's lora_b).
  """
  leaves, treedef = jax.tree_util.tree_flatten(zoo.params)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  noisy = [
    x + scale * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
    if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    for x, k in zip(leaves, keys, strict=False)
  ]
  return dataclasses.replace(zoo, params=jax.tree_util.tree_unflatten(treedef, noisy))


def load_or_skip(name: str) -> Zoo:
  """``all_zoos()[name]()``, turning a missing optional package into ``pytest.skip``."""
  try:
    return all_zoos()[name]()
  except ImportError as e:
    import pytest

    pytest.skip(f"zoo '{name}' unavailable: {e}")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _nnx_zoo(model: Any, inputs: tuple, *, call: Callable | None = None, **fields) -> Zoo:
  """A Zoo from a built NNX module: params = ``nnx.state(model, nnx.Param)``.

  ``apply`` rebuilds the module with ``nnx.merge`` from the graph definition, the
  given params and the non-Param state (batch stats, RNG counts) captured here.
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  call = call or (lambda m, *xs: m(*xs))
  fields["notes"] = (fields.get("notes", "") + " " + _NNX_STATE_NOTE).strip()

  def apply(p, *xs):
    return call(nnx.merge(graphdef, p, rest), *xs)

  return Zoo(params=params, apply=apply, inputs=inputs, **fields)


_NNX_STATE_NOTE = (
  "[NNX] nnx.state() is KEY-SORTED (graph flattening sorts attribute names), so the State's "
  "own iteration order is alphabetical, not definition order; leaves are nnx.Param Variables "
  "(jax paths end in .value)."
)


def _linen_zoo(module: Any, inputs: tuple, *, rng: int = 0, init_kwargs=None, apply_kwargs=None,
               **fields) -> Zoo:
  """A Zoo from a Linen module: params = ``module.init(...)['params']``.

  Other collections (``batch_stats``) are kept out of ``params`` and passed to
  ``module.apply`` unchanged.
  """
  variables = module.init(jax.random.key(rng), *inputs, **(init_kwargs or {}))
  variables = dict(variables)
  params = variables.pop("params")
  others = variables
  kwargs = apply_kwargs or {}

  def apply(p, *xs):
    return module.apply({"params": p, **others}, *xs, **kwargs)

  return Zoo(params=params, apply=apply, inputs=inputs, **fields)


# --------------------------------------------------------------------------------------
# 1. Hugging Face Flax models (transformers < 5)
# --------------------------------------------------------------------------------------


def _transformers():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  try:
    import transformers
  except ImportError as e:
    raise ImportError(
      "the hf_* zoos need transformers<5 (Flax classes), e.g. pip install 'transformers<5'"
    ) from e
  if int(transformers.__version__.split(".")[0]) >= 5:
    raise ImportError(
      f"transformers {transformers.__version__} has no Flax classes; install 'transformers<5'"
    )
  return transformers


def _hf_zoo(model: Any, inputs: tuple, call: Callable, **fields) -> Zoo:
  def apply(p, *xs):
    return call(model, p, *xs)

  version = sys.modules["transformers"].__version__
  fields["notes"] = (fields.get("notes", "") + " " + _HF_NOTE).strip()
  return Zoo(params=model.params, apply=apply, inputs=inputs,
             source=f"transformers {version} {type(model).__name__}", **fields)


_HF_NOTE = (
  "[HF] model.params is a plain (unfrozen) dict of jax arrays in Linen creation order, which "
  "equals the forward order of units here; numbered layers use digit-STRING keys."
)


def hf_bert(num_layers: int = 2, hidden: int = 16) -> Zoo:
  """FlaxBertForSequenceClassification."""
  t = _transformers()
  config = t.BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, vocab_size=50, max_position_embeddings=16,
                        num_labels=3)
  model = t.FlaxBertForSequenceClassification(config, seed=0)
  ids = np.array([[2, 7, 11, 3, 0]], np.int32)
  return _hf_zoo(
    model, (ids,), lambda m, p, x: m(x, params=p).logits,
    name="hf_bert" if num_layers == 2 else f"hf_bert_{num_layers}",
    # FlaxBertEmbeddings: word -> position -> token_type -> LayerNorm; then the encoder
    # layers in index order; FlaxBertPooler on [CLS]; dropout; classifier Dense.
    forward_units=["bert/embeddings",
                   *[f"bert/encoder/layer/{i}" for i in range(num_layers)],
                   "bert/pooler", "classifier"],
    notes=("Layer keys are digit STRINGS ('0', '1', ... '10', '11'): jax.tree's sorted flatten "
           "orders them '0','1','10','11','2',...; 'bert' sorts before 'classifier' by luck. "
           "model.params is a plain dict."),
  )


def hf_roberta() -> Zoo:
  """FlaxRobertaForSequenceClassification."""
  t = _transformers()
  config = t.RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, vocab_size=50, max_position_embeddings=20,
                           num_labels=3)
  model = t.FlaxRobertaForSequenceClassification(config, seed=0)
  ids = np.array([[0, 7, 11, 9, 2]], np.int32)
  return _hf_zoo(
    model, (ids,), lambda m, p, x: m(x, params=p).logits,
    name="hf_roberta",
    # FlaxRobertaModule(add_pooling_layer=False): embeddings, layers 0..L-1, then
    # FlaxRobertaClassificationHead on <s>: classifier/dense then classifier/out_proj.
    forward_units=["roberta/embeddings", "roberta/encoder/layer/0", "roberta/encoder/layer/1",
                   "classifier"],
    notes=("No pooler (add_pooling_layer=False): the head is a two-layer module "
           "'classifier/{dense,out_proj}'. Position ids start at padding_idx+1, hence "
           "max_position_embeddings=20 > sequence length. Digit-string layer keys."),
  )


def hf_gpt2() -> Zoo:
  """FlaxGPT2LMHeadModel (tied LM head)."""
  t = _transformers()
  config = t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
  model = t.FlaxGPT2LMHeadModel(config, seed=0)
  ids = np.array([[5, 7, 11, 3]], np.int32)
  return _hf_zoo(
    model, (ids,), lambda m, p, x: m(x, params=p).logits,
    name="hf_gpt2",
    # FlaxGPT2Module: wte(input_ids) then wpe(position_ids), added; blocks h/0..; ln_f.
    forward_units=["transformer/wte", "transformer/wpe", "transformer/h/0", "transformer/h/1",
                   "transformer/ln_f"],
    notes=("lm_head is tied: FlaxGPT2LMHeadModule applies lm_head with "
           "transformer/wte/embedding.T, so no lm_head leaf exists and wte is used at BOTH "
           "ends. FlaxConv1D kernels are stored (out, in): c_attn (3*D, D), c_fc (4*D, D), "
           "mlp/c_proj (D, 4*D). Blocks under 'h' with digit-string keys; sorted flatten "
           "puts 'h' before 'ln_f' before 'wpe' before 'wte'."),
  )


def hf_vit() -> Zoo:
  """FlaxViTForImageClassification."""
  t = _transformers()
  config = t.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, image_size=8, patch_size=4, num_channels=3,
                       num_labels=3)
  model = t.FlaxViTForImageClassification(config, seed=0)
  pixels = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)  # NCHW
  return _hf_zoo(
    model, (pixels,), lambda m, p, x: m(x, params=p).logits,
    name="hf_vit",
    # FlaxViTEmbeddings: patch_embeddings/projection conv, prepend cls_token, add
    # position_embeddings; encoder layers; final 'layernorm'; classifier on token 0.
    forward_units=["vit/embeddings", "vit/encoder/layer/0", "vit/encoder/layer/1",
                   "vit/layernorm", "classifier"],
    notes=("vit/embeddings holds two raw leaves directly (cls_token (1,1,D), "
           "position_embeddings (1,1+P,D)) next to the patch_embeddings/projection conv. "
           "No pooler (add_pooling_layer=False). Inputs are NCHW; the model transposes. "
           "In-layer order is layernorm_before, attention, layernorm_after, intermediate, "
           "output. The final norm is called plain 'layernorm'."),
  )


class _JnpClipCompat:
  """``jax.numpy`` with the pre-0.5 ``clip(a_min=, a_max=)`` keywords (for Flax T5)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(x, a_min=None, a_max=None, **kwargs):
    kwargs.setdefault("min", a_min)
    kwargs.setdefault("max", a_max)
    return jnp.clip(x, **kwargs)


def hf_t5() -> Zoo:
  """FlaxT5ForConditionalGeneration (encoder-decoder, tied LM head)."""
  t = _transformers()
  from transformers.models.t5 import modeling_flax_t5

  # transformers 4.57's Flax T5 calls jnp.clip(x, a_max=...), which jax >= 0.10 rejects;
  # give that one module a jnp whose clip still takes those keywords.
  if not isinstance(modeling_flax_t5.jnp, _JnpClipCompat):
    modeling_flax_t5.jnp = _JnpClipCompat()
  config = t.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, vocab_size=50, relative_attention_num_buckets=8,
                      decoder_start_token_id=0)
  model = t.FlaxT5ForConditionalGeneration(config, seed=0)
  ids = np.array([[4, 9, 13, 1]], np.int32)
  dec = np.array([[0, 5, 8]], np.int32)
  return _hf_zoo(
    model, (ids, dec),
    lambda m, p, x, d: m(input_ids=x, decoder_input_ids=d, params=p).logits,
    name="hf_t5",
    # FlaxT5Module: encoder (shared embed -> blocks -> final_layer_norm) runs fully, then
    # the decoder (shared embed -> blocks with cross-attention -> final_layer_norm), then
    # the tied lm_head (shared.embedding.T after scaling by d_model**-0.5).
    forward_units=["shared", "encoder/block/0", "encoder/block/1", "encoder/final_layer_norm",
                   "decoder/block/0", "decoder/block/1", "decoder/final_layer_norm"],
    notes=("'shared' is registered at the top but used inside both stacks (embed_tokens) and "
           "as the tied lm_head: no lm_head leaf. Inside a block, 'layer/0', 'layer/1', "
           "'layer/2' are SUB-layers (self-attn, [cross-attn,] FFN), not blocks: the numbered "
           "unit is 'block/N'. relative_attention_bias exists only in block 0 of each stack "
           "but its bias is reused by every block. Norm params are 'weight', not 'scale'. "
           "Needs a jnp.clip(a_max=) shim on jax>=0.10 (applied to modeling_flax_t5 only). "
           "Sorted flatten: decoder < encoder < shared (decoder leaves come first)."),
  )


# --------------------------------------------------------------------------------------
# 2. Tunix NNX LLMs (google-tunix 0.1.7)
# --------------------------------------------------------------------------------------


def _tunix_module(name: str):
  """Imports ``tunix.<name>`` without running ``tunix/__init__.py`` (the trainer stack)."""
  if "tunix" not in sys.modules:
    try:
      spec = importlib.util.find_spec("tunix")
    except (ImportError, ValueError):
      spec = None
    if spec is None or not spec.submodule_search_locations:
      raise ImportError(
        "the tunix_* zoos need google-tunix: pip install --no-deps google-tunix==0.1.7 jaxtyping"
      )
    pkg = types.ModuleType("tunix")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["tunix"] = pkg
  import flax

  flag = flax.config.flax_always_shard_variable
  try:
    return importlib.import_module(f"tunix.{name}")
  except ImportError as e:
    raise ImportError(
      f"tunix.{name} does not import ({e}); install google-tunix==0.1.7 (--no-deps) + jaxtyping"
    ) from e
  finally:
    # tunix's model modules call env_utils.setup_sharding_environment() at import, which
    # turns flax_always_shard_variable off for the whole process; undo that.
    flax.config.update("flax_always_shard_variable", flag)


def _tunix_build(factory: Callable[[], Any]) -> Any:
  """Builds a tunix model with sharding annotations but no mesh (as tunix expects)."""
  import flax

  with flax.config.temp_flip_flag("always_shard_variable", False):
    return factory()


def _lm_inputs(seq: int = 4) -> tuple:
  tokens = jnp.array([[3, 7, 1, 9][:seq]], jnp.int32)
  positions = jnp.arange(seq, dtype=jnp.int32)[None]
  mask = jnp.tril(jnp.ones((1, seq, seq), bool))
  return tokens, positions, mask


_TUNIX_LM_NOTES = (
  "NNX State: layer keys are INTs (layers/0), leaves are nnx.Param Variables (paths end in "
  ".value) carrying sharding metadata. MLP gate/up/down kernels are zero-initialized by tunix "
  "(their gradients at init vanish). Sorted flatten puts final_norm BEFORE layers. "
  "apply returns logits (the model returns (logits, cache))."
)


def _tunix_llama3(tied: bool) -> Zoo:
  lm = _tunix_module("models.llama3.model")
  from flax import nnx

  config = lm.ModelConfig(num_layers=2, vocab_size=50, embed_dim=16, hidden_dim=32, num_heads=2,
                          head_dim=8, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-5,
                          weight_tying=tied)
  model = _tunix_build(lambda: lm.Llama3(config, rngs=nnx.Rngs(0)))
  head = [] if tied else ["lm_head"]
  return _nnx_zoo(
    model, _lm_inputs(),
    call=lambda m, tok, pos, mask: m(tok, pos, None, mask)[0],
    name="tunix_llama3_tied" if tied else "tunix_llama3",
    source="google-tunix 0.1.7 tunix.models.llama3.model.Llama3",
    # Llama3.__call__: embedder.encode, each DecoderLayer (input_layernorm, attn,
    # post_attention_layernorm, mlp), final_norm, then lm_head (or embedder.decode if tied).
    forward_units=["embedder", "layers/0", "layers/1", "final_norm", *head],
    notes=_TUNIX_LM_NOTES + (
      " weight_tying=True: no lm_head; embedder/input_embedding is also the output projection."
      if tied else " Attention einsum weights: q (D,N,H), k/v (D,K,H), o (N,H,D)."),
  )


def tunix_llama3() -> Zoo:
  """tunix Llama3, untied lm_head."""
  return _tunix_llama3(tied=False)


def tunix_llama3_tied() -> Zoo:
  """tunix Llama3 with weight_tying (Llama 3.2 style): no lm_head."""
  return _tunix_llama3(tied=True)


def _tunix_qwen3(moe: bool) -> Zoo:
  qm = _tunix_module("models.qwen3.model")
  from flax import nnx

  extra = {"num_experts": 2, "num_experts_per_tok": 1} if moe else {}
  config = qm.ModelConfig(num_layers=2, vocab_size=50, embed_dim=16, hidden_dim=32, num_heads=2,
                          head_dim=8, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6,
                          use_tied_embedding=False, **extra)
  model = _tunix_build(lambda: qm.Qwen3(config, rngs=nnx.Rngs(0)))
  return _nnx_zoo(
    model, _lm_inputs(),
    call=lambda m, tok, pos, mask: m(tok, pos, None, mask)[0],
    name="tunix_qwen3_moe" if moe else "tunix_qwen3",
    source="google-tunix 0.1.7 tunix.models.qwen3.model.Qwen3",
    # Qwen3.__call__: embedder.encode, DecoderLayers (input_layernorm, attn with q_norm /
    # k_norm, post_attention_layernorm, mlp or MoE), final_norm, lm_head.
    forward_units=["embedder", "layers/0", "layers/1", "final_norm", "lm_head"],
    notes=_TUNIX_LM_NOTES + (
      " MoE: layers/i/mlp/{gate_proj,up_proj,down_proj} are raw nnx.Params with a leading "
      "EXPERTS axis of 2 -- the same length as the number of layers (2) -- under an "
      "int-indexed layer, so they are NOT a layer stack; router is an nnx.Linear. On CPU "
      "the dense (non-megablox) expert path runs." if moe else
      " Attention has per-head q_norm/k_norm (w of shape (head_dim,))."),
  )


def tunix_qwen3() -> Zoo:
  """tunix Qwen3 (dense MLP). Its module imports TPU pallas kernels, which import on CPU."""
  return _tunix_qwen3(moe=False)


def tunix_qwen3_moe() -> Zoo:
  """tunix Qwen3 with a 2-expert MoE MLP (leading experts axis == number of layers)."""
  return _tunix_qwen3(moe=True)


def _gemma_config(gm):
  return gm.ModelConfig(
    num_layers=2, num_embed=50, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8,
    num_kv_heads=1, final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True,
    attention_types=(gm.AttentionType.LOCAL_SLIDING, gm.AttentionType.GLOBAL),
    attn_logits_soft_cap=50.0, sliding_window_size=4,
  )


_GEMMA_NOTES = (
  "Gemma-2 style config (post-attn / post-ffw norms, local+global attention, soft caps). "
  "The embedder is tied: embedder.encode at the input and embedder.decode for the logits; "
  "there is no lm_head. num_kv_heads=1 gives attn/q_einsum (N,D,H) and attn/kv_einsum "
  "(2,K,D,H) whose leading axis 2 equals the number of layers. RMSNorm 'scale' and the MLP "
  "kernels are zero-initialized. Layer order inside a block: pre_attention_norm, attn, "
  "post_attn_norm, pre_ffw_norm, mlp, post_ffw_norm (sorted order differs)."
)


def tunix_gemma() -> Zoo:
  """tunix Gemma (tied embedder, no lm_head)."""
  gm = _tunix_module("models.gemma.model")
  from flax import nnx

  model = _tunix_build(lambda: gm.Gemma(_gemma_config(gm), rngs=nnx.Rngs(0)))
  return _nnx_zoo(
    model, _lm_inputs(),
    call=lambda m, tok, pos, mask: m(tok, pos, None, mask)[0],
    name="tunix_gemma",
    source="google-tunix 0.1.7 tunix.models.gemma.model.Gemma",
    # Gemma.__call__: embedder.encode, layers in order, final_norm, embedder.decode.
    forward_units=["embedder", "layers/0", "layers/1", "final_norm"],
    notes=_GEMMA_NOTES,
  )


def tunix_gemma_score() -> Zoo:
  """tunix GemmaWithScoreHead: a reward model with a `score` head."""
  gm = _tunix_module("models.gemma.model")
  from flax import nnx

  def build():
    backbone = gm.Gemma(_gemma_config(gm), rngs=nnx.Rngs(0))
    return gm.GemmaWithScoreHead(backbone, rngs=nnx.Rngs(1))

  model = _tunix_build(build)
  return _nnx_zoo(
    model, _lm_inputs(),
    call=lambda m, tok, pos, mask: m(tok, pos, None, mask),
    name="tunix_gemma_score",
    source="google-tunix 0.1.7 tunix.models.gemma.model.GemmaWithScoreHead",
    # GemmaWithScoreHead.__call__: the whole Gemma forward (which sows the final-norm
    # hidden states), then score = Linear(D, 1) on them.
    forward_units=["transformer/embedder", "transformer/layers/0", "transformer/layers/1",
                   "transformer/final_norm", "score"],
    notes=(_GEMMA_NOTES + " The backbone sits under 'transformer'; the head 'score' is a "
           "top-level nnx.Linear(D, 1, use_bias=False) (only 'score/kernel'). The backbone "
           "still computes (unused) tied logits. Output: (B, T, 1) per-token scores."),
  )


# --------------------------------------------------------------------------------------
# 3. big_vision-style ViT (Linen), unrolled and scanned; a scanned 'encoder' stack
# --------------------------------------------------------------------------------------


@functools.cache
def _bv_vit_module():
  """big_vision models/vit.py, reduced to what the names need (no MAP head, no rep_size)."""
  import flax.linen as nn

  class MlpBlock(nn.Module):
    mlp_dim: int | None = None
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic=True):
      inits = {"kernel_init": nn.initializers.xavier_uniform(),
               "bias_init": nn.initializers.normal(stddev=1e-6)}
      d = x.shape[-1]
      x = nn.Dense(self.mlp_dim or 4 * d, **inits)(x)
      x = nn.gelu(x)
      x = nn.Dropout(rate=self.dropout)(x, deterministic)
      return nn.Dense(d, **inits)(x)

  class Encoder1DBlock(nn.Module):
    mlp_dim: int | None = None
    num_heads: int = 12
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic=True):
      out = {}
      y = nn.LayerNorm()(x)
      y = out["sa"] = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic)(y, y)
      y = nn.Dropout(rate=self.dropout)(y, deterministic)
      x = out["+sa"] = x + y
      y = nn.LayerNorm()(x)
      y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout)(y, deterministic)
      y = nn.Dropout(rate=self.dropout)(y, deterministic)
      x = out["+mlp"] = x + y
      return x, out

  class Encoder(nn.Module):
    depth: int
    mlp_dim: int | None = None
    num_heads: int = 12
    dropout: float = 0.0
    scan: bool = False

    @nn.compact
    def __call__(self, x, deterministic=True):
      kw = {"mlp_dim": self.mlp_dim, "num_heads": self.num_heads, "dropout": self.dropout}
      if self.scan:
        block = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,))
        x, _ = nn.scan(block, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=self.depth)(
          name="encoderblock", **kw)(x, deterministic)
      else:
        for lyr in range(self.depth):
          x, _ = Encoder1DBlock(name=f"encoderblock_{lyr}", **kw)(x, deterministic)
      return nn.LayerNorm(name="encoder_norm")(x)

  class ViT(nn.Module):
    num_classes: int
    patch_size: tuple = (4, 4)
    width: int = 16
    depth: int = 2
    mlp_dim: int | None = 32
    num_heads: int = 2
    pool_type: str = "tok"
    head_zeroinit: bool = False  # big_vision's default is True; zeros would kill all grads
    scan: bool = False

    @nn.compact
    def __call__(self, image, *, train=False):
      x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                  name="embedding")(image)
      n, h, w, c = x.shape
      x = jnp.reshape(x, [n, h * w, c])
      # get_posemb(self, "learn", ...): added BEFORE the cls token is prepended.
      x = x + self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)),
                         (1, h * w, c), x.dtype)
      if self.pool_type == "tok":
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
        x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
      x = nn.Dropout(rate=0.0)(x, not train)
      x = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                  scan=self.scan, name="Transformer")(x, deterministic=not train)
      x = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      return nn.Dense(self.num_classes, name="head", **kw)(x)

  return ViT


_BV_NOTES = (
  "Written here after big_vision models/vit.py (not a pip package): same module names and "
  "call order. pos_embedding is ADDED BEFORE cls is prepended, so the forward order is "
  "embedding, pos_embedding, cls (definition order == forward order). Sorted flatten: "
  "'Transformer' (uppercase) < 'cls' < 'embedding' < 'head' < 'pos_embedding', and inside "
  "Transformer 'encoder_norm' < 'encoderblock_0' ('_' < 'b'), so the final norm flattens "
  "BEFORE the blocks. Block internals are auto-named (LayerNorm_0, "
  "MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0/Dense_0, Dense_1): their numbers "
  "are sub-module counters, not layer numbers. MHA kernels: query/key/value (D, heads, hd), "
  "out (heads, hd, D). head_zeroinit=False (big_vision default True)."
)


def bv_vit() -> Zoo:
  """big_vision ViT-style Linen model, unrolled blocks Transformer/encoderblock_{i}."""
  vit = _bv_vit_module()(num_classes=3, depth=2)
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  return _linen_zoo(
    vit, (image,), name="bv_vit", source="hand-written after big_vision models/vit.py",
    forward_units=["embedding", "pos_embedding", "cls", "Transformer/encoderblock_0",
                   "Transformer/encoderblock_1", "Transformer/encoder_norm", "head"],
    notes=_BV_NOTES + " Top-level 'cls' and 'pos_embedding' are raw leaves, not modules.",
  )


def bv_vit_scan() -> Zoo:
  """big_vision ViT with scan=True: one nn.scan stack Transformer/encoderblock (axis 0 = L)."""
  depth = 3
  vit = _bv_vit_module()(num_classes=3, depth=depth, scan=True, num_heads=3, width=24,
                         mlp_dim=48)
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  return _linen_zoo(
    vit, (image,), name="bv_vit_scan",
    source="hand-written after big_vision models/vit.py (scan=True)",
    forward_units=["embedding", "pos_embedding", "cls",
                   f"Transformer/encoderblock [stacked {depth}]", "Transformer/encoder_norm",
                   "head"],
    notes=_BV_NOTES + (
      f" scan=True: nn.scan(nn.remat(Encoder1DBlock)) named 'encoderblock'; every leaf under "
      f"it has a leading layer axis of {depth}. num_heads={depth} too, so axes COINCIDE: "
      f"out/kernel is ({depth}, heads={depth}, hd, D) and query/key/value bias "
      f"({depth}, heads={depth}, hd) -- shapes alone cannot tell which axis is the layer "
      "axis. No index key under the stack."),
  )


@functools.cache
def _linen_scan_encoder_module():
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = x.shape[-1]
      y = nn.LayerNorm()(x)
      y = nn.Dense(2 * d)(y)
      y = nn.Dense(d)(nn.gelu(y))
      return x + y, None

  class ScannedEncoder(nn.Module):
    vocab: int = 50
    width: int = 16
    depth: int = 3
    num_classes: int = 4

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.depth)(name="encoder")(x)
      x = nn.LayerNorm(name="final_norm")(x)
      return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))

  return ScannedEncoder


def linen_scan_encoder() -> Zoo:
  """Linen text classifier whose blocks are one nn.scan stack named `encoder`."""
  depth = 3
  module = _linen_scan_encoder_module()(depth=depth)
  tokens = jnp.array([[1, 4, 9, 2, 7]], jnp.int32)
  return _linen_zoo(
    module, (tokens,), name="linen_scan_encoder", source="hand-written (flax.linen nn.scan)",
    # embed -> scanned blocks -> final_norm -> mean pool -> head.
    forward_units=["embed", f"encoder [stacked {depth}]", "final_norm", "head"],
    notes=(f"'encoder' is an nn.scan over Block (variable_axes params=0, length {depth}); its "
           "leaves (encoder/LayerNorm_0, encoder/Dense_0, encoder/Dense_1) have a leading "
           f"layer axis of {depth} and auto-numbered names inside the stack. The stack name "
           "'encoder' is not a conventional stack name (layers/blocks/scan...). Sorted "
           "flatten: embed < encoder < final_norm < head (matches forward by luck)."),
  )


# --------------------------------------------------------------------------------------
# 4. ResNet-style NNX model
# --------------------------------------------------------------------------------------


@functools.cache
def _nnx_resnet_classes():
  from flax import nnx

  class Stem(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
      self.conv = nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.bn(self.conv(x)))

  class BasicBlock(nnx.Module):
    def __init__(self, cin, cout, stride, *, rngs):
      self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
      self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
      if stride != 1 or cin != cout:  # torchvision: downsample = Sequential(conv1x1, bn)
        self.downsample = nnx.Sequential(
          nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs),
          nnx.BatchNorm(cout, rngs=rngs))
      else:
        self.downsample = None

    def __call__(self, x):
      identity = x
      out = nnx.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      if self.downsample is not None:
        identity = self.downsample(x)
      return nnx.relu(out + identity)

  class ResNet(nnx.Module):
    def __init__(self, num_classes=5, *, rngs):
      self.stem = Stem(3, 8, rngs=rngs)
      self.stage1_block0 = BasicBlock(8, 8, 1, rngs=rngs)
      self.stage1_block1 = BasicBlock(8, 8, 1, rngs=rngs)
      self.stage2_block0 = BasicBlock(8, 16, 2, rngs=rngs)
      self.stage2_block1 = BasicBlock(16, 16, 1, rngs=rngs)
      self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
      x = self.stem(x)
      x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      x = self.stage1_block1(self.stage1_block0(x))
      x = self.stage2_block1(self.stage2_block0(x))
      return self.fc(jnp.mean(x, axis=(1, 2)))

  return ResNet


def nnx_resnet() -> Zoo:
  """ResNet-style NNX model: stem, stage{s}_block{b} (downsample in stage2_block0), fc."""
  from flax import nnx

  model = _nnx_resnet_classes()(rngs=nnx.Rngs(0))
  model.eval()  # BatchNorm uses running averages; batch stats stay out of params
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  return _nnx_zoo(
    model, (image,), name="nnx_resnet", source="hand-written (flax.nnx)",
    forward_units=["stem", "stage1_block0", "stage1_block1", "stage2_block0", "stage2_block1",
                   "fc"],
    notes=("Block names carry TWO numbers (stage1_block0): the stage is part of the name, "
           "so 'stage1_block*' and 'stage2_block*' are different numbered groups. "
           "stage2_block0/downsample is an nnx.Sequential, so its leaves sit under INT keys "
           "(downsample/layers/0/kernel, downsample/layers/1/{scale,bias}) inside a block; "
           "downsample is applied after conv2/bn2 in the block's forward. BatchNorm mean/var "
           "are nnx.BatchStat (not in params); the model is in eval() mode. Sorted flatten: "
           "fc < stage1_* < stage2_* < stem (fc first, stem last)."),
  )


# --------------------------------------------------------------------------------------
# 5. NNX: Flax's MNIST CNN, conv/bn/fc/head, nnx.List layers, nnx.vmap stack
# --------------------------------------------------------------------------------------


@functools.cache
def _nnx_small_classes():
  from flax import nnx

  class CNN(nnx.Module):
    """Flax's NNX MNIST tutorial CNN (channels shrunk)."""

    def __init__(self, *, rngs):
      self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
      self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
      self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
      self.linear1 = nnx.Linear(2 * 2 * 8, 16, rngs=rngs)
      self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      x = self.avg_pool(nnx.relu(self.conv1(x)))
      x = self.avg_pool(nnx.relu(self.conv2(x)))
      x = x.reshape(x.shape[0], -1)
      x = nnx.relu(self.linear1(x))
      return self.linear2(x)

  class ConvBnHead(nnx.Module):
    def __init__(self, *, rngs):
      self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.bn1 = nnx.BatchNorm(8, rngs=rngs)
      self.fc1 = nnx.Linear(8, 16, rngs=rngs)
      self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      x = jnp.mean(x, axis=(1, 2))
      return self.head(nnx.relu(self.fc1(x)))

  class ListMLP(nnx.Module):
    def __init__(self, sizes, *, rngs):
      self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

    def __call__(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x)
        if i < len(self.layers) - 1:
          x = nnx.relu(x)
      return x

  class Block(nnx.Module):
    def __init__(self, dim, *, rngs):
      self.linear = nnx.Linear(dim, dim, rngs=rngs)
      self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x):
      return x + nnx.gelu(self.linear(self.norm(x)))

  class VmapStack(nnx.Module):
    """Flax's 'scan over layers' pattern: blocks created by nnx.vmap, run by nnx.scan."""

    def __init__(self, din, dim, num_layers, dout, *, rngs):
      self.embed = nnx.Linear(din, dim, rngs=rngs)

      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create_block(rngs):
        return Block(dim, rngs=rngs)

      self.blocks = create_block(rngs)
      self.head = nnx.Linear(dim, dout, rngs=rngs)

    def __call__(self, x):
      x = self.embed(x)

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(x, block):
        return block(x)

      x = forward(x, self.blocks)
      return self.head(x)

  return CNN, ConvBnHead, ListMLP, VmapStack


def nnx_mnist_cnn() -> Zoo:
  """Flax's NNX MNIST CNN naming: conv1, conv2, linear1, linear2 (avg_pool between)."""
  from flax import nnx

  cnn = _nnx_small_classes()[0]
  model = cnn(rngs=nnx.Rngs(0))
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
  return _nnx_zoo(
    model, (image,), name="nnx_mnist_cnn", source="flax NNX MNIST tutorial CNN (shrunk)",
    forward_units=["conv1", "conv2", "linear1", "linear2"],
    notes=("Two numbered groups, conv1..2 then linear1..2: numbers restart per group, so "
           "'linear1' comes after 'conv2'. avg_pool is a functools.partial attribute (static, "
           "no params). Sorted flatten happens to match forward order."),
  )


def nnx_conv_bn_head() -> Zoo:
  """NNX model conv1, bn1, fc1, head."""
  from flax import nnx

  model = _nnx_small_classes()[1](rngs=nnx.Rngs(0))
  model.eval()
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  return _nnx_zoo(
    model, (image,), name="nnx_conv_bn_head", source="hand-written (flax.nnx)",
    forward_units=["conv1", "bn1", "fc1", "head"],
    notes=("conv1, bn1 and fc1 all carry the number 1 but are three different layers; "
           "bn1's mean/var are BatchStat (not params); eval() mode. Sorted flatten: "
           "bn1 < conv1 < fc1 < head (bn before conv)."),
  )


def nnx_list_mlp(num_layers: int = 3) -> Zoo:
  """NNX MLP whose layers are an nnx.List: layers/0, layers/1, ..."""
  from flax import nnx

  sizes = [6] + [8] * (num_layers - 1) + [3]
  model = _nnx_small_classes()[2](sizes, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6)), jnp.float32)
  return _nnx_zoo(
    model, (x,), name="nnx_list_mlp" if num_layers == 3 else f"nnx_list_mlp_{num_layers}",
    source="hand-written (flax.nnx.List)",
    forward_units=[f"layers/{i}" for i in range(num_layers)],
    notes=("Only a layer list: no embedding or head names; the last Linear is the output "
           "layer. nnx.List indices are INT keys (DictKey(0) in the State), sorted "
           "numerically by jax.tree (0, 1, 2, ..., 10), unlike HF's digit strings."),
  )


def nnx_vmap_stack() -> Zoo:
  """NNX model with an nnx.vmap-created block stack `blocks` (leading layer axis)."""
  from flax import nnx

  num_layers = 3
  model = _nnx_small_classes()[3](6, 8, num_layers, 3, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6)), jnp.float32)
  return _nnx_zoo(
    model, (x,), name="nnx_vmap_stack", source="flax 'scan over layers' pattern (nnx.vmap)",
    forward_units=["embed", f"blocks [stacked {num_layers}]", "head"],
    notes=(f"'blocks' is ONE Block module whose every Param has a leading layer axis of "
           f"{num_layers} (blocks/linear/kernel ({num_layers}, 8, 8), blocks/norm/scale "
           f"({num_layers}, 8)); the forward runs it with nnx.scan. No index keys under it. "
           "Sorted flatten: blocks < embed < head (the stack flattens first)."),
  )


# --------------------------------------------------------------------------------------
# 6. Linen auto-named CNNs
# --------------------------------------------------------------------------------------


@functools.cache
def _linen_cnn_classes():
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
      x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), strides=(2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(10, name="head")(x)

  class CNNBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = nn.Conv(8, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = jnp.mean(x, axis=(1, 2))
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(10, name="head")(x)

  return CNN, CNNBatchNorm


def linen_cnn() -> Zoo:
  """Linen auto-named CNN: Conv_0, Conv_1, Dense_0, head."""
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
  return _linen_zoo(
    _linen_cnn_classes()[0](), (image,), name="linen_cnn", source="hand-written (flax.linen)",
    forward_units=["Conv_0", "Conv_1", "Dense_0", "head"],
    notes=("Auto-names number modules per CLASS (Conv_0, Conv_1, Dense_0): Dense_0 comes after "
           "Conv_1 although its number is lower. params = init(...)['params'] (no 'params' "
           "key in the tree); a plain dict in creation order."),
  )


def linen_cnn_bn() -> Zoo:
  """Linen CNN with BatchNorm: Conv_0, BatchNorm_0, Conv_1, BatchNorm_1, Dense_0, head."""
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  return _linen_zoo(
    _linen_cnn_classes()[1](), (image,), name="linen_cnn_bn",
    source="hand-written (flax.linen)",
    forward_units=["Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "Dense_0", "head"],
    notes=("Interleaved per-class counters: Conv_0, BatchNorm_0, Conv_1, BatchNorm_1 -- layer "
           "k of one class is not layer k of the model. batch_stats live in their own "
           "collection (kept out of params; apply uses running averages). Sorted flatten: "
           "BatchNorm_0 < BatchNorm_1 < Conv_0 < Conv_1 < Dense_0 < head."),
  )


# --------------------------------------------------------------------------------------
# 7. Multi-tower vision-language model as a plain dict
# --------------------------------------------------------------------------------------


def _dense_init(key, din, dout, bias=True):
  p = {"kernel": jax.random.normal(key, (din, dout), jnp.float32) / np.sqrt(din)}
  if bias:
    p["bias"] = jnp.zeros((dout,), jnp.float32)
  return p


def _layer_norm(p, x, eps=1e-6):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.var(x, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _rms_norm(p, x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * p["scale"]


def _attention(p, x, causal):
  q, k, v = x @ p["q"]["kernel"], x @ p["k"]["kernel"], x @ p["v"]["kernel"]
  logits = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  if causal:
    t = x.shape[-2]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  return jax.nn.softmax(logits, -1) @ v @ p["o"]["kernel"]


def multitower_vlm() -> Zoo:
  """Plain-dict VLM: vision tower feeding a text decoder; text embedding looked up first."""
  d, vocab, patch, n_vis, n_txt = 16, 40, 4, 2, 2
  keys = iter(jax.random.split(jax.random.key(0), 64))

  def attn_init():
    return {n: _dense_init(next(keys), d, d, bias=False) for n in ("q", "k", "v", "o")}

  vision = {
    "patch_embed": _dense_init(next(keys), patch * patch * 3, d),
    "blocks": [
      {"norm1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)}, "attn": attn_init(),
       "norm2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
       "mlp": {"fc1": _dense_init(next(keys), d, 2 * d), "fc2": _dense_init(next(keys), 2 * d, d)}}
      for _ in range(n_vis)],
    "norm": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
  }
  text = {
    "embed": {"embedding": jax.random.normal(next(keys), (vocab, d)) * 0.02},
    "layers": [
      {"attn_norm": {"scale": jnp.ones(d)}, "attn": attn_init(),
       "mlp_norm": {"scale": jnp.ones(d)},
       "mlp": {"gate": _dense_init(next(keys), d, 2 * d, bias=False),
               "up": _dense_init(next(keys), d, 2 * d, bias=False),
               "down": _dense_init(next(keys), 2 * d, d, bias=False)}}
      for _ in range(n_txt)],
    "final_norm": {"scale": jnp.ones(d)},
    "lm_head": {"kernel": jax.random.normal(next(keys), (d, vocab)) / np.sqrt(d)},
  }
  params = {"vision": vision, "text": text}

  def apply(p, image, tokens):
    v, t = p["vision"], p["text"]
    # 1. token embeddings first (as HF LLaVA: inputs_embeds = embed_tokens(input_ids)) ...
    txt = t["embed"]["embedding"][tokens]
    # 2. ... then the vision tower ...
    n, h, w, c = image.shape
    x = image.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // patch) * (w // patch), patch * patch * c)
    x = x @ v["patch_embed"]["kernel"] + v["patch_embed"]["bias"]
    for blk in v["blocks"]:
      x = x + _attention(blk["attn"], _layer_norm(blk["norm1"], x), causal=False)
      y = _layer_norm(blk["norm2"], x) @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
      x = x + jax.nn.gelu(y) @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
    img = _layer_norm(v["norm"], x)
    # 3. ... image tokens placed before the text tokens, then the text decoder.
    x = jnp.concatenate([img, txt], axis=1)
    for layer in t["layers"]:
      x = x + _attention(layer["attn"], _rms_norm(layer["attn_norm"], x), causal=True)
      y = _rms_norm(layer["mlp_norm"], x)
      m = layer["mlp"]
      x = x + (jax.nn.silu(y @ m["gate"]["kernel"]) * (y @ m["up"]["kernel"])) @ m["down"]["kernel"]
    x = _rms_norm(t["final_norm"], x)
    return x @ t["lm_head"]["kernel"]

  image = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 3)), jnp.float32)
  tokens = jnp.array([[3, 17, 5]], jnp.int32)
  return Zoo(
    name="multitower_vlm", params=params, apply=apply, inputs=(image, tokens),
    source="hand-written (plain dict + jax.numpy)",
    forward_units=["text/embed", "vision/patch_embed", "vision/blocks/0", "vision/blocks/1",
                   "vision/norm", "text/layers/0", "text/layers/1", "text/final_norm",
                   "text/lm_head"],
    notes=("Forward order interleaves the towers: text/embed (looked up FIRST), then the whole "
           "vision tower, then the text layers. So neither tower is contiguous in depth by "
           "top-level key; insertion order is vision-then-text and sorted flatten is "
           "text-then-vision, and NEITHER equals the forward order. vision/blocks and "
           "text/layers are Python LISTS (SequenceKey paths, index 0, 1). Both towers have a "
           "final norm ('vision/norm' mid-network, 'text/final_norm' at the end); only "
           "vision/norm is a mid-depth 'norm'."),
  )


# --------------------------------------------------------------------------------------
# 8. Trees with no layer structure
# --------------------------------------------------------------------------------------

_FLAT_NOTES = ("A single module: one unit '' (the root prefix) covers every leaf; there is no "
               "layer order to recover.")


def plain_wb() -> Zoo:
  """{'w': (4, 3), 'b': (3,)}; apply = x @ w + b."""
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.zeros((3,))}
  x = jnp.ones((2, 4))
  return Zoo(name="plain_wb", params=params, apply=lambda p, x: x @ p["w"] + p["b"],
             inputs=(x,), forward_units=[""], source="hand-written (plain dict)",
             notes=_FLAT_NOTES + " Neither 'w' nor 'b' says 'kernel'/'bias'.")


def linen_dense() -> Zoo:
  """One flax.linen Dense: {'kernel', 'bias'}."""
  import flax.linen as nn

  return _linen_zoo(nn.Dense(3), (jnp.ones((2, 4)),), name="linen_dense",
                    source="flax.linen.Dense", forward_units=[""], notes=_FLAT_NOTES)


def nnx_linear() -> Zoo:
  """One nnx.Linear: State {'kernel', 'bias'} of nnx.Param."""
  from flax import nnx

  return _nnx_zoo(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), (jnp.ones((2, 4)),), name="nnx_linear",
                  source="flax.nnx.Linear", forward_units=[""], notes=_FLAT_NOTES)


def nnx_lora() -> Zoo:
  """An nnx.LoRA module's state: {'lora_a' (in, r), 'lora_b' (r, out)} as nnx.LoRAParam."""
  from flax import nnx

  return _nnx_zoo(nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(0)), (jnp.ones((2, 4)),), name="nnx_lora",
                  source="flax.nnx.LoRA", forward_units=[""],
                  notes=_FLAT_NOTES + (" Leaves are nnx.LoRAParam (a Param subclass, so "
                                       "nnx.state(m, nnx.Param) includes them); lora_b is "
                                       "zero-initialized, so the output is 0 at init."))


def bare_array() -> Zoo:
  """A bare array as the whole tree (path ())."""
  params = jnp.linspace(0.5, 1.5, 4)
  return Zoo(name="bare_array", params=params, apply=lambda p, x: x * p,
             inputs=(jnp.ones((2, 4)),), forward_units=[""], source="hand-written",
             notes=_FLAT_NOTES + " The only leaf has the empty path.")


# --------------------------------------------------------------------------------------


def all_zoos() -> dict[str, Callable[[], Zoo]]:
  """Every zoo builder by name (hf_* and tunix_* raise ImportError without their package)."""
  return {
    "hf_bert": hf_bert,
    "hf_bert_12": functools.partial(hf_bert, num_layers=12, hidden=8),
    "hf_roberta": hf_roberta,
    "hf_gpt2": hf_gpt2,
    "hf_vit": hf_vit,
    "hf_t5": hf_t5,
    "tunix_llama3": tunix_llama3,
    "tunix_llama3_tied": tunix_llama3_tied,
    "tunix_qwen3": tunix_qwen3,
    "tunix_qwen3_moe": tunix_qwen3_moe,
    "tunix_gemma": tunix_gemma,
    "tunix_gemma_score": tunix_gemma_score,
    "bv_vit": bv_vit,
    "bv_vit_scan": bv_vit_scan,
    "linen_scan_encoder": linen_scan_encoder,
    "nnx_resnet": nnx_resnet,
    "nnx_mnist_cnn": nnx_mnist_cnn,
    "nnx_conv_bn_head": nnx_conv_bn_head,
    "nnx_list_mlp": nnx_list_mlp,
    "nnx_list_mlp_12": functools.partial(nnx_list_mlp, num_layers=12),
    "nnx_vmap_stack": nnx_vmap_stack,
    "linen_cnn": linen_cnn,
    "linen_cnn_bn": linen_cnn_bn,
    "multitower_vlm": multitower_vlm,
    "plain_wb": plain_wb,
    "linen_dense": linen_dense,
    "nnx_linear": nnx_linear,
    "nnx_lora": nnx_lora,
    "bare_array": bare_array,
  }


OPTIONAL_PREFIXES: Sequence[str] = ("hf_", "tunix_")  # zoos that need packages beyond pyproject
