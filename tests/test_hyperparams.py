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


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: dj.dualopt(1e-3, power=-1.0), "dualopt: power must be >= 0"),
    (lambda: dj.dualopt(1e-3, power=float("nan")), "dualopt: power must be a finite"),
    (lambda: dj.dualopt(optax.constant_schedule(1e-3), peak_learning_rate=0.0),
     "peak_learning_rate must be > 0"),
    (lambda: dj.dualopt(1e-3, rollback="0.01"), "rollback must be a number"),
    (lambda: dj.dualopt(1e-3, weight_decay=0.1), "weight_decay is read only with mode='scratch'"),
    (lambda: dj.dualopt(1e-3, mode="scratch", rollback=0.1), "rollback is read only with mode="),
    (lambda: dj.dualopt(1e-3, mode="scratch", anchor_dtype=jnp.bfloat16), "anchor_dtype is read"),
    (lambda: dj.dualopt(1e-3, optimizer="sgd", b1=0.8), "b1 is read only with optimizer='adam'"),
    (lambda: dj.olor(1e-3, momentum=0.5), "momentum is read only with optimizer='sgd'"),
    (lambda: dj.olor(1e-3, back_level_max=float("inf")), "back_level_max must be a finite"),
    (lambda: dj.olor(1e-3, back_pow=-2.0), "back_pow must be >= 0"),
    (lambda: dj.LayerProfile(power=-1.0), "LayerProfile: power must be >= 0"),
    (lambda: dj.rollback_to(rate=0.1, anchor_dtype=jnp.int8), "anchor_dtype must be a floating"),
    (lambda: dj.spd(optax.sgd(0.1), strength=1.0, anchor_dtype="int32"), "anchor_dtype must be"),
    (lambda: dj.l2sp(0.1, alpha=0.1, anchor_dtype=jnp.int4), "anchor_dtype must be a floating"),
    (lambda: dj.project_to_anchor(radius=float("nan")), "radius must be a finite"),
  ],
)
def test_bad_settings_raise_at_construction_naming_them(make, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    make()


def test_a_scheduled_fraction_is_clipped_to_the_unit_interval() -> None:
  params = {"w": jnp.zeros(3)}
  grads = {"w": -jnp.ones(3)}  # sgd(1) steps to +1; the anchor is 0
  for schedule, want in ((lambda c: 3.0 + 0.0 * c, 0.0), (lambda c: -1.0 + 0.0 * c, 1.0)):
    tx = optax.chain(optax.sgd(1.0), dj.rollback_to(rate=schedule))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], want)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("anchor_dtype", [None, jnp.float32, jnp.bfloat16])
def test_donated_steps_for_every_param_and_anchor_dtype(param_dtype, anchor_dtype) -> None:
  params = {"w": jnp.ones((4, 2), param_dtype), "step": jnp.zeros((), jnp.int32)}
  tx = optax.chain(optax.adam(1e-2), dj.rollback_to(rate=0.1, anchor_dtype=anchor_dtype))

  def step(p, s):
    grads = {"w": jnp.ones_like(p["w"]), "step": jnp.zeros_like(p["step"])}
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  donated = jax.jit(step, donate_argnums=(0, 1))
  p, s = params, tx.init(params)
  for _ in range(3):
    p, s = donated(p, s)
  assert p["w"].dtype == param_dtype and p["step"].dtype == jnp.int32
  anchor = s[1].anchor["w"]
  assert anchor.dtype == (param_dtype if anchor_dtype is None else anchor_dtype)
  np.testing.assert_array_equal(np.asarray(anchor, np.float32), 1.0)  # never moves


@pytest.mark.parametrize("name", list(ANCHORED))
def test_an_anchor_with_nan_is_refused_naming_the_path(name: str) -> None:
  params = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"NaN or inf at 'w'"):
    ANCHORED[name]().init(params)


def test_which_leaves_are_pulled_is_decided_by_the_params_dtype() -> None:
  """Adam's float update for an integer param passes through; float params are pulled."""
  params = {"w": jnp.ones(3), "step": jnp.zeros(3, jnp.int32)}
  grads = {"w": jnp.ones(3), "step": jnp.ones(3, jnp.int32)}
  plain = optax.adam(1.0)
  pulled = optax.chain(optax.adam(1.0), dj.rollback_to(rate=0.5))
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = pulled.update(grads, pulled.init(params), params)
  assert want["step"].dtype != jnp.int32  # the case: a float update of an integer param
  np.testing.assert_array_equal(got["step"], want["step"])
  np.testing.assert_allclose(got["w"], 0.5 * want["w"], rtol=1e-6)
