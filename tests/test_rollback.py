"""rollback_to / layerwise_decay: closed forms, invariants and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optax._src import base as optax_base

import dualopt_jax as dj


def _apply(tx, grads, params, state=None):
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_one_step_closed_form_with_layer_scale_tree_and_schedule() -> None:
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
  anchor = {"a": jnp.array([0.0, 0.0]), "b": jnp.array([[1.0]])}
  updates = {"a": jnp.array([0.5, -0.5]), "b": jnp.array([[1.0]])}
  schedule = lambda count: 0.1 * (count + 1)
  tx = dj.rollback_to(anchor, rate=schedule, layer_scale={"a": 1.0, "b": 0.5})
  state = tx.init(params)
  for count in range(3):
    new_updates, state = tx.update(updates, state, params)
    got = optax.apply_updates(params, new_updates)
    for key, scale in (("a", 1.0), ("b", 0.5)):
      lam = 0.1 * (count + 1) * scale
      post = np.asarray(params[key]) + np.asarray(updates[key])
      want = post - lam * (post - np.asarray(anchor[key]))
      np.testing.assert_allclose(got[key], want, rtol=1e-6)
  assert int(state.count) == 3


def test_layerwise_decay_shrinks_post_step_weights() -> None:
  params = {"w": jnp.array([2.0, -4.0])}
  updates = {"w": jnp.array([1.0, 1.0])}
  got, _ = _apply(dj.layerwise_decay(rate=0.25), updates, params)
  np.testing.assert_allclose(got["w"], 0.75 * np.array([3.0, -3.0]))


def test_stacked_layer_scale_broadcasts_per_slice() -> None:
  params = {"blocks": {"kernel": jnp.ones((3, 2, 2))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  scale = {"blocks": {"kernel": jnp.array([1.0, 0.5, 0.0]).reshape(3, 1, 1)}}
  got, _ = _apply(dj.layerwise_decay(rate=0.2, layer_scale=scale), zero, params)
  np.testing.assert_allclose(got["blocks"]["kernel"][:, 0, 0], [0.8, 0.9, 1.0], rtol=1e-6)


def test_callable_layer_scale_receives_the_params() -> None:
  """A per-leaf callable is ``params -> pytree`` (as Optax's mask callables), here keyed by path."""
  seen = []

  def scale(tree):
    seen.append(tree)
    return jax.tree_util.tree_map_with_path(
      lambda path, _x: 0.0 if path[-1].key == "bias" else 1.0, tree
    )

  params = {"Dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
  got, _ = _apply(dj.layerwise_decay(rate=0.5, layer_scale=scale), jax.tree.map(
    jnp.zeros_like, params), params)
  assert jax.tree.structure(seen[0]) == jax.tree.structure(params)
  np.testing.assert_allclose(got["Dense_0"]["kernel"], 0.5)
  np.testing.assert_allclose(got["Dense_0"]["bias"], 1.0)


def test_glob_mask_skips_leaves_and_stores_no_anchor_for_them() -> None:
  params = {"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  tx = dj.rollback_to(rate=0.5, mask="body")
  state = tx.init(params)
  assert isinstance(state.inner_state.anchor["head"]["w"], optax.MaskedNode)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), params)
  got, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(got["head"]["w"], 2.0)  # untouched
  np.testing.assert_allclose(got["body"]["w"], 2.0 - 0.5 * (1.0 + 2.0 - 1.0))


@pytest.mark.parametrize("kind", ["prefix_pytree", "prefix_callable"])
def test_a_mask_may_be_a_prefix_of_the_params_tree(kind: str) -> None:
  """Optax's mask contract: one bool may stand for a whole subtree."""
  params = {"body": {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}, "head": {"w": jnp.ones(2)}}
  prefix = {"body": True, "head": False}
  mask = prefix if kind == "prefix_pytree" else (lambda _params: prefix)
  state = dj.rollback_to(rate=0.5, mask=mask).init(params)
  anchor = state.inner_state.anchor
  assert isinstance(anchor["head"]["w"], optax.MaskedNode)
  assert not isinstance(anchor["body"]["a"]["w"], optax.MaskedNode)
  assert not isinstance(anchor["body"]["b"]["w"], optax.MaskedNode)


def test_patterns_are_anchored_and_one_that_matches_nothing_is_an_error() -> None:
  params = {"encoder": {"head": {"w": jnp.ones(2)}}, "head": {"w": jnp.ones(2)}}
  state = dj.rollback_to(rate=0.5, mask="head").init(params)
  anchor = state.inner_state.anchor
  assert isinstance(anchor["encoder"]["head"]["w"], optax.MaskedNode)  # not under the root's head
  assert not isinstance(anchor["head"]["w"], optax.MaskedNode)
  state = dj.rollback_to(rate=0.5, mask="**/head").init(params)
  assert not isinstance(state.inner_state.anchor["encoder"]["head"]["w"], optax.MaskedNode)
  with pytest.raises(ValueError, match="pattern 'haed' matches no parameter"):
    dj.rollback_to(rate=0.5, mask="haed").init(params)
  with pytest.raises(ValueError, match="dualopt: head: pattern 'clasifier' matches no parameter"):
    dj.dualopt(1e-3, head="clasifier").init(params)


def test_integer_leaves_pass_through() -> None:
  params = {"w": jnp.ones(2), "step": jnp.array(3, jnp.int32)}
  updates = {"w": jnp.ones(2), "step": jnp.array(1, jnp.int32)}
  tx = dj.rollback_to(jax.tree.map(jnp.zeros_like, params), rate=0.5)
  new, _ = tx.update(updates, tx.init(params), params)
  assert new["step"].dtype == jnp.int32 and int(new["step"]) == 1


def test_anchor_dtype_is_stored_lower_precision() -> None:
  params = {"w": jnp.linspace(0, 1, 8, dtype=jnp.float32)}
  state = dj.rollback_to(rate=0.1, anchor_dtype=jnp.bfloat16).init(params)
  assert state.anchor["w"].dtype == jnp.bfloat16
  assert state.anchor["w"].nbytes == params["w"].nbytes // 2


def test_params0_is_copied_not_aliased() -> None:
  params0 = {"w": jnp.ones(3)}
  state = dj.rollback_to(params0, rate=0.1).init({"w": jnp.zeros(3)})
  np.testing.assert_array_equal(state.anchor["w"], 1.0)


@pytest.mark.parametrize(
  ("params0", "match"),
  [
    ({"a": jnp.ones(3), "b": jnp.ones((2, 3))},
     r"at 'b': params0 has shape \(2, 3\), params has shape \(2, 2\)"),
    ({"a": jnp.ones(3)}, r"params has 'b' with shape \(2, 2\), params0 has no such path"),
    ({"a": jnp.ones(3), "b": jnp.ones((2, 2)), "c": jnp.ones(1)},
     r"params0 has 'c' with shape \(1,\), params has no such path"),
    ({"a": jnp.ones(3), "b": jnp.ones((2, 2), jnp.bfloat16)},
     r"at 'b': params0 has dtype bfloat16 \(shape \(2, 2\)\), params has dtype float32"),
  ],
)
def test_mismatched_params0_names_the_path(params0, match) -> None:
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=match):
    dj.rollback_to(params0, rate=0.1).init(params)


