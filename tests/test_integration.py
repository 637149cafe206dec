"""dualopt_jax inside the Optax machinery a user wraps it in (issue 2, item 3).

optax.chain, inject_hyperparams (no recompilation), MultiSteps, masked /
partition, tree_map_params, bfloat16, jit with donation, and NaN gradients.
Expected values come from plain NumPy transcriptions (``tests/numpy_reference``
or the one-line SGD + pull closed form written out here), never from the code
under test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dualopt_jax as dj
from tests import numpy_reference as ref

# Block depths of ``_params`` by hand: embed 0, layers_0 1/3, layers_1 2/3, head 1,
# so fine-tune multipliers (1 - d) are:
MULTIPLIER = {"embed": 1.0, "layers_0": 2 / 3, "layers_1": 1 / 3, "head": 0.0}


def _params(seed: int = 0, dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  return {
    "embed": {"embedding": f(8, 4)},
    "layers_0": {"kernel": f(4, 4), "bias": f(4)},
    "layers_1": {"kernel": f(4, 5), "bias": f(5)},
    "head": {"kernel": f(5, 3), "bias": f(3)},
  }


def _keys(params: dict) -> list[tuple[str, str]]:
  return [(b, k) for b in params for k in params[b]]


def _np_grad(noise_t: np.ndarray, theta: np.ndarray) -> np.ndarray:
  return noise_t + 0.5 * (theta - 0.3)


def _noise(params: dict, steps: int, seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  return {
    b: {k: rng.normal(size=(steps, *np.shape(x))).astype(np.float32) for k, x in d.items()}
    for b, d in params.items()
  }


def _at(noise: dict, t: int) -> dict:
  return {b: {k: jnp.asarray(v[t]) for k, v in d.items()} for b, d in noise.items()}


def _grads(noise_t: dict, params: dict) -> dict:
  return jax.tree.map(lambda n, p: n + 0.5 * (p - 0.3), noise_t, params)


def _sgd_pull_reference(
  params: dict, noise: dict, steps: int, *, lr: float, rate: Callable[[int], float],
  selected: Callable[[str], bool], anchor: dict | None = None,
) -> dict:
  """θ̂ = θ - lr·g;  θ = θ̂ - rate(t)·(θ̂ - a) on selected blocks, plain SGD elsewhere (NumPy)."""
  theta = {b: {k: np.asarray(x, np.float64) for k, x in d.items()} for b, d in params.items()}
  a = anchor if anchor is not None else params
  a = {b: {k: np.asarray(x, np.float64) for k, x in d.items()} for b, d in a.items()}
  for t in range(steps):
    for b, k in _keys(params):
      pre = theta[b][k] - lr * _np_grad(noise[b][k][t], theta[b][k])
      lam = rate(t) if selected(b) else 0.0
      theta[b][k] = pre - lam * (pre - a[b][k])
  return theta


def _assert_tree_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
  for b, k in _keys(expected):
    np.testing.assert_allclose(
      np.asarray(actual[b][k], np.float64), expected[b][k], rtol=rtol, atol=1e-6, err_msg=f"{b}/{k}"
    )


def _find(state, kind: type) -> list:
  return [
    x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)
  ]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


# --- optax.chain -------------------------------------------------------------------------------


def test_chain_with_clipping_sgd_and_rollback_matches_numpy() -> None:
  params, steps, lr = _params(), 6, 0.05
  noise = _noise(params, steps)
  rate = lambda t: 0.05 + 0.02 * t  # a schedule of the step count (0 on the first update)
  tx = optax.chain(
    optax.clip_by_global_norm(1e6),  # inactive: the chain, not the clipping, is tested
    optax.sgd(lr),
    dj.rollback_to(rate=rate),
    optax.identity(),
  )

  @jax.jit
  def step(p, s, n):
    u, s = tx.update(_grads(n, p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for t in range(steps):
    p, s = step(p, s, _at(noise, t))
  expected = _sgd_pull_reference(params, noise, steps, lr=lr, rate=rate, selected=lambda b: True)
  _assert_tree_close(p, expected)


# --- optax.inject_hyperparams ------------------------------------------------------------------


def _compilations(jitted) -> int | None:
  """Entries in the jit cache (a private JAX API: None where it is gone)."""
  size = getattr(jitted, "_cache_size", None)
  return size() if callable(size) else None


def _set(state, name: str, value: float) -> None:
  old = state.hyperparams[name]
  state.hyperparams[name] = jnp.asarray(value, dtype=old.dtype)


def test_inject_hyperparams_rollback_to_changes_rate_without_recompiling() -> None:
  params, steps, lr = _params(), 6, 0.05
  noise = _noise(params, steps)
  rates = [0.1, 0.1, 0.4, 0.4, 0.0, 0.25]
  tx = optax.chain(optax.sgd(lr), optax.inject_hyperparams(dj.rollback_to)(rate=rates[0]))
  traces = []

  @jax.jit
  def step(p, s, n):
    traces.append(1)  # runs only while tracing
    u, s = tx.update(_grads(n, p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for t in range(steps):
    _set(s[1], "rate", rates[t])
    p, s = step(p, s, _at(noise, t))
  assert len(traces) == 1
  assert _compilations(step) in (None, 1)
  expected = _sgd_pull_reference(
    params, noise, steps, lr=lr, rate=lambda t: rates[t], selected=lambda b: True
  )
  _assert_tree_close(p, expected)


def _dualopt_injected_run(make_tx: Callable[..., optax.GradientTransformation]) -> None:
  """Changes learning rate and rollback between steps; one compilation; NumPy Adam reference."""
  params, steps, peak = _params(), 8, 1e-2
  noise = _noise(params, steps)
  lrs = [1e-2, 1e-2, 5e-3, 5e-3, 5e-3, 2e-3, 1e-2, 1e-2]
  rollbacks = [0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 0.0, 0.5]
  tx = make_tx(learning_rate=lrs[0], rollback=rollbacks[0], rollback_floor=0.0,
               peak_learning_rate=peak)
  traces = []

  @jax.jit
  def step(p, s, n):
    traces.append(1)
    u, s = tx.update(_grads(n, p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for t in range(steps):
    _set(s, "learning_rate", lrs[t])
    _set(s, "rollback", rollbacks[t])
    p, s = step(p, s, _at(noise, t))
  assert len(traces) == 1 and _compilations(step) in (None, 1)

  keys = _keys(params)
  out = ref.run(
    [np.asarray(params[b][k]) for b, k in keys],
    lambda t, theta: [_np_grad(noise[b][k][t], th) for (b, k), th in zip(keys, theta, strict=True)],
    steps=steps,
    lr=lambda t: lrs[t],
    fraction=lambda t: rollbacks[t] * lrs[t] / peak,  # rollback follows the lr, 'rollback' at peak
    multipliers=[MULTIPLIER[b] for b, _ in keys],
  )
  for (b, k), want in zip(keys, out, strict=True):
    np.testing.assert_allclose(np.asarray(p[b][k]), want, rtol=2e-5, atol=1e-6, err_msg=f"{b}/{k}")


def test_inject_hyperparams_dualopt_lr_and_rollback_without_recompiling() -> None:
  _dualopt_injected_run(optax.inject_hyperparams(dj.dualopt, static_args=("power",)))


def test_inject_hyperparams_dualopt_plain_call() -> None:
  _dualopt_injected_run(optax.inject_hyperparams(dj.dualopt))


# --- optax.MultiSteps --------------------------------------------------------------------------


def test_multisteps_updates_every_k_and_counts_real_updates() -> None:
  params, k, real, lr = _params(), 3, 4, 0.05
  steps = k * real
  noise = _noise(params, steps)
  rate = lambda c: 0.1 + 0.1 * c  # wrong results if the rollback count advanced per micro-step
  tx = optax.MultiSteps(optax.chain(optax.sgd(lr), dj.rollback_to(rate=rate)), every_k_schedule=k)

  @jax.jit
  def step(p, s, n):
    u, s = tx.update(_grads(n, p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for t in range(steps):
    before = p
    p, s = step(p, s, _at(noise, t))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(p),
                                                      strict=True)]
    assert all(changed) if (t + 1) % k == 0 else not any(changed), t
    (rollback_state,) = _find(s, dj.RollbackState)
    assert int(rollback_state.count) == (t + 1) // k

  # NumPy: the mean gradient of each window (params fixed inside it), then SGD + pull.
  theta = {b: {kk: np.asarray(x, np.float64) for kk, x in d.items()} for b, d in params.items()}
  for j in range(real):
    for b, kk in _keys(params):
      g = np.mean([_np_grad(noise[b][kk][j * k + i], theta[b][kk]) for i in range(k)], axis=0)
      pre = theta[b][kk] - lr * g
      theta[b][kk] = pre - rate(j) * (pre - np.asarray(params[b][kk], np.float64))
  _assert_tree_close(p, theta)


def test_multisteps_wraps_dualopt() -> None:
  params, k = _params(), 2
  tx = optax.MultiSteps(dj.dualopt(1e-2, rollback=0.1), every_k_schedule=k)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  for t in range(2 * k):
    u, state = step(_grads(_at(_noise(params, 1, seed=t), 0), p), state, p)
    p = optax.apply_updates(p, u)
  (rollback_state,) = _find(state, dj.RollbackState)
  assert int(rollback_state.count) == 2
  for a, b in zip(jax.tree.leaves(rollback_state.anchor), jax.tree.leaves(params), strict=True):
    assert np.array_equal(a, b)


# --- optax.masked / optax.partition ------------------------------------------------------------

MASK = {
  "embed": {"embedding": False},
  "layers_0": {"kernel": True, "bias": True},
  "layers_1": {"kernel": True, "bias": True},
  "head": {"kernel": False, "bias": False},
}


def _run(tx, params, noise, steps):
  @jax.jit
  def step(p, s, n):
    u, s = tx.update(_grads(n, p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for t in range(steps):
    p, s = step(p, s, _at(noise, t))
  return p, s


def _check_masked_anchor(anchor: dict, params0: dict) -> None:
  for b, k in _keys(params0):
    if MASK[b][k]:
      assert np.array_equal(anchor[b][k], params0[b][k]), f"{b}/{k}"
    else:
      assert _is_masked(anchor[b][k]), f"{b}/{k} stores an anchor although masked out"
  stored = jax.tree.leaves(anchor)
  assert len(stored) == sum(MASK[b][k] for b, k in _keys(params0))


@pytest.mark.parametrize("mask_kind", ["pytree", "callable"])
def test_masked_rollback_to_given_the_full_params0(mask_kind: str) -> None:
  params, steps, lr, rate = _params(), 5, 0.05, 0.2
  params0 = _params(seed=7)  # a different anchor, over ALL leaves (also the masked-out ones)
  noise = _noise(params, steps)
  by_block = lambda tree: {b: jax.tree.map(lambda _, b=b: b.startswith("layers"), d)
                          for b, d in tree.items()}
  mask = MASK if mask_kind == "pytree" else by_block
  tx = optax.chain(optax.sgd(lr), optax.masked(dj.rollback_to(params0, rate=rate), mask))
  p, s = _run(tx, params, noise, steps)
  (rollback_state,) = _find(s, dj.RollbackState)
  _check_masked_anchor(rollback_state.anchor, params0)
  expected = _sgd_pull_reference(
    params, noise, steps, lr=lr, rate=lambda t: rate, selected=lambda b: b.startswith("layers"),
    anchor=params0,
  )
  _assert_tree_close(p, expected)


def test_partition_with_rollback_group() -> None:
  params, steps, lr, rate = _params(), 5, 0.05, 0.2
  params0 = _params(seed=7)
  noise = _noise(params, steps)
  labels = jax.tree.map(lambda m: "pull" if m else "plain", MASK)
  tx = optax.partition(
    {
      "pull": optax.chain(optax.sgd(lr), dj.rollback_to(params0, rate=rate)),
      "plain": optax.sgd(lr),
    },
    labels,
  )
  p, s = _run(tx, params, noise, steps)
  (rollback_state,) = _find(s, dj.RollbackState)
  _check_masked_anchor(rollback_state.anchor, params0)
  expected = _sgd_pull_reference(
    params, noise, steps, lr=lr, rate=lambda t: rate, selected=lambda b: b.startswith("layers"),
    anchor=params0,
  )
  _assert_tree_close(p, expected)


# --- optax.tree_map_params ---------------------------------------------------------------------


def test_tree_map_params_maps_the_anchor_and_derives_shardings() -> None:
  params = _params()
  tx = dj.dualopt(1e-2, rollback=0.1, head="head")
  state = tx.init(params)

  zeros = optax.tree_map_params(tx, lambda x: jnp.full_like(x, 7.0), state)
  (rollback_state,) = _find(zeros, dj.RollbackState)
  anchor_leaves = jax.tree.leaves(rollback_state.anchor)
  assert len(anchor_leaves) == 5  # the head (2 leaves) is masked out: no anchor
  assert all(np.all(np.asarray(a) == 7.0) for a in anchor_leaves)
  (adam,) = _find(zeros, optax.ScaleByAdamState)
  assert all(np.all(np.asarray(m) == 7.0) for m in jax.tree.leaves(adam.mu))
  assert int(adam.count) == 0 and int(rollback_state.count) == 0  # non-param leaves untouched

  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  replicated = NamedSharding(mesh, P())
  split = lambda x: NamedSharding(mesh, P("d")) if np.shape(x)[0] % 8 == 0 else replicated
  shardings = optax.tree_map_params(
    tx, split, state, transform_non_params=lambda _: replicated
  )
  (rb_shardings,) = _find(shardings, dj.RollbackState)
  assert rb_shardings.anchor["embed"]["embedding"] == NamedSharding(mesh, P("d"))
  assert rb_shardings.anchor["layers_0"]["kernel"] == replicated
  param_shardings = jax.tree.map(split, params)
  sharded_state = jax.device_put(state, shardings)
  sharded_params = jax.device_put(params, param_shardings)

  step = jax.jit(
    lambda g, s, p: tx.update(g, s, p),
    in_shardings=(param_shardings, shardings, param_shardings),
    out_shardings=(param_shardings, shardings),
  )
  grads = _grads(_at(_noise(params, 1), 0), params)
  u_sharded, s_sharded = step(grads, sharded_state, sharded_params)
  u_plain, s_plain = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(u_sharded), jax.tree.leaves(u_plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  (rb,) = _find(s_sharded, dj.RollbackState)
  assert rb.anchor["embed"]["embedding"].sharding.spec == P("d")


# --- bfloat16 ----------------------------------------------------------------------------------


def _tree_nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_bfloat16_params_keep_their_dtype() -> None:
  params = _params(dtype=jnp.bfloat16)
  tx = dj.dualopt(1e-2, rollback=0.1, head="head")
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  for tree in (updates, new):
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(tree))
  float_state = [  # param-sized state; depths, profile numbers and rates are float32 scalars
    x for path, x in jax.tree_util.tree_leaves_with_path(state)
    if jnp.issubdtype(x.dtype, jnp.floating)
    and not any(k in jax.tree_util.keystr(path) for k in ("layer_scale", ".rate"))
  ]
  assert float_state and all(x.dtype == jnp.bfloat16 for x in float_state)
  (rb,) = _find(state, dj.RollbackState)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(rb.anchor))


def test_anchor_dtype_bfloat16_halves_the_anchor_and_pulls_toward_the_rounded_anchor() -> None:
  params = _params()
  params0 = _params(seed=3)
  lr, rate = 0.1, 0.25
  tx = optax.chain(optax.sgd(lr), dj.rollback_to(params0, rate=rate, anchor_dtype=jnp.bfloat16))
  state = tx.init(params)
  (rb,) = _find(state, dj.RollbackState)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(rb.anchor))
  assert 2 * _tree_nbytes(rb.anchor) == _tree_nbytes(params0)
  f32_state = optax.chain(optax.sgd(lr), dj.rollback_to(params0, rate=rate)).init(params)
  (rb32,) = _find(f32_state, dj.RollbackState)
  assert 2 * _tree_nbytes(rb.anchor) == _tree_nbytes(rb32.anchor)

  noise = _noise(params, 1)
  p, _ = _run(tx, params, noise, 1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  rounded = jax.tree.map(
    lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64), params0
  )
  expected = _sgd_pull_reference(
    params, noise, 1, lr=lr, rate=lambda t: rate, selected=lambda b: True, anchor=rounded
  )
  _assert_tree_close(p, expected)


# --- jax.jit with donation ---------------------------------------------------------------------


def test_jit_with_donated_params_and_state() -> None:
  params, steps = _params(), 4
  noise = _noise(params, steps)
  tx = dj.dualopt(1e-2, rollback=0.2)

  def step(p, s, n):
    u, s = tx.update(_grads(n, p), s, p)
    return optax.apply_updates(p, u), s

  donating = jax.jit(step, donate_argnums=(0, 1))
  plain = jax.jit(step)
  p_ref, s_ref = params, tx.init(params)
  for t in range(steps):
    p_ref, s_ref = plain(p_ref, s_ref, _at(noise, t))

  p = jax.tree.map(jnp.copy, params)
  s = tx.init(p)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. "Some donated buffers were not usable"
    for t in range(steps):
      old_p, old_s = p, s
      p, s = donating(p, s, _at(noise, t))
      assert all(x.is_deleted() for x in jax.tree.leaves(old_p))
      # Every param-sized buffer is donated (the moments, the anchor, the depths); the profile
      # numbers and the rate mirrored for describe() are constants XLA returns as new arrays.
      mirrored = lambda path: any(k in jax.tree_util.keystr(path) for k in (
        ".numbers", ".rate"))
      assert all(x.is_deleted() for path, x in jax.tree_util.tree_leaves_with_path(old_s)
                 if not mirrored(path))
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref)), strict=True):
    assert np.array_equal(a, b)
  (rb,) = _find(s, dj.RollbackState)
  for a, b in zip(jax.tree.leaves(rb.anchor), jax.tree.leaves(params), strict=True):
    assert np.array_equal(a, b)  # the anchor is its own buffer, not an alias of donated params


# --- NaN / inf gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_apply_if_finite_skips_a_nonfinite_step_without_touching_the_anchor(bad: float) -> None:
  params = _params()
  tx = optax.apply_if_finite(dj.dualopt(1e-2, rollback=0.2), max_consecutive_errors=3)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  s = tx.init(params)
  p = params
  for t in range(2):
    u, s = step(_grads(_at(_noise(params, 1, seed=t), 0), p), s, p)
    p = optax.apply_updates(p, u)
  (rb_before,) = _find(s, dj.RollbackState)
  bad_grads = jax.tree.map(lambda x: x.at[0].set(bad), _grads(_at(_noise(params, 1), 0), p))
  u, s_after = step(bad_grads, s, p)
  p_after = optax.apply_updates(p, u)
  for a, b in zip(jax.tree.leaves(p_after), jax.tree.leaves(p), strict=True):
    assert np.array_equal(a, b)
  (rb_after,) = _find(s_after, dj.RollbackState)
  for a, b in zip(jax.tree.leaves(rb_after), jax.tree.leaves(rb_before), strict=True):
    assert np.array_equal(a, b)
  assert int(s_after.notfinite_count) == 1
  # Training continues afterwards with finite gradients.
  u, s_next = step(_grads(_at(_noise(params, 1, seed=5), 0), p_after), s_after, p_after)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(optax.apply_updates(p_after, u)))
  assert int(s_next.notfinite_count) == 0


def test_nonfinite_gradient_never_changes_the_anchor_without_a_guard() -> None:
  params = _params()
  params0 = _params(seed=9)
  tx = dj.dualopt(1e-2, rollback=0.2)
  state = tx.init(params0)
  (rb_before,) = _find(state, dj.RollbackState)
  grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan).at[0].set(jnp.inf), params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  (rb_after,) = _find(new_state, dj.RollbackState)
  for a, b in zip(jax.tree.leaves(rb_after.anchor), jax.tree.leaves(rb_before.anchor), strict=True):
    assert np.array_equal(a, b)
  for a, b in zip(jax.tree.leaves(rb_after.anchor), jax.tree.leaves(params0), strict=True):
    assert np.array_equal(a, b)


def test_inject_hyperparams_power_changes_the_profile() -> None:
  """The per-leaf scales live in the state, but an injected ``power`` still takes effect."""
  params = {"layers_0": {"w": jnp.ones(2)}, "layers_1": {"w": jnp.ones(2)},
            "layers_2": {"w": jnp.ones(2)}}
  tx = optax.inject_hyperparams(dj.dualopt)(learning_rate=0.1, rollback=0.5, rollback_floor=0.0,
                                            optimizer="sgd",
                                            momentum=0.0)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  # SGD step -0.1, then the pull back by lambda = 0.5 * (1 - d)^power of the distance 0.1.
  for power in (1.0, 2.0):
    state.hyperparams["power"] = jnp.asarray(power)
    updates, state = step(grads, state, params)
    for i, block in enumerate(("layers_0", "layers_1", "layers_2")):
      lam = 0.5 * (1 - i / 2) ** power
      np.testing.assert_allclose(updates[block]["w"], -0.1 * (1 - lam), rtol=1e-5, err_msg=block)
