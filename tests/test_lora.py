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


def _applied(tx, params, state, grads):
  """``(params + updates, new state)`` of one ``tx.update``."""
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


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

    def grads_at(p, t):
      def loss(p):
        out = nnx.merge(graphdef, p, frozen)(tokens[t])
        return jnp.mean((out - targets[t]) ** 2)

      return jax.grad(loss)(p)

    @jax.jit
    def trajectory(p, s):
      """Every step's params before, gradients and params after (one compiled scan)."""

      def body(carry, t):
        p, s = carry
        g = grads_at(p, t)
        updates, s = tx.update(g, s, p)
        new = optax.apply_updates(p, updates)
        return (new, s), (p, g, new)

      return jax.lax.scan(body, (p, s), jnp.arange(STEPS))[1]

    history = jax.tree.map(np.asarray, trajectory(params, opt_state))
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
      params, g, new_params = jax.tree.map(lambda x, t=t: x[t], history)
      post = {}
      for n in names:
        m, v = moments[n]
        delta, m, v = _np_adam(m, v, _leaf(g, *n), t, lr(t))
        moments[n] = (m, v)
        post[n] = _leaf(params, *n) + delta
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


# --- depths: an adapter takes its base weight's depth in the full-weight tree ---------------------


class WrappedNet(nnx.Module):
  """Embedding, blocks that are ``nnx.LoRA(base_module=nnx.Linear)`` (or the Linear alone), head."""

  def __init__(self, rngs: nnx.Rngs, lora: bool = True):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    linears = [nnx.Linear(D, D, rngs=rngs) for _ in range(N_LAYERS)]
    self.layers = nnx.List([
      nnx.LoRA(D, RANK, D, base_module=lin, rngs=rngs) if lora else lin for lin in linears
    ])
    self.final_norm = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, N_OUT, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for layer in self.layers:
      h = jnp.tanh(layer(h))
    return self.head(self.final_norm(h))


def _seen_depths(tx, adapters) -> dict[str, float]:
  """Depth per path as the optimizer state holds it (``dj.describe``), for the B factors."""
  rows = dj.describe(adapters, tx.init(adapters))
  return {r["path"]: r["depth"] for r in rows if r["depth"] is not None}


def _close(seen: dict[str, float], expected: dict[str, float]) -> None:
  assert set(seen) == set(expected), (sorted(seen), sorted(expected))
  for path, depth in expected.items():
    np.testing.assert_allclose(seen[path], depth, rtol=1e-6, err_msg=path)


def _depth_of(depths, path: str):
  node = depths
  for k in path.split("/"):
    node = node[int(k) if k.isdigit() else k]
  return node


@pytest.mark.parametrize("granularity", ["block", "tensor"])
@pytest.mark.parametrize("kind", ["LoRALinear", "LoRA(base_module)"])
def test_nnx_adapter_depths_equal_their_base_weights_depths(kind: str, granularity: str) -> None:
  tokens = jnp.array([[1, 2, 3]])
  if kind == "LoRALinear":
    model = LoRANet(nnx.Rngs(0))
    base_of = lambda i: f"layers/{i}/kernel"
    b_of = lambda i: f"layers/{i}/lora/lora_b"
    # The full-weight tree: the same model without adapters (nnx.LoRALinear's kernel path is
    # nnx.Linear's): build it from nnx.Linear layers.
    plain = LoRANet(nnx.Rngs(0))
    plain.layers = nnx.List([nnx.Linear(D, D, rngs=nnx.Rngs(0)) for _ in range(N_LAYERS)])
  else:
    model = WrappedNet(nnx.Rngs(0))
    base_of = lambda i: f"layers/{i}/base_module/kernel"
    b_of = lambda i: f"layers/{i}/lora_b"
    plain = WrappedNet(nnx.Rngs(0), lora=False)
    plain.layers = nnx.List([nnx.Module() for _ in range(N_LAYERS)])
    for i in range(N_LAYERS):
      plain.layers[i].base_module = nnx.Linear(D, D, rngs=nnx.Rngs(0))
  settings = {"granularity": granularity}
  if granularity == "tensor":
    settings["order"] = dj.forward_order(model, tokens)
  full_weight = nnx.state(plain, nnx.Param)
  ref_settings = dict(settings)
  if granularity == "tensor":
    forward = lambda p, x: nnx.merge(nnx.graphdef(model), p, nnx.state(model, nnx.LoRAParam))(x)
    base_only = nnx.state(model, nnx.Not(nnx.LoRAParam))
    ref_settings["order"] = dj.forward_order(forward, base_only, tokens)
    full_weight = base_only
  expected_tree = dj.layer_depths(nnx.as_pure(full_weight), **ref_settings)
  expected = {b_of(i): float(_depth_of(expected_tree, base_of(i))) for i in range(N_LAYERS)}
  adapters = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  tx = dj.dualopt(1e-3, lora="**/lora_b", full_params=nnx.state(model, nnx.Param), **settings)
  _close(_seen_depths(tx, adapters), expected)
  # nnx.Optimizer(wrt=nnx.LoRAParam): the optimizer sees only the adapters and gets the same.
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  rows = dj.describe(nnx.state(model, nnx.LoRAParam), optimizer.opt_state)
  _close({r["path"]: r["depth"] for r in rows if r["depth"] is not None}, expected)


