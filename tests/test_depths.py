"""layer_depths / depth_profile on Linen, NNX, scanned and vmapped models, against hand tables."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dualopt_jax as dj
from dualopt_jax import _paths


def _table(depths) -> dict[str, object]:
  return {_paths.path_str(p): v for p, v in _paths.leaves_with_paths(depths)}


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1])(nn.LayerNorm()(x))


class _LinenTransformer(nn.Module):
  layers: int = 12

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 8, name="wte")(tokens)
    for i in range(self.layers):
      x = _Block(name=f"layers_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(16, name="head")(x)


def test_linen_blocks_compare_numbers_as_numbers() -> None:
  variables = _LinenTransformer().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  units = 1 + 12 + 1  # embeddings, 12 blocks, output (final norm and head share it)
  expected = {"params/wte/embedding": 0.0, "params/ln_f/scale": 1.0, "params/head/kernel": 1.0}
  for i in range(12):
    for leaf in ("Dense_0/kernel", "Dense_0/bias", "LayerNorm_0/scale"):
      expected[f"params/layers_{i}/{leaf}"] = (i + 1) / (units - 1)
  got = _table(dj.layer_depths(variables))
  for path, depth in expected.items():
    assert got[path] == pytest.approx(depth), path
  # Without the 'params' collection key the same depths come out.
  inner = _table(dj.layer_depths(variables["params"]))
  assert inner["layers_10/Dense_0/kernel"] == pytest.approx(11 / 13)
  assert inner["layers_2/Dense_0/kernel"] == pytest.approx(3 / 13)


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(x.shape[-1])(x), None


class _LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(16, 8)(tokens)
    scanned = nn.scan(
      _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
    )
    x, _ = scanned(name="blocks")(x, None)
    return nn.Dense(16, name="head")(x)


def test_linen_scan_gets_one_depth_per_slice() -> None:
  params = _LinenScanned().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  got = _table(dj.layer_depths(params))
  kernel = got["blocks/Dense_0/kernel"]
  assert kernel.shape == (4, 1, 1)
  np.testing.assert_allclose(kernel.ravel(), [1 / 5, 2 / 5, 3 / 5, 4 / 5], rtol=1e-6)
  assert got["blocks/Dense_0/bias"].shape == (4, 1)
  assert got["Embed_0/embedding"] == 0.0 and got["head/kernel"] == 1.0


class _NnxModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, n: int = 11):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(n)])
    self.norm = nnx.LayerNorm(4, rngs=rngs)


@pytest.mark.parametrize("pure", [False, True])
def test_nnx_integer_keys_variable_wrapped_or_pure(pure: bool) -> None:
  state = nnx.state(_NnxModel(nnx.Rngs(0)), nnx.Param)
  if pure:
    state = nnx.to_pure_dict(state)
  got = _table(dj.layer_depths(state))
  assert got["embed/embedding"] == 0.0
  assert got["layers/10/kernel"] == pytest.approx(11 / 12)
  assert got["layers/2/kernel"] == pytest.approx(3 / 12)
  assert got["norm/scale"] == 1.0


class _NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)


class _NnxVmapped(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return _NnxBlock(nnx.Rngs(key))

    self.layers = make(jax.random.split(jax.random.key(1), 3))
    self.head = nnx.Linear(4, 2, rngs=rngs)


def test_nnx_vmap_stack_gets_one_depth_per_slice() -> None:
  got = _table(dj.layer_depths(nnx.state(_NnxVmapped(nnx.Rngs(0)), nnx.Param)))
  np.testing.assert_allclose(got["layers/linear/kernel"].ravel(), [0.25, 0.5, 0.75])
  assert got["layers/linear/kernel"].shape == (3, 1, 1)
  assert got["head/kernel"] == 1.0


def test_tensor_granularity_follows_definition_order_not_sorted_order() -> None:
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(11):
        x = nn.Dense(2)(x)
      return x

  params = Mlp().init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  got = _table(dj.layer_depths(params, granularity="tensor"))
  n = 22
  for i in range(11):  # kernel then bias, Dense_0 .. Dense_10 in creation order
    assert got[f"Dense_{i}/kernel"] == pytest.approx(2 * i / (n - 1))
    assert got[f"Dense_{i}/bias"] == pytest.approx((2 * i + 1) / (n - 1))


def test_order_patterns_override_rules() -> None:
  params = {"encoder": {"w": jnp.ones(1)}, "bottleneck": {"w": jnp.ones(1)},
            "decoder": {"w": jnp.ones(1)}}
  got = _table(dj.layer_depths(params, order=["encoder", "bottleneck", "decoder"]))
  assert got == {"encoder/w": 0.0, "bottleneck/w": 0.5, "decoder/w": 1.0}
  with pytest.raises(ValueError, match="'decoder/w' matches none of the order patterns"):
    dj.layer_depths(params, order=["encoder", "bottleneck"])


def test_unmatched_path_names_it_and_suggests_order() -> None:
  with pytest.raises(ValueError, match=r"no depth rule matches 'mystery/w'.*order=\["):
    dj.layer_depths({"mystery": {"w": jnp.ones(1)}, "layers_0": {"w": jnp.ones(1)}})


def test_unknown_granularity_lists_choices() -> None:
  with pytest.raises(ValueError, match=r"granularity must be one of \('block', 'tensor'\)"):
    dj.layer_depths({"layers_0": {"w": jnp.ones(1)}}, granularity="layer")


def test_depth_profile_is_olor_kappa_and_clamps_the_last_layer() -> None:
  depths = {"a": 0.0, "b": 0.25, "c": 1.0, "stack": np.array([0.0, 0.5, 1.0])}
  got = dj.depth_profile(depths, start=2.0, end=0.5, power=2.0)
  assert got["a"] == 2.0
  assert got["b"] == pytest.approx(0.5 + 0.75**2 * 1.5)
  assert got["c"] == 0.5  # exactly kappa_min: no negative/complex value from 1 - (1 + 1e-8)
  np.testing.assert_allclose(got["stack"], [2.0, 0.5 + 0.25 * 1.5, 0.5])


def test_single_tensor_model_has_depth_zero() -> None:
  assert dj.layer_depths({"w": jnp.ones(2)}, granularity="tensor") == {"w": 0.0}


def test_profile_after_sorting_keys_needs_init_order() -> None:
  """A multi-group model's order is lost in a key-sorted tree; the profile says so."""
  profile = dj.LayerProfile(1.0, 0.0, granularity="tensor")
  sorted_tree = {"b": jnp.ones(1), "a": jnp.ones(2)}
  with pytest.raises(ValueError, match="definition order"):
    profile.per_leaf_values(jax.tree.map(lambda x: x, sorted_tree), at_init=False)
  values = profile.per_leaf_values(sorted_tree, at_init=True)  # init sees the model's order
  assert values == {"b": 1.0, "a": 0.0}
  again = profile.per_leaf_values(jax.tree.map(lambda x: x, sorted_tree), at_init=False)
  assert again == {"a": 0.0, "b": 1.0}