def test_update_without_params_raises_optax_error() -> None:
  params = {"w": jnp.ones(2)}
  for tx in (dj.rollback_to(rate=0.1), dj.layerwise_decay(rate=0.1)):
    with pytest.raises(ValueError, match=optax_base.NO_PARAMS_MSG[:40]):
      tx.update(params, tx.init(params))


@pytest.mark.parametrize("factory", [dj.rollback_to, dj.layerwise_decay])
@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"rate": 1.5}, r"rate must lie in \[0, 1\]"),
    ({"rate": -0.1}, r"rate must lie in \[0, 1\]"),
    ({"rate": 0.5, "layer_scale": 3.0}, r"rate \* layer_scale = 1.5 leaves \[0, 1\]"),
  ],
)
def test_fraction_outside_unit_interval_is_rejected(factory, kwargs, match) -> None:
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


def test_layer_scale_tree_out_of_range_names_the_path_at_init() -> None:
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = dj.rollback_to(rate=0.5, layer_scale={"a": 1.0, "b": 4.0})
  with pytest.raises(ValueError, match="layer_scale for 'b'"):
    tx.init(params)


def test_layer_scale_that_does_not_broadcast_names_the_path() -> None:
  params = {"blocks": {"kernel": jnp.ones((3, 2, 2))}}
  tx = dj.layerwise_decay(rate=0.1, layer_scale={"blocks": {"kernel": jnp.ones(3)}})
  with pytest.raises(ValueError, match=r"'blocks/kernel' has shape \(3,\).*\(3, 2, 2\)"):
    tx.init(params)


