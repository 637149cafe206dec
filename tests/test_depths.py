"""layer_depths: the naming rules, real model zoos, forward order, patterns and key-order freedom.

Expected depths come from hand-written unit sequences (``tests/_zoo.py``: each
model's units in true forward order, read from its source) and the documented
convention (input-side names at one level share a depth, so do the final
norm/pooler/heads at one level; a stacked subtree is one depth per slice).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualopt_jax as dj
from dualopt_jax import _paths
from tests import _zoo

# Units that share one depth by the convention above, per zoo.
TIES: dict[str, list[set[str]]] = {
  "hf_gpt2": [{"transformer/wte", "transformer/wpe"}],
  "tunix_llama3": [{"final_norm", "lm_head"}],
  "tunix_qwen3": [{"final_norm", "lm_head"}],
  "tunix_qwen3_moe": [{"final_norm", "lm_head"}],
  "bv_vit": [{"embedding", "pos_embedding", "cls"}],
  "bv_vit_scan": [{"embedding", "pos_embedding", "cls"}],
  "linen_scan_encoder": [{"final_norm", "head"}],
  "nnx_conv_bn_head": [{"conv1", "bn1"}],
  "linen_cnn_bn": [{"Conv_0", "BatchNorm_0"}, {"Conv_1", "BatchNorm_1"}],
  "multitower_vlm": [{"text/final_norm", "text/lm_head"}],
}
# Models whose names do not say the order of their towers: they need the forward order.
NEEDS_FORWARD = {"multitower_vlm": ["'text'", "'vision'"]}
ZOOS = list(_zoo.all_zoos())


@pytest.fixture(scope="module")
def zoos() -> dict[str, _zoo.Zoo]:
  return {}


def _zoo_named(zoos: dict, name: str) -> _zoo.Zoo:
  if name not in zoos:
    zoos[name] = _zoo.load_or_skip(name)
  return zoos[name]


def _by_hand(zoo: _zoo.Zoo) -> dict[str, list[float]]:
  """Depth(s) of every forward unit from the unit sequence and the ties, by counting slots."""
  ties = TIES.get(zoo.name, [])
  slots: list[list[str]] = []
  for unit, (_, length) in zip(zoo.forward_units, zoo.units, strict=True):
    tie = next((t for t in ties if unit in t), None)
    if tie is not None and slots and slots[-1][0] in tie:
      slots[-1].append(unit)
    else:
      slots.extend([[unit]] * (length or 1))
  n = max(len(slots) - 1, 1)
  out: dict[str, list[float]] = {}
  for k, members in enumerate(slots):
    for unit in dict.fromkeys(members):
      out.setdefault(unit, []).append(k / n)
  return out


def _unit_of(zoo: _zoo.Zoo, path: _paths.Path) -> str:
  keys = tuple(str(k) for k in path)
  for unit, (prefix, _) in zip(zoo.forward_units, zoo.units, strict=True):
    if keys[: len(prefix)] == prefix:
      return unit
  raise AssertionError(f"{zoo.name}: {path} under no unit")


def _check_against_units(zoo: _zoo.Zoo, table: dict) -> None:
  want = _by_hand(zoo)
  assert set(map(_paths.path_str, table)) == {
    _paths.path_str(p) for p, _ in _paths.present_leaves(zoo.params)
  }
  for path, depth in table.items():
    unit = _unit_of(zoo, path)
    got = np.ravel(np.asarray(depth, np.float64))
    np.testing.assert_allclose(got, want[unit], rtol=1e-6, atol=1e-7,
                               err_msg=f"{zoo.name}: {_paths.path_str(path)} (unit {unit})")


# --- real model zoos --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOOS)
def test_zoo_block_depths_from_names(zoos, name: str) -> None:
  zoo = _zoo_named(zoos, name)
  if name in NEEDS_FORWARD:
    with pytest.raises(ValueError, match="do not say in which order") as e:
      dj.layer_depths(zoo.params)
    message = str(e.value)
    assert all(g in message for g in NEEDS_FORWARD[name]) and "dj.forward_order(" in message
    return
  _check_against_units(zoo, _table(zoo.params))


@pytest.mark.parametrize("name", ZOOS)
def test_zoo_block_depths_from_the_forward_order(zoos, name: str) -> None:
  zoo = _zoo_named(zoos, name)
  order = dj.forward_order(zoo.apply, zoo.params, *zoo.inputs)
  _check_against_units(zoo, _table(zoo.params, order=order))


@pytest.mark.parametrize("name", ZOOS)
def test_zoo_tensor_depths_from_the_forward_order(zoos, name: str) -> None:
  """One index per tensor (per slice of a stacked one), units in forward order."""
  zoo = _zoo_named(zoos, name)
  order = dj.forward_order(zoo.apply, zoo.params, *zoo.inputs)
  table = _table(zoo.params, granularity="tensor", order=order)
  values = np.sort(np.concatenate([np.ravel(v) for v in table.values()]))
  n = len(values)
  np.testing.assert_allclose(values, np.arange(n) / max(n - 1, 1), atol=1e-6)
  rank = {u: i for i, u in enumerate(zoo.forward_units)}
  spans: dict[str, list[float]] = {}
  for path, depth in table.items():
    spans.setdefault(_unit_of(zoo, path), []).extend(np.ravel(depth).tolist())
  ordered = sorted(spans, key=rank.__getitem__)
  for a, b in zip(ordered, ordered[1:], strict=False):
    assert max(spans[a]) < min(spans[b]), f"{name}: {a} overlaps {b}"


def _table(params, **kwargs) -> dict:
  from dualopt_jax import _depths

  return _depths.depth_table(params, **kwargs)


@pytest.mark.parametrize("name", ["linen_cnn", "hf_bert_12", "nnx_resnet", "bv_vit_scan",
                                  "tunix_llama3", "hf_t5"])
def test_zoo_depths_do_not_depend_on_the_trees_wrapping(zoos, name: str) -> None:
  """Sorted keys, reversed insertion order, ShapeDtypeStructs, a msgpack round trip: same depths."""
  from flax import serialization

  zoo = _zoo_named(zoos, name)
  want = _table(zoo.params)
  pure = _pure(zoo.params)
  variants = {
    "sorted": jax.tree.map(lambda x: x, zoo.params),
    "reversed": _reversed(pure),
    "structs": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure),
    "msgpack": serialization.msgpack_restore(serialization.msgpack_serialize(pure)),
    "device_put": jax.device_put(pure),
  }
  for label, tree in variants.items():
    got = _table(tree)
    got = {_canonical(p): v for p, v in got.items()}
    assert set(got) == {_canonical(p) for p in want}, label
    for path, depth in want.items():
      np.testing.assert_array_equal(np.asarray(got[_canonical(path)]), np.asarray(depth),
                                    err_msg=f"{label}: {_paths.path_str(path)}")


def _pure(tree):
  """Plain nested dicts of arrays (NNX Variables unwrapped, int keys as strings)."""
  from flax import nnx

  tree = jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))

  def walk(node):
    if hasattr(node, "items"):
      return {str(k): walk(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return {str(i): walk(v) for i, v in enumerate(node)}
    return node

  return walk(tree)


def _reversed(tree):
  if isinstance(tree, dict):
    return {k: _reversed(tree[k]) for k in reversed(list(tree))}
  return tree


def _canonical(path) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


# --- the naming rules on small trees ------------------------------------------------------------


def _w(*shape):
  return jnp.ones(shape or (2,))


def _depths(params, **kwargs) -> dict[str, object]:
  return {_paths.path_str(p): v for p, v in _paths.leaves_with_paths(dj.layer_depths(params,
                                                                                     **kwargs))}


def test_numbers_compare_as_numbers_and_digit_strings_are_block_numbers() -> None:
  params = {"h": {str(i): {"kernel": _w(4, 4), "bias": _w(4)} for i in (0, 2, 10)}}
  got = _depths(params)
  assert got["h/0/kernel"] == 0.0 and got["h/2/bias"] == 0.5 and got["h/10/kernel"] == 1.0


def test_shared_leading_dimensions_are_not_a_stack() -> None:
  """HF-style modules whose tensors share a leading dim (pooler 768x768 + 768) are one block."""
  params = {"encoder": {"layer": {"0": {"dense": {"kernel": _w(6, 6), "bias": _w(6)}}}},
            "pooler": {"dense": {"kernel": _w(6, 6), "bias": _w(6)}}}
  got = _depths(params)
  assert got == {"encoder/layer/0/dense/bias": 0.0, "encoder/layer/0/dense/kernel": 0.0,
                 "pooler/dense/bias": 1.0, "pooler/dense/kernel": 1.0}
  # A DenseGeneral bias (heads, head_dim) matches its kernel's trailing dims: not a layer axis,
  # even when the model width equals the number of heads.
  attn = {"query": {"kernel": _w(3, 3, 2), "bias": _w(3, 2)}}
  assert _depths({"attn": attn, "head": {"kernel": _w(2, 2)}})["attn/query/bias"] == 0.0


@pytest.mark.parametrize("name", ["cls_head", "pose_head", "token_classifier", "lm_head",
                                  "score", "unembed", "classifier"])
def test_heads_come_last_even_when_their_name_looks_like_an_embedding(name: str) -> None:
  params = {"embed": {"embedding": _w(5, 2)}, "layers": {"0": {"w": _w()}, "1": {"w": _w()}},
            name: {"kernel": _w(2, 2)}}
  assert _depths(params)[f"{name}/kernel"] == 1.0


def test_a_final_norm_ends_its_own_tower_not_the_model() -> None:
  params = {"shared": {"embedding": _w(5, 2)},
            "encoder": {"block": {"0": {"w": _w()}}, "final_layer_norm": {"weight": _w()}},
            "decoder": {"block": {"0": {"w": _w()}}, "final_layer_norm": {"weight": _w()}},
            "lm_head": {"kernel": _w(2, 5)}}
  got = _depths(params)
  assert got["encoder/final_layer_norm/weight"] == pytest.approx(2 / 5)
  assert got["decoder/block/0/w"] == pytest.approx(3 / 5)
  assert got["decoder/final_layer_norm/weight"] == pytest.approx(4 / 5)


@pytest.mark.parametrize("final", ["layernorm", "encoder_norm", "ln_f", "norm", "final_proj"])
def test_final_norm_names(final: str) -> None:
  params = {"embeddings": {"w": _w()}, "layer": {"0": {"w": _w()}}, final: {"scale": _w()}}
  assert _depths(params)[f"{final}/scale"] == 1.0


def test_pre_norm_stays_on_the_input_side() -> None:
  params = {"embeddings": {"w": _w()}, "pre_layrnorm": {"scale": _w()},
            "layers": {"0": {"w": _w()}}, "post_layernorm": {"scale": _w()}}
  got = _depths(params)
  assert got["pre_layrnorm/scale"] == 0.0 and got["post_layernorm/scale"] == 1.0


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(x.shape[-1], use_bias=False)(x), None


@pytest.mark.parametrize("stack_name", ["encoder", "blocks", "ScanLayer_0"])
def test_scan_stacks_by_name_when_no_bias_carries_the_layer_axis(stack_name: str) -> None:
  """A bias-free scanned stack (kernel (L, d, d)) is recognised by its name."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
      x, _ = scan(name=stack_name)(x, None)
      return nn.Dense(2, name="head")(x)

  params = Model().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  got = _depths(params)
  np.testing.assert_allclose(got[f"{stack_name}/Dense_0/kernel"].ravel(), [0, 1 / 3, 2 / 3])
  assert got[f"{stack_name}/Dense_0/kernel"].shape == (3, 1, 1) and got["head/kernel"] == 1.0


