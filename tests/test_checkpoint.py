"""Orbax checkpointing of dualopt state: a resumed run ends bit-identical (issue 2, item 3).

The state (Adam moments, counts, the anchor, masked-out ``MaskedNode``s) is
saved mid-run with real Orbax, restored into a new ``tx`` object with the
target ``jax.eval_shape(tx.init, params)`` -- in this process and in a fresh
Python process -- and training continues; the final params and state must
equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import dualopt_jax as dj

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT, PEAK = 10, 4, 1e-2


class Net(nn.Module):
  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(12, 8, name="embed")(tokens)
    x = nn.tanh(nn.Dense(8, name="layers_0")(x))
    x = nn.tanh(nn.Dense(8, name="layers_1")(x))
    return nn.Dense(3, name="head")(x.mean(axis=1))


def make_tx() -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK, 3, STEPS)
  return dj.dualopt(schedule, rollback=0.2, peak_learning_rate=PEAK, head="head",
                    anchor_dtype=jnp.bfloat16)


def batch(t: int) -> tuple[jax.Array, jax.Array]:
  key = jax.random.fold_in(jax.random.key(42), t)
  k1, k2 = jax.random.split(key)
  return jax.random.randint(k1, (4, 5), 0, 12), jax.random.randint(k2, (4,), 0, 3)


def make_step(model: nn.Module, tx: optax.GradientTransformation):
  def loss(params, tokens, labels):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, tokens, labels):
    grads = jax.grad(loss)(params, tokens, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def init_params(model: nn.Module):
  return model.init(jax.random.key(0), batch(0)[0])["params"]


def _assert_bit_identical(a, b) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb, strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.array_equal(np.asarray(x), np.asarray(y))


def _uninterrupted(model: nn.Module):
  tx = make_tx()
  params = init_params(model)
  state = tx.init(params)
  step = make_step(model, tx)
  for t in range(STEPS):
    params, state = step(params, state, *batch(t))
  return params, state


def _first_part_and_save(model: nn.Module, path: Path) -> None:
  tx = make_tx()
  params = init_params(model)
  state = tx.init(params)
  step = make_step(model, tx)
  for t in range(SAVE_AT):
    params, state = step(params, state, *batch(t))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": state, "step": SAVE_AT})
  checkpointer.wait_until_finished()


def test_orbax_resume_in_process_is_bit_identical(tmp_path: Path) -> None:
  model = Net()
  want_params, want_state = _uninterrupted(model)
  path = tmp_path / "ckpt"
  _first_part_and_save(model, path)

  # A new tx object and abstract targets, as after a restart.
  tx = make_tx()
  abstract_params = jax.eval_shape(lambda: init_params(model))
  target = {
    "params": abstract_params,
    "opt_state": jax.eval_shape(tx.init, abstract_params),
    "step": 0,
  }
  restored = ocp.StandardCheckpointer().restore(path, target)
  assert int(restored["step"]) == SAVE_AT
  (rb,) = [x for x in jax.tree.leaves(restored["opt_state"],
                                       is_leaf=lambda x: isinstance(x, dj.RollbackState))
           if isinstance(x, dj.RollbackState)]
  assert int(rb.count) == SAVE_AT
  assert isinstance(rb.anchor["head"]["kernel"], optax.MaskedNode)
  assert rb.anchor["embed"]["embedding"].dtype == jnp.bfloat16
  initial = init_params(model)
  assert np.array_equal(rb.anchor["layers_0"]["kernel"],
                        initial["layers_0"]["kernel"].astype(jnp.bfloat16))

  params, state = restored["params"], restored["opt_state"]
  step = make_step(model, tx)
  for t in range(SAVE_AT, STEPS):
    params, state = step(params, state, *batch(t))
  _assert_bit_identical(params, want_params)
  _assert_bit_identical(state, want_state)


def test_orbax_checkpoint_manager_with_train_state(tmp_path: Path) -> None:
  model = Net()
  want_params, want_state = _uninterrupted(model)

  def train_step_fn(tx):
    step = make_step(model, tx)

    def train_step(state: train_state.TrainState, t: int) -> train_state.TrainState:
      params, opt_state = step(state.params, state.opt_state, *batch(t))
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    return train_step

  options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=2)
  tx = make_tx()
  state = train_state.TrainState.create(apply_fn=model.apply, params=init_params(model), tx=tx)
  train_step = train_step_fn(tx)
  with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
    for t in range(SAVE_AT + 1):  # saves at 0, 2, 4: the last one after SAVE_AT steps
      if t > 0:
        state = train_step(state, t - 1)
      manager.save(t, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    assert manager.latest_step() == SAVE_AT
    assert len(manager.all_steps()) == 2

  tx = make_tx()
  abstract = jax.eval_shape(
    lambda: train_state.TrainState.create(apply_fn=model.apply, params=init_params(model), tx=tx)
  )
  with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
  assert int(state.step) == SAVE_AT
  train_step = train_step_fn(tx)
  for t in range(SAVE_AT, STEPS):
    state = train_step(state, t)
  _assert_bit_identical(state.params, want_params)
  _assert_bit_identical(state.opt_state, want_state)


_RESUME_SCRIPT = textwrap.dedent(
  """
  import sys
  import jax, numpy as np, orbax.checkpoint as ocp
  from tests import test_checkpoint as tc
  model, tx = tc.Net(), tc.make_tx()
  abstract_params = jax.eval_shape(lambda: tc.init_params(model))
  target = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
            "step": 0}
  restored = ocp.StandardCheckpointer().restore(sys.argv[1], target)
  params, state = restored["params"], restored["opt_state"]
  step = tc.make_step(model, tx)
  for t in range(int(restored["step"]), tc.STEPS):
    params, state = step(params, state, *tc.batch(t))
  leaves = jax.tree.leaves((params, state))
  np.savez(sys.argv[2], *[np.atleast_1d(np.asarray(x)).view(np.uint8) for x in leaves])
  """
)


def test_orbax_resume_in_a_fresh_process_is_bit_identical(tmp_path: Path) -> None:
  """No depth table or compiled function survives: only the checkpoint and the code."""
  model = Net()
  want_params, want_state = _uninterrupted(model)
  path = tmp_path / "ckpt"
  _first_part_and_save(model, path)
  out = tmp_path / "resumed.npz"
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
    [sys.executable, "-c", _RESUME_SCRIPT, str(path), str(out)],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as got:
    leaves = [got[f"arr_{i}"] for i in range(len(got.files))]
  want = jax.tree.leaves((want_params, want_state))
  assert len(leaves) == len(want)
  for g, w in zip(leaves, want, strict=True):
    assert np.array_equal(g, np.atleast_1d(np.asarray(w)).view(np.uint8))


class EncoderDecoder(nn.Module):
  """Numbered groups whose sorted order (decoder < encoder) is not the definition order."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.tanh(nn.Dense(6, name="encoder_0")(x))
    x = nn.tanh(nn.Dense(6, name="encoder_1")(x))
    x = nn.tanh(nn.Dense(6, name="decoder_0")(x))
    x = nn.tanh(nn.Dense(6, name="decoder_1")(x))
    return nn.Dense(2, name="head")(x)