def test_layer_scale_tree_missing_a_path_names_it() -> None:
  tx = dj.layerwise_decay(rate=0.1, layer_scale={"a": 1.0})
  with pytest.raises(ValueError, match="no entry for parameter path 'b'"):
    tx.init({"a": jnp.ones(1), "b": jnp.ones(1)})


def test_nan_gradient_leaves_anchor_unchanged() -> None:
  params = {"w": jnp.ones(3)}
  tx = optax.chain(optax.adam(1e-2), dj.rollback_to(rate=0.1))
  state = tx.init(params)
  _, new_state = tx.update({"w": jnp.array([jnp.nan, 1.0, jnp.inf])}, state, params)
  np.testing.assert_array_equal(new_state[1].anchor["w"], state[1].anchor["w"])


# ---- properties over random trees, shapes and dtypes --------------------------------------

_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
_dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


@st.composite
def _trees(draw):
  n = draw(st.integers(1, 4))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  tree = {}
  for i in range(n):
    shape, dtype = draw(_shapes), draw(_dtypes)
    tree[f"layers_{i}"] = {
      "p": jnp.asarray(rng.normal(size=shape), dtype),
      "u": jnp.asarray(rng.normal(size=shape), dtype),
      "a": jnp.asarray(rng.normal(size=shape), dtype),
    }
  return tree


def _split(tree, key):
  return {k: v[key] for k, v in tree.items()}


@settings(max_examples=25, deadline=None)
@given(tree=_trees(), rate=st.floats(0.0, 1.0))
def test_property_post_step_distance_shrinks_by_one_minus_lambda(tree, rate) -> None:
  params, updates, anchor = _split(tree, "p"), _split(tree, "u"), _split(tree, "a")
  tx = dj.rollback_to(anchor, rate=rate)
  new_updates, state = tx.update(updates, tx.init(params), params)
  for key in params:
    u, p, a = (np.asarray(x[key], np.float64) for x in (new_updates, params, anchor))
    assert new_updates[key].dtype == params[key].dtype  # dtype preserved
    assert state.anchor[key].dtype == params[key].dtype
    post = np.asarray(params[key], np.float64) + np.asarray(updates[key], np.float64)
    want = (1 - rate) * (post - a)
    tol = float(jnp.finfo(params[key].dtype).eps) * 8 * (1 + np.abs(post).max(initial=0)
                                                         + np.abs(a).max(initial=0))
    np.testing.assert_allclose(p + u - a, want, atol=tol)
    np.testing.assert_array_equal(state.anchor[key], anchor[key])  # anchor never moves


