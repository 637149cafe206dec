"""dualopt_jax with real Flax models (issue 2, item 3).

Linen ``TrainState``, ``nnx.Optimizer`` (Variable-wrapped ``init``) in fine-tune
and scratch mode and with ``granularity="tensor"``, masks built from
``nnx.state`` (flax#5372), and per-slice strengths of ``nn.scan`` / ``nnx.vmap``
stacked layers. Expected values: ``tests/numpy_reference`` with per-layer
multipliers written out by hand, or the one-step SGD closed form.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import dualopt_jax as dj
from tests import numpy_reference as ref


def _flat(tree: Any) -> dict[str, Any]:
  """Leaves by 'a/b/c' path (NNX ``.value`` steps and Linen's 'params' key dropped)."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = []
    for k in kp:
      name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
      if name in ("value", "raw_value"):
        continue
      parts.append(str(name))
    if parts and parts[0] == "params":
      parts = parts[1:]
    out["/".join(parts)] = leaf
  return out


def _find(state: Any, kind: type) -> list:
  return [
    x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)
  ]


def _np_grad(noise_t: np.ndarray, theta: np.ndarray) -> np.ndarray:
  return noise_t + 0.5 * (theta - 0.3)


def _synthetic_loss(noise: dict[str, jax.Array], params: Any) -> jax.Array:
  """Sum over leaves of noise·p + 0.25 (p - 0.3)^2: gradient ``noise + 0.5 (p - 0.3)``."""
  flat = _flat(params)
  return sum(jnp.sum(noise[k] * p + 0.25 * (p - 0.3) ** 2) for k, p in flat.items())


def _noise(params: Any, steps: int, seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    k: rng.normal(size=(steps, *np.shape(x))).astype(np.float32) for k, x in _flat(params).items()
  }


def _reference(
  params0: Any, noise: dict, steps: int, *, lr: float, fraction: float,
  multiplier: dict[str, float], optimizer: str = "adam", anchor: str = "params0",
) -> dict[str, np.ndarray]:
  flat0 = _flat(params0)
  keys = list(flat0)
  out = ref.run(
    [np.asarray(flat0[k]) for k in keys],
    lambda t, theta: [_np_grad(noise[k][t], th) for k, th in zip(keys, theta, strict=True)],
    steps=steps,
    lr=lambda t: lr,
    fraction=lambda t: fraction,
    multipliers=[multiplier[k] for k in keys],
    optimizer=optimizer,
    anchor=anchor,
  )
  return dict(zip(keys, out, strict=True))


def _assert_close(actual: Any, expected: dict[str, np.ndarray], rtol: float = 2e-5) -> None:
  flat = _flat(actual)
  assert set(flat) == set(expected)
  for k, want in expected.items():
    np.testing.assert_allclose(np.asarray(flat[k], np.float64), want, rtol=rtol, atol=1e-6,
                               err_msg=k)


# --- Linen + TrainState ------------------------------------------------------------------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(10, 6, name="embed")(tokens)
    x = nn.tanh(nn.Dense(6, name="layers_0")(x))
    x = nn.tanh(nn.Dense(5, name="layers_1")(x))
    return nn.Dense(3, name="head")(x.mean(axis=1))


def test_linen_train_state_with_dualopt() -> None:
  model = LinenNet()
  tokens = jnp.arange(8).reshape(2, 4)
  params = model.init(jax.random.key(0), tokens)["params"]
  lr, rollback, steps = 1e-2, 0.2, 6
  noise = _noise(params, steps)
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params,
    tx=dj.dualopt(lr, rollback=rollback, rollback_floor=0.0, head="head"),
  )

  @jax.jit
  def train_step(state, noise_t):
    grads = jax.grad(lambda p: _synthetic_loss(noise_t, p))(state.params)
    return state.apply_gradients(grads=grads)

  for t in range(steps):
    state = train_step(state, {k: v[t] for k, v in noise.items()})
  # The head is excluded from the profile: embed 0, layers_0 1/2, layers_1 1.
  per_block = {"embed": 1.0, "layers_0": 0.5, "layers_1": 0.0, "head": 0.0}
  multiplier = {k: per_block[k.split("/")[0]] for k in _flat(params)}
  _assert_close(state.params, _reference(params, noise, steps, lr=lr, fraction=rollback,
                                         multiplier=multiplier))
  assert int(state.step) == steps
  (rb,) = _find(state.opt_state, dj.RollbackState)
  anchor = _flat(rb.anchor)
  assert "head/kernel" not in anchor or isinstance(anchor["head/kernel"], optax.MaskedNode)
  for k, v in _flat(params).items():
    if not k.startswith("head"):
      assert np.array_equal(anchor[k], v), k

  # A real loss through the model also trains (finite, loss goes down).
  labels = jnp.array([0, 2])
  real_loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, tokens), labels).mean()
  real_step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(real_loss)(s.params)))
  before = float(real_loss(state.params))
  for _ in range(5):
    state = real_step(state)
  assert float(real_loss(state.params)) < before