def _tunix_llama3(lora: bool):
  """tunix's Llama3 (tiny config, random weights), with Qwix LoRA on every projection."""
  from tests import _zoo

  lm = _zoo._tunix_module("models.llama3.model")
  config = lm.ModelConfig(num_layers=2, vocab_size=50, embed_dim=16, hidden_dim=32, num_heads=2,
                          head_dim=8, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-5,
                          weight_tying=False)
  model = _zoo._tunix_build(lambda: lm.Llama3(config, rngs=nnx.Rngs(0)))
  tokens, positions, mask = _zoo._lm_inputs()
  if lora:
    qwix = pytest.importorskip("qwix", reason="the Qwix test needs qwix (pip install qwix)")
    provider = qwix.LoraProvider(module_path=".*_proj", rank=2, alpha=4.0)
    model = qwix.apply_lora_to_model(model, provider, tokens, positions, None, mask,
                                     rngs=nnx.Rngs(1))
  return model, (tokens, positions, None, mask)


@pytest.fixture(scope="module")
def llama3_pair():
  """(Qwix-LoRA'd tunix Llama3, the same model without adapters, its example inputs)."""
  model, inputs = _tunix_llama3(lora=True)
  plain, _ = _tunix_llama3(lora=False)
  return model, plain, inputs


@pytest.mark.parametrize("granularity", ["block", "tensor"])
def test_qwix_adapter_depths_equal_their_base_weights_depths(llama3_pair, granularity) -> None:
  model, plain, inputs = llama3_pair
  adapters = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  b_paths = [
    "/".join(str(getattr(k, "key", k)) for k in kp)
    for kp, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]
  ]
  b_paths = [p for p in b_paths if p.endswith("_lora_b")]
  assert len(b_paths) == 14  # q, k, v, o, gate, up, down in 2 layers
  settings, ref_settings = {"granularity": granularity}, {"granularity": granularity}
  if granularity == "tensor":  # names do not order a transformer block's tensors
    call = lambda m, *x: m(*x)[0]
    settings["order"] = dj.forward_order(lambda p, *x: call(nnx.merge(nnx.graphdef(model), p), *x),
                                         nnx.state(model), *inputs)
    ref_settings["order"] = dj.forward_order(
      lambda p, *x: call(nnx.merge(nnx.graphdef(plain), p), *x), nnx.state(plain), *inputs)
  expected_tree = dj.layer_depths(nnx.as_pure(nnx.state(plain, nnx.Param)), **ref_settings)
  expected = {p: float(_depth_of(expected_tree, p[: -len("_lora_b")])) for p in b_paths}
  assert len(set(expected.values())) == (2 if granularity == "block" else 14)
  tx = dj.dualopt(1e-3, lora="**/*_lora_b", full_params=nnx.state(model, nnx.Param), **settings)
  _close(_seen_depths(tx, adapters), expected)


# --- SPD's adapter mode (the authors' PEFT choice: anchor 0 on the adapter parameters) ------------