@settings(max_examples=25, deadline=None)
@given(tree=_trees())
def test_property_extremes_rate_zero_is_identity_and_one_returns_to_anchor(tree) -> None:
  params, updates, anchor = _split(tree, "p"), _split(tree, "u"), _split(tree, "a")
  same, _ = dj.rollback_to(anchor, rate=0.0).update(
    updates, dj.rollback_to(anchor, rate=0.0).init(params), params)
  for key in params:
    np.testing.assert_array_equal(same[key], updates[key])
  back = dj.rollback_to(anchor, rate=1.0)
  new, _ = back.update(updates, back.init(params), params)
  for key in params:
    got = np.asarray(params[key], np.float64) + np.asarray(new[key], np.float64)
    scale = 1 + np.abs(np.asarray(params[key], np.float64)).max(initial=0) + np.abs(
      np.asarray(updates[key], np.float64)).max(initial=0)
    np.testing.assert_allclose(got, np.asarray(anchor[key], np.float64),
                               atol=float(jnp.finfo(params[key].dtype).eps) * 4 * scale)


def _rollback_state(state):
  (found,) = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, dj.RollbackState))
              if isinstance(s, dj.RollbackState)]
  return found


def test_leaves_of_a_block_share_one_depth_operand() -> None:
  """One float32 operand per distinct depth, naming its paths; the step carries no more."""
  block = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  params = {"embed": {"embedding": jnp.ones((3, 2))}, "layers_0": block, "layers_1": block,
            "head": {"kernel": jnp.ones((2, 1))}}
  tx = dj.dualopt(1e-2, rollback=0.1, head="head")
  state = tx.init(params)
  (groups,) = _rollback_state(state).layer_scale.per_leaf.values()
  assert all(isinstance(g, dj.SharedValue) for g in groups.values())
  members = sorted(p for g in groups.values() for p in g.paths)
  assert members == ["embed/embedding", "layers_0/bias", "layers_0/kernel", "layers_1/bias",
                     "layers_1/kernel"]  # each covered leaf once, the head not at all
  heights = {p: float(g.value) for g in groups.values() for p in g.paths}
  assert len(groups) == 3 == len(set(heights.values()))  # embedding, block 0, block 1
  assert heights["layers_0/bias"] == heights["layers_0/kernel"] != heights["layers_1/kernel"]
  # The step carries one buffer per group (and the profile numbers), not one per leaf.
  assert len(jax.tree.leaves(_rollback_state(state).layer_scale)) == len(groups) + 1


def test_layer_scales_known_only_under_jit_keep_one_operand_each() -> None:
  """Values traced at init cannot be compared: each leaf keeps its own operand, same result."""
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  scale = lambda tree: jax.tree.map(lambda x: 0.5 + 0.0 * jnp.sum(x), tree)  # noqa: E731
  tx = dj.layerwise_decay(rate=0.2, layer_scale=scale)
  eager, jitted = tx.init(params), jax.jit(tx.init)(params)
  assert len(next(iter(eager.layer_scale.per_leaf.values()))) == 1  # equal values share
  assert len(next(iter(jitted.layer_scale.per_leaf.values()))) == 2
  zero = jax.tree.map(jnp.zeros_like, params)
  for state in (eager, jitted):
    got, _ = _apply(tx, zero, params, state)
    np.testing.assert_allclose(got["a"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(got["b"], 0.9, rtol=1e-6)


def test_a_state_in_the_earlier_per_path_layout_is_refused_by_name() -> None:
  params = {"layers_0": {"kernel": jnp.ones((2, 2))}, "layers_1": {"kernel": jnp.ones((2, 2))}}
  tx = dj.dualopt(1e-2)
  state = tx.init(params)
  pull = _rollback_state(state)
  ((tag, groups),) = pull.layer_scale.per_leaf.items()
  per_path = {p: g.value for g in groups.values() for p in g.paths}  # one operand per path
  old = pull._replace(layer_scale=pull.layer_scale._replace(per_leaf={tag: per_path}))
  state = jax.tree.map(lambda s: old if isinstance(s, dj.RollbackState) else s, state,
                       is_leaf=lambda s: isinstance(s, dj.RollbackState))
  with pytest.raises(ValueError, match="another layout.*earlier dualopt_jax"):
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)
