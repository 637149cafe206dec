"""Layer-wise lr decay (ALGORITHMS.md §7) against BEiT's layer_id rule transcribed to Flax paths."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualopt_jax import _paths
from dualopt_jax._lr_decay import layerwise_lr_decay, layerwise_lr_decay_adamw, lr_decay_exponents
from tests._contexts import ECOSYSTEM_CONTEXTS as CONTEXTS
from tests._contexts import ViT, check_context

NUM_BLOCKS = 12  # > 10, so 'Block_10' must come after 'Block_2' (jax.tree sorts it before)


def _beit_layer_id(path: str, num_layers: int) -> int:
  """BEiT's get_layer_id_for_vit, on Flax names: embeddings 0, block i -> i + 1, rest L + 1."""
  if "embed" in path:
    return 0
  match = re.search(r"Block_(\d+)", path)
  if match:
    return int(match.group(1)) + 1
  return num_layers + 1


def _vit_params():
  return ViT(num_blocks=NUM_BLOCKS, pos_embed=True).init(jax.random.key(0), jnp.ones((2, 5)))


def test_exponents_follow_beit_on_a_flax_vit() -> None:
  params = _vit_params()
  exps = lr_decay_exponents(params)
  for path, e in _paths.leaves_with_paths(exps):
    key = _paths.path_str(path)
    assert float(e) == NUM_BLOCKS + 1 - _beit_layer_id(key, NUM_BLOCKS), key


@pytest.mark.parametrize("decay", [0.75, "schedule"])
def test_adam_updates_scaled_per_layer(decay) -> None:
  params = _vit_params()
  d = (lambda count: 0.9 - 0.1 * count) if decay == "schedule" else decay
  tx = optax.chain(optax.scale_by_adam(), layerwise_lr_decay(d), optax.scale_by_learning_rate(1e-2))
  plain = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
  state, pstate = tx.init(params), plain.init(params)
  for t in range(3):
    grads = jax.tree.map(lambda x, t=t: jnp.cos(x + t), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    ref, pstate = plain.update(grads, pstate, params)
    d_t = d(t) if callable(d) else d
    for (path, u), (_, r) in zip(
      _paths.leaves_with_paths(updates), _paths.leaves_with_paths(ref), strict=True
    ):
      scale = d_t ** (NUM_BLOCKS + 1 - _beit_layer_id(_paths.path_str(path), NUM_BLOCKS))
      np.testing.assert_allclose(u, np.asarray(r) * scale, rtol=1e-5, atol=1e-9,
                                 err_msg=_paths.path_str(path))


def test_stacked_layers_get_one_exponent_per_layer() -> None:
  params = {
    "embed": {"embedding": jnp.ones((5, 4))},
    "layers": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.ones((3, 4))},
    "head": {"kernel": jnp.ones((4, 2))},
  }
  exps = lr_decay_exponents(params, stacked="layers")
  np.testing.assert_array_equal(exps["layers"]["kernel"].reshape(-1), [3.0, 2.0, 1.0])
  assert exps["layers"]["kernel"].shape == (3, 1, 1) and exps["layers"]["bias"].shape == (3, 1)
  assert float(exps["embed"]["embedding"]) == 4.0 and float(exps["head"]["kernel"]) == 0.0
  tx = layerwise_lr_decay(0.5, stacked="layers")
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["layers"]["kernel"][:, 0, 0], [0.125, 0.25, 0.5])


def test_explicit_depths_and_num_layers() -> None:
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  exps = lr_decay_exponents(params, depths={"a": 0.0, "b": 0.5}, num_layers=3)
  assert float(exps["a"]) == 4.0 and float(exps["b"]) == 2.0


@pytest.mark.parametrize("scale_wd", [True, False])
def test_adamw_weight_decay_choice_against_numpy(scale_wd: bool) -> None:
  w = {"w": jnp.array([1.0, -2.0])}
  params = {"embed": w, "layers_0": w, "head": w}
  lr, wd, decay = 0.1, 0.5, 0.5
  tx = layerwise_lr_decay_adamw(
    lr, decay=decay, weight_decay=wd, scale_weight_decay=scale_wd, weight_decay_mask="layers_0"
  )
  grads = jax.tree.map(lambda x: 0.3 * x, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  theta = np.array([1.0, -2.0])
  adam_dir = np.sign(0.3 * theta)  # first Adam step: m_hat / sqrt(v_hat) = sign(g); f32 1-b2 aside
  for name, exponent, decayed in (("embed", 2, False), ("layers_0", 1, True), ("head", 0, False)):
    s = decay**exponent
    wd_term = wd * theta * (s if scale_wd else 1.0) if decayed else 0.0
    np.testing.assert_allclose(updates[name]["w"], -lr * (s * adam_dir + wd_term), rtol=5e-5)


def test_mask_keeps_full_lr() -> None:
  w = {"w": jnp.ones(2)}
  params = {"embed": w, "layers_0": w, "head": w}
  tx = layerwise_lr_decay(0.5, mask=lambda p: {"embed": {"w": False}, "layers_0": {"w": True},
                                               "head": {"w": True}})
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates["embed"]["w"], 1.0)  # not scaled (would be 0.25)
  np.testing.assert_allclose(updates["layers_0"]["w"], 0.5)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"decay": 0.0}, "decay must lie in"),
    ({"decay": 1.5}, "decay must lie in"),
    ({"decay": 0.8, "depths": {"a": 2.0, "b": 0.0}}, "depths for 'a' must lie in"),
    ({"decay": 0.8, "depths": {"a": 0.0}}, "no entry for parameter path 'b'"),
    ({"decay": 0.8, "depths": {"a": 0.0, "b": 1.0}, "num_layers": 1.5}, "num_layers"),
    ({"decay": 0.8, "order": ["a"]}, "'b' matches none of the order patterns"),
    (
      {"decay": 0.8, "mask": {"a": True}, "depths": {"a": 0.0, "b": 1.0}},
      "mask: mask has no entry for parameter path 'b'",
    ),
  ],
)
def test_bad_input_is_rejected(kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    layerwise_lr_decay(**kwargs).init({"a": jnp.ones(2), "b": jnp.ones(2)})


@pytest.mark.parametrize("context", CONTEXTS)
def test_works_in_context(context: str) -> None:
  check_context(context, layerwise_lr_decay, {"decay": 0.7})