def test_spd_adapter_mode_stores_no_anchor_and_decays_the_factors_toward_zero() -> None:
  model = LoRANet(nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Any(nnx.LoRAParam, nnx.PathContains("final_norm"))))
  lr, strength, steps = 1e-2, 0.5, 60
  tx = dj.spd(optax.adam(lr), strength=strength, decay_to_zero="**/lora_*")
  state = tx.init(params)
  anchored = {
    "/".join(str(getattr(k, "key", k)) for k in kp)
    for kp, _ in jax.tree_util.tree_flatten_with_path(state.anchor)[0]
  }
  assert anchored == {"final_norm/bias", "final_norm/scale"}, anchored
  # A NumPy transcription of Adam + SPD (ALGORITHMS.md §3) with anchor 0 for the factors.
  # g = s_t (theta - anchor) + (1 - |s_t|) noise_t, s_t in {1, -1, 0}: the gates open and close.
  rng = np.random.default_rng(3)
  flat, treedef = jax.tree_util.tree_flatten(params)
  signs = [rng.choice([1.0, -1.0, 0.0], size=steps) for _ in flat]
  noise = [rng.normal(size=(steps, *x.shape)) for x in flat]
  grad = lambda t, i, x, a: signs[i][t] * (x - a) + (1 - abs(signs[i][t])) * noise[i][t]
  paths = ["/".join(str(getattr(k, "key", k)) for k in kp)
           for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  theta = [np.asarray(x, np.float64) for x in flat]
  anchors = [
    np.zeros_like(x) if "lora" in p else x.copy() for p, x in zip(paths, theta, strict=True)
  ]
  m = [np.zeros_like(x) for x in theta]
  v = [np.zeros_like(x) for x in theta]
  p_jax, decayed = params, 0
  step = jax.jit(lambda p, s, g: _applied(tx, p, s, g))
  for t in range(steps):
    grads = [grad(t, i, x, a) for i, (x, a) in enumerate(zip(theta, anchors, strict=True))]
    for i, g in enumerate(grads):
      delta, m[i], v[i] = _np_adam(m[i], v[i], g, t, lr)
      prev, cand = theta[i] - anchors[i], theta[i] + delta - anchors[i]
      if -np.sum(g * prev) < 0:
        n_cand, n_prev = np.linalg.norm(cand), np.linalg.norm(prev)
        r = 0.0 if n_cand == 0 else min(max((n_cand - n_prev) / n_cand, 0.0), 1.0)
        decayed += r > 0 and "lora" in paths[i]
        cand = cand - strength * r * cand
      theta[i] = cand + anchors[i]
    g_jax = jax.tree_util.tree_unflatten(treedef, [
      grad(t, i, np.asarray(x, np.float64), a).astype(np.float32)
      for i, (x, a) in enumerate(zip(jax.tree.leaves(p_jax), anchors, strict=True))
    ])
    p_jax, state = step(p_jax, state, g_jax)
  assert decayed >= 10
  for path, got, want in zip(paths, jax.tree.leaves(p_jax), theta, strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg=path)


def test_olor_with_lora_rolls_b_back_by_its_base_weights_tensor_index() -> None:
  """olor: λ = η κ_i with i the base kernel's index among the full model's tensors."""
  model = LoRANet(nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3, 4]])
  lr, kappa_max, steps = 1e-2, 5.0, 4
  tx = dj.olor(lr, back_level_max=kappa_max, back_pow=1.0, lora="**/lora_b",
               order=dj.forward_order(model, tokens), full_params=nnx.state(model, nnx.Param))
  graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
  params = nnx.as_pure(params)
  state = tx.init(params)
  # Full-weight tensors in forward order: embedding 0, layers/i kernel 1 + 2i, bias 2 + 2i,
  # final_norm scale 7, bias 8, head kernel 9, bias 10 -> N = 10.
  kappa = ref.olor_kappa(11, kappa_max, 0.0, 1.0)
  names = [(i, k) for i in range(N_LAYERS) for k in ("lora_a", "lora_b")]
  moments = {n: (np.zeros((D, RANK) if n[1] == "lora_a" else (RANK, D)),) * 2 for n in names}
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p, frozen)(tokens) ** 2)
  step = jax.jit(lambda p, s: (jax.grad(loss)(p), *_applied(tx, p, s, jax.grad(loss)(p))))
  for t in range(steps):
    g, new, state = step(params, state)
    for i, k in names:
      m, v = moments[(i, k)]
      delta, m, v = _np_adam(m, v, _leaf(g, "layers", i, "lora", k), t, lr)
      moments[(i, k)] = (m, v)
      post = _leaf(params, "layers", i, "lora", k) + delta
      want = post if k == "lora_a" else (1 - lr * kappa[1 + 2 * i]) * post
      np.testing.assert_allclose(_leaf(new, "layers", i, "lora", k), want, rtol=2e-5, atol=1e-7,
                                 err_msg=f"step {t}, layers/{i}/{k}")
    params = new


def test_rollback_to_decay_to_zero_stores_no_anchor_and_restores_strictly() -> None:
  params = {"a": jnp.full(3, 2.0), "b": jnp.full(3, 2.0)}
  tx = optax.chain(optax.sgd(0.0), dj.rollback_to(rate=0.25, decay_to_zero="b"))
  state = tx.init(params)
  assert isinstance(state[1].anchor["b"], optax.MaskedNode)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["a"], 2.0)  # at its anchor: nothing to roll back
  np.testing.assert_allclose(new["b"], 1.5)  # 25 % of the way to 0
  other = optax.chain(optax.sgd(0.0), dj.rollback_to(rate=0.25))
  with pytest.raises(ValueError, match="holds no anchor for 'b'"):
    other.update(jax.tree.map(jnp.zeros_like, params), state, params)