def test_tensor_granularity_gives_each_slice_of_a_stack_its_own_index() -> None:
  params = {"embed": {"embedding": _w(5, 2)},
            "blocks": {"kernel": _w(2, 2, 2), "bias": _w(2, 2)}, "head": {"kernel": _w(2, 2)}}
  got = _depths(params, granularity="tensor")
  # embed, (kernel, bias) of slice 0, (kernel, bias) of slice 1, head: 6 tensors.
  np.testing.assert_allclose(got["blocks/kernel"].ravel(), [1 / 5, 3 / 5])
  np.testing.assert_allclose(got["blocks/bias"].ravel(), [2 / 5, 4 / 5])


def test_linen_convolutions_before_dense_layers_and_batch_norms_join_their_convolution() -> None:
  params = {name: {"kernel": _w(2, 2), "bias": _w(2)} for name in
            ("Conv_0", "Conv_1", "Dense_0", "Dense_1")}
  params.update({f"BatchNorm_{i}": {"scale": _w(), "bias": _w()} for i in (0, 1)})
  params["head"] = {"kernel": _w(2, 2)}
  got = _depths(params)
  assert [got[f"{n}/kernel"] for n in ("Conv_0", "Conv_1", "Dense_0", "Dense_1", "head")] == [
    0, 0.25, 0.5, 0.75, 1.0]
  assert got["BatchNorm_1/scale"] == got["Conv_1/kernel"]
  tensors = _depths(params, granularity="tensor")
  order = ["Conv_0/kernel", "Conv_0/bias", "BatchNorm_0/scale", "BatchNorm_0/bias",
           "Conv_1/kernel", "Conv_1/bias", "BatchNorm_1/scale", "BatchNorm_1/bias",
           "Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias", "head/kernel"]
  assert [tensors[p] for p in order] == pytest.approx([i / 12 for i in range(13)])


