"""LoRA: rolling the merged weight W0 + A B back toward W0 is scaling the post-step B.

The exactness test trains the factors of a real NNX model (``nnx.LoRALinear``
layers) with ``dj.dualopt(..., lora=...)`` and checks, at every step, the
merged weights against full-weight rollback of the merged post-step weights,
with the post-step factors from a plain NumPy Adam (not the code under test)
and λ from the NumPy profile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dualopt_jax as dj
from tests import numpy_reference as ref

D, RANK, N_LAYERS, VOCAB, N_OUT = 6, 2, 3, 11, 4
PEAK, WARMUP, STEPS = 1e-2, 10, 110
ROLLBACK, FLOOR, POWER = 0.05, 0.25, 2.0


class LoRANet(nnx.Module):
  """Embedding, LoRALinear blocks, final norm, head: the adapters sit in the blocks."""

  def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
    self.embed = nnx.Embed(VOCAB, D, param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([
      nnx.LoRALinear(D, D, lora_rank=RANK, param_dtype=dtype, lora_param_dtype=dtype, rngs=rngs)
      for _ in range(N_LAYERS)
    ])
    self.final_norm = nnx.LayerNorm(D, param_dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(D, N_OUT, param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for layer in self.layers:
      h = jnp.tanh(layer(h))
    return self.head(self.final_norm(h))


def _trainable():
  """Adapters, plus the final norm (fully trained, rolled back) and the head (plain step)."""
  return nnx.Any(nnx.LoRAParam, nnx.PathContains("final_norm"), nnx.PathContains("head"))


def _np_adam(m, v, g, t, eta):
  """One Adam direction step in float64: returns (-eta * direction, m, v)."""
  m = 0.9 * m + 0.1 * g
  v = 0.999 * v + 0.001 * g * g
  m_hat = m / (1 - 0.9 ** (t + 1))
  v_hat = v / (1 - 0.999 ** (t + 1))
  return -eta * m_hat / (np.sqrt(v_hat) + 1e-8), m, v


def _schedule(dtype: str):
  """Optax's warmup-cosine; in float64 the same curve in float64 (Optax's is float32 always)."""
  if dtype == "float32":
    return optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, STEPS, end_value=0.0)

  def lr(count):
    t = jnp.asarray(count, jnp.float64)
    cosine = 0.5 * PEAK * (1 + jnp.cos(jnp.pi * jnp.clip(t - WARMUP, 0, STEPS - WARMUP)
                                       / (STEPS - WARMUP)))
    return jnp.where(t < WARMUP, PEAK * t / WARMUP, cosine)

  return lr


def _leaf(state, *path):
  node = state
  for k in path:
    node = node[k]
  return np.asarray(node[...] if isinstance(node, nnx.Variable) else node, np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_merged_weights_follow_full_weight_rollback_at_every_step(dtype: str) -> None:
  with jax.enable_x64(dtype == "float64"):
    jdtype = jnp.dtype(dtype)
    model = LoRANet(nnx.Rngs(0), dtype=jdtype)
    graphdef, trainable, frozen = nnx.split(model, _trainable(), ...)
    full = nnx.state(model, nnx.Param)
    schedule = _schedule(dtype)
    tx = dj.dualopt(
      schedule, peak_learning_rate=PEAK, rollback=ROLLBACK, rollback_floor=FLOOR, power=POWER,
      head="head", lora="**/lora_b", full_params=full,
    )
    params = nnx.as_pure(trainable)
    opt_state = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (STEPS, 8), 0, VOCAB)
    targets = jax.random.normal(jax.random.key(2), (STEPS, 8, N_OUT), jdtype)

    @jax.jit
    def grads_at(p, t):
      def loss(p):
        out = nnx.merge(graphdef, p, frozen)(tokens[t])
        return jnp.mean((out - targets[t]) ** 2)

      return jax.grad(loss)(p)

    @jax.jit
    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    # Depths of the base weights in the full-weight tree (head left out): embed 0,
    # layers/i (i+1)/4, final_norm 1 -> multipliers f + (1 - d)^p (1 - f).
    mult = lambda d: FLOOR + (1 - d) ** POWER * (1 - FLOOR)
    lr = ref.warmup_cosine(PEAK, WARMUP, STEPS)
    w0 = [_leaf(frozen, "layers", i, "kernel") for i in range(N_LAYERS)]
    norm0 = _leaf(params, "final_norm", "scale")
    names = [("layers", i, "lora", k) for i in range(N_LAYERS) for k in ("lora_a", "lora_b")]
    names += [("final_norm", "scale"), ("final_norm", "bias"), ("head", "kernel"),
              ("head", "bias")]
    moments = {n: (np.zeros_like(_leaf(params, *n)),) * 2 for n in names}
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == "float32" else dict(rtol=1e-11, atol=1e-13)
    worst = 0.0
    for t in range(STEPS):
      g = grads_at(params, t)
      post = {}
      for n in names:
        m, v = moments[n]
        delta, m, v = _np_adam(m, v, _leaf(g, *n), t, lr(t))
        moments[n] = (m, v)
        post[n] = _leaf(params, *n) + delta
      new_params, opt_state = step(params, opt_state, g)
      fraction = ROLLBACK * lr(t) / PEAK
      for i in range(N_LAYERS):
        lam = fraction * mult((i + 1) / 4)
        a_hat, b_hat = post[("layers", i, "lora", "lora_a")], post[("layers", i, "lora", "lora_b")]
        expected = w0[i] + (1 - lam) * (a_hat @ b_hat)  # full-weight rollback of W0 + Â B̂
        a_t = _leaf(new_params, "layers", i, "lora", "lora_a")
        b_t = _leaf(new_params, "layers", i, "lora", "lora_b")
        merged = w0[i] + a_t @ b_t
        np.testing.assert_allclose(merged, expected, **tol, err_msg=f"step {t}, layer {i}")
        np.testing.assert_allclose(a_t, a_hat, **tol, err_msg=f"A, step {t}, layer {i}")
        worst = max(worst, float(np.max(np.abs(merged - expected))))
      lam_norm = fraction * mult(1.0)
      expected_norm = norm0 + (1 - lam_norm) * (post[("final_norm", "scale")] - norm0)
      np.testing.assert_allclose(
        _leaf(new_params, "final_norm", "scale"), expected_norm, **tol, err_msg=f"norm, step {t}"
      )
      np.testing.assert_allclose(
        _leaf(new_params, "head", "kernel"), post[("head", "kernel")], **tol,
        err_msg=f"head, step {t}",
      )
      params = new_params
    assert np.abs(_leaf(params, "layers", 0, "lora", "lora_b")).max() > 1e-3  # it trained
    assert worst < (1e-5 if dtype == "float32" else 1e-12)


def _anchor_paths(opt_state) -> set[str]:
  (state,) = [s for s in jax.tree.leaves(
    opt_state, is_leaf=lambda x: isinstance(x, dj.RollbackState)
  ) if isinstance(s, dj.RollbackState)]
  return {
    "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
    for kp, _ in jax.tree_util.tree_flatten_with_path(state.anchor)[0]
  }


def test_no_anchor_is_stored_for_the_adapters() -> None:
  model = LoRANet(nnx.Rngs(0))
  trainable = nnx.as_pure(nnx.state(model, _trainable()))
  tx = dj.dualopt(1e-3, head="head", lora="**/lora_b", full_params=nnx.state(model, nnx.Param))
  state = tx.init(trainable)
  anchored = _anchor_paths(state)
  assert all("lora" not in p for p in anchored), anchored
  assert any("final_norm" in p for p in anchored)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # Adam's two moments over all trainable leaves, plus an anchor only for the final norm.
  adam = 2 * sum(x.nbytes for x in jax.tree.leaves(trainable))
  norm = sum(x.nbytes for x in jax.tree.leaves(trainable["final_norm"]))
  assert state_bytes - adam - norm < 1024  # the rest: counters and per-leaf depths (scalars)


@pytest.mark.parametrize("lora", ["**/lora_c", ["**/lora_b", "nothing/**"]])
def test_a_pattern_matching_nothing_raises(lora) -> None:
  model = LoRANet(nnx.Rngs(0))
  tx = dj.dualopt(1e-3, lora=lora, full_params=nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match="matches no parameter"):
    tx.init(nnx.as_pure(nnx.state(model, nnx.LoRAParam)))


def test_a_pattern_selecting_a_factors_raises() -> None:
  model = LoRANet(nnx.Rngs(0))
  tx = dj.dualopt(1e-3, lora="**/lora_a", full_params=nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match="not named as a LoRA B factor"):
    tx.init(nnx.as_pure(nnx.state(model, nnx.LoRAParam)))


def test_scratch_mode_with_lora_raises() -> None:
  with pytest.raises(ValueError, match="lora is read only with mode='finetune'"):
    dj.dualopt(1e-3, mode="scratch", lora="**/lora_b")


def test_adapters_alone_without_full_params_raise() -> None:
  model = LoRANet(nnx.Rngs(0))
  tx = dj.dualopt(1e-3, lora="**/lora_b")
  with pytest.raises(ValueError, match="full_params"):
    tx.init(nnx.as_pure(nnx.state(model, nnx.LoRAParam)))