@pytest.mark.parametrize("which", ["dualopt-block", "olor-tensor"])
def test_resume_with_eval_shape_init_keeps_the_depths(tmp_path: Path, which: str) -> None:
  """Sorted restore, abstract target: encoder before decoder, kernel before bias, from names."""
  model = EncoderDecoder()
  make = {
    "dualopt-block": lambda: dj.dualopt(1e-1, rollback=0.3),
    "olor-tensor": lambda: dj.olor(1e-1, back_level_max=3.0, back_pow=1.0),
  }[which]
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  y = jnp.ones((3, 2))
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  tx = make()
  want, _ = _run(tx, loss, params, tx.init(params), 6)

  tx = make()
  p3, s3 = _run(tx, loss, params, tx.init(params), 3)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": p3, "opt_state": s3})
  checkpointer.wait_until_finished()
  tx = make()
  target = {"params": jax.eval_shape(lambda: params),
            "opt_state": jax.eval_shape(tx.init, params)}
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  got, _ = _run(tx, loss, restored["params"], restored["opt_state"], 3)
  _assert_bit_identical(got, want)


def _run(tx, loss, params, state, steps):
  step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
    tx.update(jax.grad(loss)(p), s, p)))
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _save_and_restore(tmp_path: Path, params, state, tx_new):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  target = {"params": jax.eval_shape(lambda: params),
            "opt_state": dj.abstract_state(tx_new, params)}
  return checkpointer.restore(tmp_path / "ckpt", target)