def test_groups_whose_order_names_do_not_say_raise_with_the_fix() -> None:
  params = {"vision": {"blocks": {"0": {"w": _w()}}}, "text": {"layers": {"0": {"w": _w()}}},
            "head": {"kernel": _w(2, 2)}}
  with pytest.raises(ValueError) as e:
    dj.layer_depths(params)
  message = str(e.value)
  assert "'text', 'vision'" in message and "never guessed" in message
  assert "order=dj.forward_order(model.apply, variables" in message
  suggested = eval(message.rsplit("order=", 1)[1])  # noqa: S307 -- the printed, ready-made list
  assert suggested == ["text", "vision", "head"]
  got = _depths(params, order=["vision", "text", "head"])  # the user puts them in forward order
  assert (got["vision/blocks/0/w"], got["text/layers/0/w"], got["head/kernel"]) == (0, 0.5, 1)


def test_linen_layer_norm_beside_dense_layers_is_ambiguous_for_tensors_only() -> None:
  params = {"Dense_0": {"kernel": _w(2, 2)}, "LayerNorm_0": {"scale": _w()},
            "Dense_1": {"kernel": _w(2, 2)}}
  with pytest.raises(ValueError, match=r"'Dense_\*', 'LayerNorm_0'"):
    dj.layer_depths(params)
  order = {"Dense_0/kernel": 0, "LayerNorm_0/scale": 1, "Dense_1/kernel": 2}
  assert _depths(params, order=order, granularity="tensor") == {
    "Dense_0/kernel": 0.0, "Dense_1/kernel": 1.0, "LayerNorm_0/scale": 0.5}