# --- NNX + nnx.Optimizer -----------------------------------------------------------------------


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 6, rngs=rngs)
    self.layers_0 = nnx.Linear(6, 6, rngs=rngs)
    self.layers_1 = nnx.Linear(6, 5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    x = jnp.tanh(self.layers_0(x))
    x = jnp.tanh(self.layers_1(x))
    return self.head(x.mean(axis=1))


def _train_nnx(model: nnx.Module, tx: optax.GradientTransformation, noise: dict, steps: int):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # init gets Variable-wrapped leaves

  @nnx.jit
  def train_step(model, optimizer, noise_t):
    grads = nnx.grad(lambda m: _synthetic_loss(noise_t, nnx.state(m, nnx.Param)))(model)
    optimizer.update(model, grads)

  for t in range(steps):
    train_step(model, optimizer, {k: jnp.asarray(v[t]) for k, v in noise.items()})
  return optimizer


def _by_block(params: Any, per_block: dict[str, float]) -> dict[str, float]:
  return {k: per_block[k.split("/")[0]] for k in _flat(params)}


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_nnx_optimizer_block_granularity(mode: str) -> None:
  model = NNXNet(nnx.Rngs(0))
  params0 = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  lr, strength, steps = 1e-2, 0.2, 6
  noise = _noise(params0, steps)
  if mode == "finetune":
    tx = dj.dualopt(lr, rollback=strength, rollback_floor=0.0)
  else:
    tx = dj.dualopt(lr, mode="scratch", weight_decay=strength, decay_profile="shallow")
  optimizer = _train_nnx(model, tx, noise, steps)
  # Blocks by hand: embed 0, layers_0 1/3, layers_1 2/3, head 1; multiplier 1 - d.
  multiplier = _by_block(params0, {"embed": 1.0, "layers_0": 2 / 3, "layers_1": 1 / 3, "head": 0.0})
  expected = _reference(
    params0, noise, steps, lr=lr, fraction=strength, multiplier=multiplier,
    anchor="params0" if mode == "finetune" else "zero",
  )
  _assert_close(nnx.state(model, nnx.Param), expected)
  rollback_states = _find(optimizer.opt_state, dj.RollbackState)
  if mode == "finetune":
    (rb,) = rollback_states
    anchor = _flat(rb.anchor)
    for k, v in _flat(params0).items():
      assert np.array_equal(np.asarray(anchor[k]), v), k
  else:
    assert not rollback_states  # scratch mode stores no anchor
    assert len(_find(optimizer.opt_state, dj.LayerwiseDecayState)) == 1


def test_nnx_optimizer_tensor_granularity_runs_like_the_pure_tree() -> None:
  """Variable-wrapped init and pure-array update give what the same tx gives a pure dict.

  nnx.state is key-sorted, so NNX tensors are indexed by block, then kernel before bias: the
  pure dict is written in that (the definition) order by hand.
  """
  model = NNXNet(nnx.Rngs(0))
  sorted_pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pure = {
    "embed": {"embedding": sorted_pure["embed"]["embedding"]},
    **{b: {"kernel": sorted_pure[b]["kernel"], "bias": sorted_pure[b]["bias"]}
       for b in ("layers_0", "layers_1", "head")},
  }
  lr, steps = 1e-2, 4
  noise = _noise(pure, steps)
  make = lambda: dj.dualopt(lr, rollback=0.3, granularity="tensor")
  _train_nnx(model, make(), noise, steps)

  tx = make()

  @jax.jit
  def step(p, s, n):
    u, s = tx.update(jax.grad(lambda q: _synthetic_loss(n, q))(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = pure, tx.init(pure)
  for t in range(steps):
    p, s = step(p, s, {k: jnp.asarray(v[t]) for k, v in noise.items()})
  got, want = _flat(nnx.state(model, nnx.Param)), _flat(p)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, err_msg=k)


def test_nnx_tensor_granularity_follows_definition_order() -> None:
  model = NNXNet(nnx.Rngs(0))
  depths = _flat(dj.layer_depths(nnx.state(model, nnx.Param), granularity="tensor"))
  definition = ["embed/embedding", "layers_0/kernel", "layers_0/bias", "layers_1/kernel",
                "layers_1/bias", "head/kernel", "head/bias"]
  assert {k: float(depths[k]) for k in definition} == {
    k: i / (len(definition) - 1) for i, k in enumerate(definition)
  }


class _EncoderDecoderNNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.encoder_0 = nnx.Linear(2, 2, rngs=rngs)
    self.encoder_1 = nnx.Linear(2, 2, rngs=rngs)
    self.decoder_0 = nnx.Linear(2, 2, rngs=rngs)
    self.head = nnx.Linear(2, 1, rngs=rngs)


def test_nnx_encoder_before_decoder_from_names_although_the_state_is_sorted() -> None:
  """nnx.state is key-sorted (decoder_0 first); the names say encoder before decoder."""
  state = nnx.state(_EncoderDecoderNNX(nnx.Rngs(0)), nnx.Param)
  want = {"encoder_0": 0.0, "encoder_1": 1 / 3, "decoder_0": 2 / 3, "head": 1.0}
  depths = _flat(dj.layer_depths(state))
  assert {k.split("/")[0]: float(v) for k, v in depths.items() if k.endswith("kernel")} == want
  depths = _flat(dj.layer_depths(state, order=["encoder_*", "decoder_*", "head"]))
  assert {k.split("/")[0]: float(v) for k, v in depths.items() if k.endswith("kernel")} == want


def test_nnx_masks_built_from_nnx_state() -> None:
  """``head`` and ``mask`` given as pytrees built from ``nnx.state`` (flax#5372)."""
  model = NNXNet(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  params0 = jax.tree.map(np.asarray, state)
  lr, steps = 1e-2, 5
  noise = _noise(params0, steps)

  head = jax.tree_util.tree_map_with_path(lambda kp, _: kp[0].key == "head", state)
  _train_nnx(model, dj.dualopt(lr, rollback=0.2, rollback_floor=0.0, head=head), noise, steps)
  # Head excluded from the profile: embed 0, layers_0 1/2, layers_1 1; head plain Adam.
  multiplier = _by_block(params0, {"embed": 1.0, "layers_0": 0.5, "layers_1": 0.0, "head": 0.0})
  _assert_close(nnx.state(model, nnx.Param),
                _reference(params0, noise, steps, lr=lr, fraction=0.2, multiplier=multiplier))

  # The optax#/jax#31256 pattern: a mask from nnx.split's State, here "matrices only".
  model = NNXNet(nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  matrices = jax.tree.map(lambda x: x.ndim > 1, params)
  tx = optax.chain(optax.adam(lr, eps_root=0.0), dj.rollback_to(rate=0.2, mask=matrices))
  _train_nnx(model, tx, noise, steps)
  multiplier = {k: float(np.ndim(v) > 1) for k, v in _flat(params0).items()}
  _assert_close(nnx.state(model, nnx.Param),
                _reference(params0, noise, steps, lr=lr, fraction=0.2, multiplier=multiplier))


# --- Stacked layers: Linen nn.scan and NNX nnx.vmap ---------------------------------------------

STACK = 4
# embed at 0, slice j at (1 + j) / 5, head at 1: multiplier 1 - d per slice.
SLICE_MULTIPLIER = np.array([0.8, 0.6, 0.4, 0.2])


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
    return nn.tanh(nn.Dense(6)(x)), None


class LinenScanNet(nn.Module):
  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(10, 6, name="embed")(tokens)
    stack = nn.scan(
      _LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=STACK
    )
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(3, name="head")(x.mean(axis=1))


class _NNXBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(6, 6, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.linear(x))


class NNXVmapNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 6, rngs=rngs)

    @nnx.split_rngs(splits=STACK)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> _NNXBlock:
      return _NNXBlock(rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x: jax.Array, block: _NNXBlock) -> jax.Array:
      return block(x)

    return self.head(body(x, self.layers).mean(axis=1))


def _check_one_step_per_slice(before: dict, grads: dict, after: dict, lr: float, rho: float,
                              stacked_prefix: str) -> None:
  """One SGD step then the pull: p1 = p0 - lr·g·(1 - ρ·m_j) for slice j (anchor = p0)."""
  checked = 0
  for k, p0 in before.items():
    p0 = np.asarray(p0, np.float64)
    g = np.asarray(grads[k], np.float64)
    if k.startswith(stacked_prefix):
      m = SLICE_MULTIPLIER.reshape((STACK,) + (1,) * (p0.ndim - 1))
      checked += 1
    else:
      m = {"embed": 1.0, "head": 0.0}[k.split("/")[0]]
    want = p0 - lr * g * (1.0 - rho * m)
    np.testing.assert_allclose(np.asarray(after[k], np.float64), want, rtol=1e-5, atol=1e-7,
                               err_msg=k)
    if k.startswith(stacked_prefix):
      # Moved back exactly the fraction rho * m_j of the plain step, slice by slice.
      plain = -lr * g
      moved = np.asarray(after[k], np.float64) - p0
      for j in range(STACK):
        sel = np.abs(plain[j]) > 1e-4
        np.testing.assert_allclose(1.0 - moved[j][sel] / plain[j][sel],
                                   rho * SLICE_MULTIPLIER[j], rtol=2e-3, err_msg=f"{k}[{j}]")
  assert checked == 2


def test_linen_scan_per_slice_strengths() -> None:
  model = LinenScanNet()
  tokens = jnp.arange(8).reshape(2, 4) % 10
  params = model.init(jax.random.key(1), tokens)["params"]
  assert np.shape(params["layers"]["Dense_0"]["kernel"]) == (STACK, 6, 6)
  lr, rho = 0.5, 0.5
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)
  grads = jax.grad(loss)(params)
  tx = dj.dualopt(lr, rollback=rho, rollback_floor=0.0, optimizer="sgd", momentum=0.0)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  after = optax.apply_updates(params, updates)
  _check_one_step_per_slice(_flat(params), _flat(grads), _flat(after), lr, rho, "layers/")

  # The same with an explicit (L, 1, ...) layer_scale pytree given to rollback_to.
  scale = jax.tree.map(
    lambda x: SLICE_MULTIPLIER.reshape((STACK,) + (1,) * (x.ndim - 1)).astype(np.float32),
    params["layers"])
  layer_scale = {"embed": {"embedding": 1.0}, "layers": scale,
                 "head": {"kernel": 0.0, "bias": 0.0}}
  tx = optax.chain(optax.sgd(lr), dj.rollback_to(rate=rho, layer_scale=layer_scale))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  after = optax.apply_updates(params, updates)
  _check_one_step_per_slice(_flat(params), _flat(grads), _flat(after), lr, rho, "layers/")


def test_nnx_vmap_per_slice_strengths() -> None:
  model = NNXVmapNet(nnx.Rngs(2))
  tokens = jnp.arange(8).reshape(2, 4) % 10
  before = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
  assert before["layers/linear/kernel"].shape == (STACK, 6, 6)
  lr, rho = 0.5, 0.5
  loss = lambda m: jnp.sum(m(tokens) ** 2)
  grads = _flat(nnx.grad(loss)(model))
  optimizer = nnx.Optimizer(
    model, dj.dualopt(lr, rollback=rho, rollback_floor=0.0, optimizer="sgd", momentum=0.0),
    wrt=nnx.Param,
  )

  @nnx.jit
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  train_step(model, optimizer)
  after = _flat(nnx.state(model, nnx.Param))
  _check_one_step_per_slice(before, grads, after, lr, rho, "layers/")
