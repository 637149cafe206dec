"""dualopt / olor against the NumPy transcription of ALGORITHMS.md, over hundreds of steps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualopt_jax as dj
from tests import numpy_reference as ref

STEPS = 300
PEAK, WARMUP = 1e-2, 30


def _model_params(seed: int = 0) -> dict:
  """Embedding, three numbered blocks (``layers_10`` must sort after ``layers_1``) and a head."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
    "embed": {"embedding": f(10, 4)},
    "layers_0": {"kernel": f(4, 4), "bias": f(4)},
    "layers_1": {"kernel": f(4, 5), "bias": f(5)},
    "layers_10": {"kernel": f(5, 4), "bias": f(4)},
    "head": {"kernel": f(4, 3), "bias": f(3)},
  }


# The backbone's blocks in input-to-output order, by hand; the head is excluded.
BLOCK_ORDER = ["embed", "layers_0", "layers_1", "layers_10"]


def _flat(params: dict, names: list[str]) -> list[tuple[str, str]]:
  return [(block, leaf) for block in names for leaf in params[block]]


def _noise(params: dict, steps: int, seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  return {
    b: {k: rng.normal(size=(steps, *np.shape(x))).astype(np.float32) for k, x in d.items()}
    for b, d in params.items()
  }


def _grad(noise_t: np.ndarray, theta: np.ndarray) -> np.ndarray:
  return noise_t + 0.5 * (theta - 0.3)


def _run_optax(tx: optax.GradientTransformation, params: dict, noise: dict, steps: int) -> dict:
  @jax.jit
  def step(params, state, noise_t):
    grads = jax.tree.map(_grad, noise_t, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(steps):
    params, state = step(params, state, jax.tree.map(lambda n, t=t: n[t], noise))
  return params


def _run_reference(params: dict, noise: dict, steps: int, multipliers: dict, **kw) -> dict:
  keys = _flat(params, list(params))
  kw.setdefault("dtype", np.dtype(jax.tree.leaves(params)[0].dtype).type)
  if kw["dtype"] not in (np.float32, np.float64):
    kw["dtype"] = np.float32
  out = ref.run(
    [np.asarray(params[b][k]) for b, k in keys],
    lambda t, theta: [_grad(noise[b][k][t], th) for (b, k), th in zip(keys, theta, strict=True)],
    steps=steps,
    multipliers=[multipliers.get(b, 0.0) for b, _ in keys],
    **kw,
  )
  result: dict = {b: {} for b in params}
  for (b, k), value in zip(keys, out, strict=True):
    result[b][k] = value
  return result


def _assert_close(actual: dict, expected: dict, dtype: str = "float32") -> None:
  """float64: elementwise to 1e-6 relative. float32: 2e-5 relative per tensor norm.

  float64 is where the algebra is checked: the remaining 1e-9-level gap is the
  learning-rate schedule, which Optax evaluates in float32 even under x64.
  In float32, plain ``optax.adam`` itself ends 3.5e-6 (norm-relative) away
  from a float32 NumPy Adam after these 300 noisy steps at lr 1e-2 (XLA's
  float32 arithmetic, amplified early when v is small; BUILD_NOTES.md), so the
  float32 bound is 2e-5 per tensor.
  """
  for b in expected:
    for k in expected[b]:
      got = np.asarray(actual[b][k], np.float64)
      want = expected[b][k]
      if dtype == "float64":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=f"{b}/{k}")
      else:
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert error <= 2e-5, f"{b}/{k}: relative error {error:.3g} > 2e-5"


def _cast(tree: dict, dtype: str) -> dict:
  """Casts leaves keeping dict insertion order (``jax.tree.map`` would sort the keys)."""
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return jnp.asarray(tree, dtype)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs the test body in float32, and in float64 with x64 enabled."""
  with jax.enable_x64(request.param == "float64"):
    yield request.param


@pytest.mark.parametrize(
  ("optimizer", "power", "floor"),
  [("adam", 1.0, 0.0), ("adam", 2.0, 0.0), ("sgd", 1.0, 0.0), ("sgd", 2.0, 0.0),
   ("adam", 1.0, 0.25)],
)
def test_finetune_matches_numpy_reference(
  optimizer: str, power: float, floor: float, dtype: str
) -> None:
  params = _cast(_model_params(), dtype)
  noise = _noise(params, STEPS)
  peak = PEAK if optimizer == "adam" else 1e-3
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, WARMUP, STEPS, end_value=0.0)
  rollback = 0.05
  tx = dj.dualopt(
    schedule, rollback=rollback, power=power, head="head", optimizer=optimizer,
    peak_learning_rate=peak, rollback_floor=floor,
  )
  lr = ref.warmup_cosine(peak, WARMUP, STEPS)
  by_hand = {b: floor + (1.0 - i / 3) ** power * (1 - floor) for i, b in enumerate(BLOCK_ORDER)}
  expected = _run_reference(
    params, noise, STEPS, by_hand, lr=lr, fraction=lambda t: rollback * lr(t) / peak,
    optimizer=optimizer,
  )
  _assert_close(_run_optax(tx, params, noise, STEPS), expected, dtype)
  # The rollback is doing something: without it the result is measurably different.
  plain = _run_reference(params, noise, STEPS, {}, lr=lr, fraction=lambda t: 0.0,
                         optimizer=optimizer)
  assert np.abs(plain["embed"]["embedding"] - expected["embed"]["embedding"]).max() > 1e-3


def test_finetune_defaults_are_the_documented_rollback_and_floor(dtype: str) -> None:
  # Documented defaults (docstring, BUILD_NOTES "Fine-tune defaults"): rollback 0.01, floor 0.25,
  # linear profile, Adam(0.9, 0.999, 1e-8).
  params = _cast(_model_params(1), dtype)
  noise = _noise(params, STEPS, seed=5)
  schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, STEPS, end_value=0.0)
  tx = dj.dualopt(schedule, head="head", peak_learning_rate=PEAK)
  lr = ref.warmup_cosine(PEAK, WARMUP, STEPS)
  by_hand = {b: 0.25 + (1.0 - i / 3) * 0.75 for i, b in enumerate(BLOCK_ORDER)}
  expected = _run_reference(params, noise, STEPS, by_hand, lr=lr,
                            fraction=lambda t: 0.01 * lr(t) / PEAK)
  _assert_close(_run_optax(tx, params, noise, STEPS), expected, dtype)


@pytest.mark.parametrize(
  ("profile", "follows_lr"), [("shallow", True), ("deep", False), ("flat", True)]
)
def test_scratch_matches_numpy_reference(profile: str, follows_lr: bool, dtype: str) -> None:
  params = _cast({b: v for b, v in _model_params(2).items() if b != "head"}, dtype)
  noise = _noise(params, STEPS, seed=3)
  schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, STEPS, end_value=0.0)
  wd = 0.02
  tx = dj.dualopt(
    schedule, mode="scratch", weight_decay=wd, power=2.0, decay_profile=profile,
    decay_follows_lr=follows_lr, peak_learning_rate=PEAK,
  )
  lr = ref.warmup_cosine(PEAK, WARMUP, STEPS)
  depth = {b: i / 3 for i, b in enumerate(BLOCK_ORDER)}
  by_hand = {
    b: {"shallow": (1 - d) ** 2, "deep": d**2, "flat": 1.0}[profile] for b, d in depth.items()
  }
  fraction = (lambda t: wd * lr(t) / PEAK) if follows_lr else (lambda t: wd)
  expected = _run_reference(
    params, noise, STEPS, by_hand, lr=lr, fraction=fraction, anchor="zero"
  )
  _assert_close(_run_optax(tx, params, noise, STEPS), expected, dtype)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_olor_tensor_granularity_on_linen_mlp(optimizer: str, dtype: str) -> None:
  params = _cast(_MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"], dtype)
  # Forward order, written out by hand: each layer's kernel before its bias, and the LayerNorm
  # (whose place the names do not say) between Dense_0 and Dense_1.
  order = [
    ("Dense_0", "kernel"), ("Dense_0", "bias"), ("LayerNorm_0", "scale"),
    ("LayerNorm_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias"),
    ("Dense_2", "kernel"), ("Dense_2", "bias"),
  ]
  peak = 1e-2 if optimizer == "adam" else 1e-3
  kappa_max = 0.02 / peak
  kappa = ref.olor_kappa(len(order), kappa_max, 0.1, 1.0)
  rng = np.random.default_rng(5)
  noise = {b: {k: rng.normal(size=(STEPS, *np.shape(params[b][k]))).astype(np.float32)
               for bb, k in order if bb == b} for b in params}
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, WARMUP, STEPS, end_value=0.0)
  forward = dj.forward_order(lambda p, x: _MLP().apply({"params": p}, x), params, jnp.ones((1, 4)))
  tx = dj.olor(schedule, back_level_max=kappa_max, back_level_min=0.1, back_pow=1.0,
               optimizer=optimizer, order=forward)
  lr = ref.warmup_cosine(peak, WARMUP, STEPS)
  out = ref.run(
    [np.asarray(params[b][k]) for b, k in order],
    lambda t, th: [_grad(noise[b][k][t], x) for (b, k), x in zip(order, th, strict=True)],
    steps=STEPS, lr=lr, fraction=lr, multipliers=kappa, optimizer=optimizer,
    dtype=np.float32 if dtype == "float32" else np.float64,
  )
  expected = {b: {} for b in params}
  for (b, k), value in zip(order, out, strict=True):
    expected[b][k] = value
  _assert_close(_run_optax(tx, dict(params), noise, STEPS), expected, dtype)


def test_bf16_params_keep_dtype_and_follow_reference_loosely() -> None:
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _model_params())
  noise = _noise(params, 50)
  # Floor 0: with the default floor the last layer's small per-step pull is partly lost to bf16
  # rounding (7 % on a 4-element bias after 50 steps; BUILD_NOTES "Fine-tune defaults").
  tx = dj.dualopt(1e-2, rollback=0.05, rollback_floor=0.0, head="head",
                  anchor_dtype=jnp.bfloat16)
  out = _run_optax(tx, params, noise, 50)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  by_hand = {b: 1.0 - i / 3 for i, b in enumerate(BLOCK_ORDER)}
  expected = _run_reference(
    jax.tree.map(lambda x: np.asarray(x, np.float32), params), noise, 50, by_hand,
    lr=lambda t: 1e-2, fraction=lambda t: 0.05,
  )
  for b in expected:  # bf16 weights round each step: agreement to a few % of the tensor's norm
    for k in expected[b]:
      got = np.asarray(out[b][k].astype(jnp.float32), np.float64)
      error = np.linalg.norm(got - expected[b][k]) / np.linalg.norm(expected[b][k])
      assert error < 5e-2, f"{b}/{k}: {error:.3g}"


def test_schedule_without_peak_learning_rate_is_rejected() -> None:
  schedule = optax.cosine_decay_schedule(1e-3, 100)
  with pytest.raises(ValueError, match="peak_learning_rate"):
    dj.dualopt(schedule)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"mode": "pretrain"}, r"mode must be one of \('finetune', 'scratch'\)"),
    ({"granularity": "layer"}, r"granularity must be one of \('block', 'tensor'\)"),
    ({"optimizer": "lion"}, r"optimizer must be one of \('adam', 'sgd'\)"),
    ({"rollback": 1.5}, r"rollback must lie in \[0, 1\]"),
    ({"rollback": -0.1}, r"rollback must lie in \[0, 1\]"),
    ({"rollback_floor": 2.0}, r"rollback_floor must lie in \[0, 1\]"),
    ({"mode": "scratch", "weight_decay": 2.0}, r"weight_decay must lie in \[0, 1\]"),
    ({"mode": "scratch", "decay_profile": "middle"}, r"decay_profile must be one of"),
  ],
)
def test_bad_choices_list_the_valid_ones(kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    dj.dualopt(1e-3, **kwargs)


def test_olor_rollback_fraction_above_one_is_rejected_at_init() -> None:
  tx = dj.olor(1e-2, back_level_max=200.0)  # λ = 1e-2 * 200 = 2 on the first tensor
  with pytest.raises(ValueError, match=r"per-step fraction must stay in \[0, 1\]"):
    tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})


def test_olor_without_a_forward_order_names_the_ambiguous_groups() -> None:
  params = _MLP().init(jax.random.key(1), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"(?s)'Dense_\*', 'LayerNorm_0'.*dj\.forward_order"):
    dj.olor(0.1).init(params)


@pytest.mark.parametrize("jit_init", [False, True])
def test_olor_with_head_indexes_the_backbone_in_forward_order(jit_init: bool) -> None:
  """``head=`` masks through ``optax.masked``, whose init sees a key-sorted copy of the params."""
  params = _MLP().init(jax.random.key(1), jnp.ones((1, 4)))["params"]
  backbone = [("Dense_0", "kernel"), ("Dense_0", "bias"), ("LayerNorm_0", "scale"),
              ("LayerNorm_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias")]
  lr, kappa_max = 0.1, 5.0
  kappa = ref.olor_kappa(len(backbone), kappa_max, 0.0, 1.0)
  forward = dj.forward_order(lambda p, x: _MLP().apply({"params": p}, x), params, jnp.ones((1, 4)))
  tx = dj.olor(lr, back_level_max=kappa_max, back_pow=1.0, optimizer="sgd", head="Dense_2",
               order=forward)
  state = jax.jit(tx.init)(params) if jit_init else tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  updates, _ = tx.update(grads, state, params)
  # SGD's first step is -lr*g; the rollback then adds lr*kappa_i*lr*g: recover kappa_i per tensor.
  for (block, leaf), want in zip(backbone, kappa, strict=True):
    got = (np.asarray(updates[block][leaf]) + lr * 0.5) / (lr * lr * 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{block}/{leaf}")
  np.testing.assert_allclose(np.asarray(updates["Dense_2"]["kernel"]), -lr * 0.5, rtol=1e-6)


@pytest.mark.parametrize("init", ["eager", "jit", "eval_shape_structs"])
def test_olor_on_a_bias_free_mlp_whose_keys_happen_to_be_sorted(init: str) -> None:
  """Dense_0 .. Dense_3 kernels only: every wrapping gives the tensor indices 0, 1/3, 2/3, 1."""

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(4):
        x = nn.Dense(3, use_bias=False)(x)
      return x

  params = Mlp().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  tx = dj.olor(0.1, back_level_max=1.0, back_pow=1.0)
  if init == "eager":
    state = tx.init(params)
  elif init == "jit":
    state = jax.jit(tx.init)(params)
  else:
    state = tx.init(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  rows = {r["path"]: r for r in dj.describe(params, state)}
  assert [rows[f"Dense_{i}/kernel"]["depth"] for i in range(4)] == pytest.approx(
    [0, 1 / 3, 2 / 3, 1])