def test_order_patterns_are_groups_laid_out_in_place_and_anchored_at_the_root() -> None:
  params = {"stem": {"conv1": {"w": _w()}},
            "body": {"conv1": {"w": _w()}, "conv2": {"w": _w()}},
            "decoder": {"layers": {"0": {"w": _w()}, "1": {"w": _w()}}}}
  got = _depths(params, order=["stem", "body", "decoder"])
  assert [got[k] for k in ("stem/conv1/w", "body/conv1/w", "body/conv2/w",
                           "decoder/layers/0/w", "decoder/layers/1/w")] == [0, .25, .5, .75, 1]
  # 'conv1' is anchored: it selects no top-level subtree here (stem/conv1 and body/conv1
  # are not at the root), so it matches nothing.
  with pytest.raises(ValueError, match="pattern 'conv1' matches no parameter"):
    dj.layer_depths(params, order=["conv1", "body", "decoder", "stem"])
  with pytest.raises(ValueError, match="matches more than one order pattern"):
    dj.layer_depths(params, order=["stem", "body", "body/conv2", "decoder"])
  with pytest.raises(ValueError, match="'decoder/layers/0/w' matches none of the order patterns"):
    dj.layer_depths(params, order=["stem", "body"])
  got = _depths(params, order=["stem", "body/conv*", "**/layers"])
  assert got["decoder/layers/1/w"] == 1.0


