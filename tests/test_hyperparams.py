"""Hyper-parameter rules every factory shares: numbers, schedules, per-leaf values, the anchor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualopt_jax as dj

PARAMS = {"body": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2))}}

# (factory, argument) pairs whose value is a number or a schedule.
NUMBERS = [
  (lambda v: dj.rollback_to(rate=v), "rate"),
  (lambda v: dj.layerwise_decay(rate=v), "rate"),
  (lambda v: dj.dualopt(1e-3, rollback=v), "rollback"),
  (lambda v: dj.dualopt(1e-3, mode="scratch", weight_decay=v), "weight_decay"),
  (lambda v: dj.spd(optax.adam(1e-3), strength=v), "strength"),
  (lambda v: dj.l2sp(1e-3, alpha=v), "alpha"),
  (lambda v: dj.project_to_anchor(v), "radius"),
  (lambda v: dj.layerwise_lr_decay(v), "decay"),
  (lambda v: dj.fix_norm(classifier="head", classifier_norm=v), "classifier_norm"),
]


@pytest.mark.parametrize("make, name", NUMBERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.01"])
def test_non_numbers_are_refused_naming_the_argument(make, name: str, bad) -> None:
  with pytest.raises(ValueError, match=name):
    make(bad).init(PARAMS)


@pytest.mark.parametrize("make, name", NUMBERS)
def test_a_schedule_is_a_callable_of_the_count(make, name: str) -> None:
  tx = make(lambda count: 0.5 * jnp.ones(()) ** count)
  state = tx.init(PARAMS)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), state, PARAMS)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_a_callable_that_is_not_a_schedule_is_refused_with_the_rule() -> None:
  with pytest.raises(ValueError, match=r"radius: a callable is an Optax schedule"):
    dj.project_to_anchor(lambda path, leaf: 1.0).init(PARAMS)


def test_per_leaf_values_are_a_pytree_or_a_params_function() -> None:
  as_tree = dj.rollback_to(rate=0.5, layer_scale={"body": 1.0, "head": 0.0})
  as_function = dj.rollback_to(rate=0.5, layer_scale=lambda p: {"body": 1.0, "head": 0.0})
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  got = [
    optax.apply_updates(PARAMS, tx.update(grads, tx.init(PARAMS), PARAMS)[0])
    for tx in (as_tree, as_function)
  ]
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
    np.testing.assert_allclose(a, b)
  np.testing.assert_allclose(got[0]["body"]["kernel"], 1.5)  # 1 + 1, then halfway back to 1
  np.testing.assert_allclose(got[0]["head"]["kernel"], 2.0)  # scale 0: not pulled


ANCHORED = {
  "rollback_to": lambda: dj.rollback_to(rate=0.1),
  "rollback_to(anchor_dtype=f32)": lambda: dj.rollback_to(rate=0.1, anchor_dtype=jnp.float32),
  "spd": lambda: dj.spd(optax.sgd(0.1), strength=1.0, anchor_dtype=jnp.float32),
  "l2sp": lambda: dj.l2sp(0.1, alpha=0.1, anchor_dtype=jnp.float32),
  "project_to_anchor": lambda: dj.project_to_anchor(1.0, anchor_dtype=jnp.float32),
}


@pytest.mark.parametrize("name", list(ANCHORED))
def test_the_anchor_is_its_own_buffer_and_a_donated_step_runs(name: str) -> None:
  tx = ANCHORED[name]()
  params = {"w": jnp.ones(4), "b": jnp.zeros(2)}
  state = tx.init(params)
  pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)}
  assert not pointers & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)}

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, updates), s

  donated = jax.jit(step, donate_argnums=(0, 1))
  new_params, _ = donated(params, state)
  assert np.all(np.isfinite(np.asarray(new_params["w"])))