@pytest.mark.parametrize(
  ("before", "after"),
  [
    ({"power": 1.0}, {"power": 2.0}),
    ({"rollback_floor": 0.0}, {"rollback_floor": 0.5}),
    ({"mode": "scratch", "decay_profile": "shallow"}, {"mode": "scratch", "decay_profile": "deep"}),
  ],
  ids=["power", "rollback_floor", "decay_profile"],
)
def test_a_restored_state_trains_with_the_new_profile_numbers(tmp_path, before, after) -> None:
  """The state keeps depths; the profile's numbers come from the transformation in use."""
  model = EncoderDecoder()
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2)
  strength = {"weight_decay": 0.1} if before.get("mode") == "scratch" else {"rollback": 0.3}
  old = dj.dualopt(1e-1, optimizer="sgd", **strength, **before)
  new = dj.dualopt(1e-1, optimizer="sgd", **strength, **after)
  p3, s3 = _run(old, loss, params, old.init(params), 3)
  restored = _save_and_restore(tmp_path, p3, s3, new)
  got, state = _run(new, loss, restored["params"], restored["opt_state"], 2)
  # The same moments, anchor and depths, with the new transformation's own profile numbers.
  (pull_new,) = _pull_states(new.init(params))
  fresh = jax.tree.map(lambda x: x, s3)
  fresh = (fresh[0], fresh[1]._replace(layer_scale=pull_new.layer_scale))
  want, _ = _run(new, loss, p3, fresh, 2)
  _assert_bit_identical(got, want)
  stale, _ = _run(old, loss, p3, s3, 2)
  assert any(not np.array_equal(a, b) for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(stale), strict=True)), "the new numbers had no effect"
  (pull,) = _pull_states(state)  # after an update the state shows the numbers in use
  assert float(pull.layer_scale.power) == float(new_power(after))
  assert float(pull.layer_scale.end) == float(pull_new.layer_scale.end)


def new_power(settings: dict) -> float:
  return settings.get("power", 1.0)


def _pull_states(state):
  kinds = (dj.RollbackState, dj.LayerwiseDecayState)
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
          if isinstance(s, kinds)]


def test_restoring_under_other_depth_settings_fails_loudly(tmp_path: Path) -> None:
  """Granularity (or order/stacked) decides the stored depths: a silent mix is impossible."""
  model = EncoderDecoder()
  x = jnp.ones((1, 4))
  params = model.init(jax.random.key(0), x)["params"]
  block = dj.dualopt(1e-2, rollback=0.3)
  tensor = dj.dualopt(1e-2, rollback=0.3, granularity="tensor")
  state = block.init(params)
  with pytest.raises(ValueError, match=r"(?s)do not match.*layer_scale.per_leaf.tensor"):
    _save_and_restore(tmp_path, params, state, tensor)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"settings 'block', but this transformation uses 'tensor'"):
    tensor.update(grads, state, params)


def test_restoring_under_another_head_fails_at_the_first_update(tmp_path: Path) -> None:
  """A state whose anchor was made for another ``head=`` never trains (no anchor read as 0)."""
  model = EncoderDecoder()
  x = jnp.ones((1, 4))
  params = model.init(jax.random.key(0), x)["params"]
  old = dj.dualopt(1e-2, rollback=0.3, head="head")
  new = dj.dualopt(1e-2, rollback=0.3, head="decoder_1")  # the old head is now rolled back
  old_state = old.init(params)
  with pytest.raises(ValueError, match="do not match"):  # Orbax refuses the other structure
    _save_and_restore(tmp_path, params, old_state, new)
  # A state assembled by hand (or by a looser restore) carrying the old anchor:
  new_state = new.init(params)
  (old_pull,), (new_pull,) = _pull_states(old_state), _pull_states(new_state)
  mixed = (new_state[0], new_state[1]._replace(
    inner_state=new_state[1].inner_state._replace(anchor=old_pull.anchor)))
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"holds no anchor for 'head/(bias|kernel)'"):
    jax.jit(new.update)(grads, mixed, params)
  assert new_pull.anchor is not old_pull.anchor


@pytest.mark.parametrize(
  "make",
  [
    lambda: dj.dualopt(1e-2, rollback=0.3, head="head"),
    lambda: dj.spd(optax.adam(1e-2), strength=1.0, mask="encoder_*"),
    lambda: dj.l2sp(1e-2, alpha=0.1, decay_to_zero="head"),
    lambda: optax.masked(dj.project_to_anchor(0.1), lambda p: {k: k != "head" for k in p}),
  ],
  ids=["dualopt_head", "spd_mask", "l2sp_decay_to_zero", "masked_projection"],
)
def test_abstract_state_is_a_restore_target_with_heads_and_masks(tmp_path: Path, make) -> None:
  model = EncoderDecoder()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  tx = make()
  state = tx.init(params)
  target = dj.abstract_state(tx, params)
  for leaf in jax.tree.leaves(target):
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None
  restored = _save_and_restore(tmp_path, params, state, tx)["opt_state"]
  _assert_bit_identical(restored, state)