def test_full_params_may_be_abstract() -> None:
  """Only paths and shapes of full_params are read: an abstract model gives the same depths."""
  model = LoRANet(nnx.Rngs(0))
  abstract = nnx.eval_shape(lambda: LoRANet(nnx.Rngs(0)))
  adapters = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  concrete_tx = dj.dualopt(1e-3, lora="**/lora_b", full_params=nnx.state(model, nnx.Param))
  abstract_tx = dj.dualopt(1e-3, lora="**/lora_b", full_params=nnx.state(abstract, nnx.Param))
  seen = _seen_depths(abstract_tx, adapters)
  assert seen == _seen_depths(concrete_tx, adapters)
  assert [seen[f"layers/{i}/lora/lora_b"] for i in range(N_LAYERS)] == [0.25, 0.5, 0.75]


def test_qwix_model_through_nnx_optimizer_rolls_b_back_and_leaves_a_plain(llama3_pair) -> None:
  """One step with nnx.Optimizer(wrt=nnx.LoRAParam), as tunix's PeftTrainer builds it."""
  model, _, inputs = llama3_pair
  model = nnx.clone(model)
  lr, rollback = 1e-2, 0.2
  tx = dj.dualopt(lr, rollback=rollback, rollback_floor=0.0, lora="**/*_lora_b",
                  full_params=nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  loss = lambda m: jnp.mean(m(*inputs)[0] ** 2)
  before = nnx.as_pure(nnx.state(model, nnx.LoRAParam))

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return grads

  grads = train_step(model, optimizer)
  after = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(x, np.float64)
                    for k, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  g, b0, b1 = flat(nnx.as_pure(grads)), flat(before), flat(after)
  depth = {"0": 1 / 3, "1": 2 / 3}  # embedder 0, layers/0, layers/1, final_norm + lm_head 1
  for key, x0 in b0.items():
    post = x0 - lr * g[key] / (np.abs(g[key]) + 1e-8)  # Adam's first step: m̂ = g, v̂ = g²
    layer = key.split("[")[2].rstrip("]")
    lam = rollback * (1 - depth[layer])
    want = post if key.endswith("_lora_a']") else (1 - lam) * post
    np.testing.assert_allclose(b1[key], want, rtol=1e-4, atol=1e-6, err_msg=key)
  assert any(np.abs(v).max() > 0 for k, v in b1.items() if k.endswith("_lora_b']"))


def test_drift_reports_the_merged_weights_drift_of_each_adapter() -> None:
  model = LoRANet(nnx.Rngs(0))
  for i, layer in enumerate(model.layers):  # nonzero B, so that A B is not 0
    layer.lora.lora_b[...] = jax.random.normal(jax.random.key(i), (RANK, D)) * 0.1
  trainable = nnx.as_pure(nnx.state(model, nnx.Any(nnx.LoRAParam, nnx.PathContains("final_norm"))))
  full = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = dj.dualopt(1e-3, lora="**/lora_b", full_params=full)
  state = tx.init(trainable)
  out = jax.jit(lambda p, s, f: dj.drift(p, s, lora="**/lora_b", full_params=f))(
    trainable, state, full)
  for i in range(N_LAYERS):
    a = _leaf(trainable, "layers", i, "lora", "lora_a")
    b = _leaf(trainable, "layers", i, "lora", "lora_b")
    w0 = _leaf(full, "layers", i, "kernel")
    want = np.linalg.norm(a @ b) / np.linalg.norm(w0)
    np.testing.assert_allclose(out[f"drift/layers/{i}/lora/lora_b"], want, rtol=1e-5)
    assert f"rollback/layers/{i}/lora/lora_b" in out
    assert f"drift/layers/{i}/lora/lora_a" not in out
  np.testing.assert_allclose(out["drift/final_norm/scale"], 0.0)  # at its anchor
  adapters = nnx.as_pure(nnx.state(model, nnx.LoRAParam))  # adapters only: no anchor at all
  only = dj.drift(adapters, dj.dualopt(1e-3, lora="**/lora_b", full_params=full).init(adapters),
                  lora="**/lora_b", full_params=full)
  assert sorted(k for k in only if k.startswith("drift/")) == [
    f"drift/layers/{i}/lora/lora_b" for i in range(N_LAYERS)]
  with pytest.raises(ValueError, match="lora and full_params go together"):
    dj.drift(adapters, params0=adapters, lora="**/lora_b")