def test_a_leading_params_collection_is_optional_in_patterns() -> None:
  variables = {"params": {"embed": {"w": _w()}, "mystery": {"w": _w()}}}
  got = _depths(variables, order=["embed", "mystery"])
  assert got == {"params/embed/w": 0.0, "params/mystery/w": 1.0}


def test_trees_with_no_layer_structure_are_one_block_at_full_strength() -> None:
  for tree in ({"w": _w(2, 2), "b": _w()}, {"kernel": _w(3, 2), "bias": _w(2)}, _w(4)):
    assert all(v == 0.0 for v in jax.tree.leaves(dj.layer_depths(tree)))
  assert _depths({"w": _w(2, 2), "b": _w()}, granularity="tensor") == {"b": 1.0, "w": 0.0}


def test_head_is_left_out_and_the_rest_renormalised() -> None:
  params = {"embed": {"w": _w()}, "layers_0": {"w": _w()}, "layers_1": {"w": _w()},
            "head": {"w": _w()}}
  got = dj.layer_depths(params, head="head")
  assert got == {"embed": {"w": 0.0}, "head": {"w": None}, "layers_0": {"w": 0.5},
                 "layers_1": {"w": 1.0}}
  with pytest.raises(ValueError, match="pattern 'heda' matches no parameter"):
    dj.layer_depths(params, head="heda")


def test_stacked_patterns_must_match_and_share_a_leading_axis() -> None:
  params = {"layers": {"a": _w(3, 2), "b": _w(4, 2)}, "head": {"w": _w()}}
  with pytest.raises(ValueError, match="do not share one leading layer axis"):
    dj.layer_depths(params, stacked="layers")
  with pytest.raises(ValueError, match="pattern 'blocks' matches no parameter"):
    dj.layer_depths(params, stacked="blocks")


def test_unknown_granularity_lists_choices() -> None:
  with pytest.raises(ValueError, match=r"granularity must be one of \('block', 'tensor'\)"):
    dj.layer_depths({"layers_0": {"w": _w()}}, granularity="layer")


def test_a_forward_order_must_cover_every_parameter() -> None:
  params = {"a": {"w": _w()}, "b": {"w": _w()}}
  with pytest.raises(ValueError, match="forward order has no position for 'b/w'"):
    dj.layer_depths(params, order={"a/w": 0})
  with pytest.raises(ValueError, match="must be an int or a tuple of ints"):
    dj.layer_depths(params, order={"a/w": 0, "b/w": "first"})


def test_depth_profile_is_olor_kappa_and_clamps_the_last_layer() -> None:
  depths = {"a": 0.0, "b": 0.25, "c": 1.0, "stack": np.array([0.0, 0.5, 1.0])}
  got = dj.depth_profile(depths, start=2.0, end=0.5, power=2.0)
  assert got["a"] == 2.0
  assert got["b"] == pytest.approx(0.5 + 0.75**2 * 1.5)
  assert got["c"] == 0.5  # exactly kappa_min: no negative/complex value from 1 - (1 + 1e-8)
  np.testing.assert_allclose(got["stack"], [2.0, 0.5 + 0.25 * 1.5, 0.5])
