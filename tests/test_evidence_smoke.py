"""Smoke runs of the evidence benchmarks (a few steps each) so the code cannot silently rot.

The full grids live in ``examples/evidence`` and ``results/``; here every
benchmark runs end to end on a tiny budget, and the pieces whose correctness
the numbers rest on are checked against independent computations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualopt_jax._depths import layer_depths

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

from evidence import (  # noqa: E402
  curves,
  data,
  language,
  methods,
  models,
  plots,
  runner,
  scratch,
  stats,
  train,
  vision,
)

TINY_LM = dict(d=16, n_layers=1, heads=2, context=8, batch=4, eval_windows=4, up_chars=20_000)


def test_select_uses_seed_mean_and_tiebreak():
  score = np.array([[0.9, 0.7], [0.8, 0.8], [0.8, 0.8]])  # means .8, .8, .8
  loss = np.array([[1.0, 1.0], [0.5, 0.7], [0.4, 0.9]])  # means 1.0, .6, .65
  assert stats.select(score, loss, higher=True) == 1
  assert stats.select(np.array([[3.0, 1.0], [2.0, 2.5]]), higher=False) == 0  # 2.0 < 2.25
  s = stats.summary([1.0, 2.0, 4.0])
  assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))


def test_splits_are_disjoint_and_labelled():
  d = data.digits_transfer()
  for split in (d.up_train, d.up_val, d.up_test, d.down_train, d.down_val, d.down_test):
    assert split.y.min() >= 0 and split.y.max() <= 4
  assert len(d.down_train.y) == 100 and np.bincount(d.down_train.y).tolist() == [20] * 5
  rows = lambda s: {r.tobytes() for r in s.x.reshape(len(s.x), -1)}
  assert not rows(d.down_train) & rows(d.down_test)
  t = data.text_transfer(up_chars=10_000)
  assert t.up_train.max() < data.VOCAB and len(t.down_train) > 100_000


def test_grid_vmap_matches_per_value_runs():
  """The (grid x seed) vmapped loop gives the same models as one run per grid value."""
  d = data.digits_transfer()
  task = vision.classification_task(d.up_train.x, d.up_train.y, 8)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  params = vision.init_params(keys)
  make = lambda hp: optax.adam(hp)
  a = train.train_grid(task, make, [1e-3, 1e-2], params, keys, steps=4, chunk=4, progress=False)
  b = train.train_grid(task, make, [1e-3, 1e-2], params, keys, steps=4, chunk=4, progress=False,
                       vectorize_grid=False)
  assert a.vectorized and not b.vectorized
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Drift trace: recompute the last step's per-layer drift with NumPy.
  i = a.groups.index("Conv_1")
  p = a.params["backbone"]["Conv_1"]
  p0 = params["backbone"]["Conv_1"]
  num = sum(np.sum((np.asarray(p[k][1, 0]) - np.asarray(p0[k][0])) ** 2) for k in p0)
  den = sum(np.sum(np.asarray(p0[k][0]) ** 2) for k in p0)
  assert a.drift[1, 0, -1, i] == pytest.approx(np.sqrt(num / den), rel=1e-4)


def test_every_registered_method_builds_and_steps():
  """Each method builds a GradientTransformation and makes one update on the real CNN."""
  params = models.CNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  grads = jax.tree.map(jnp.ones_like, params)
  depths = layer_depths({"backbone": params["backbone"]})
  ctx = methods.Context(steps=10, base_lr=1e-3, head="head", depths=depths)
  transfer, scratch_ms = methods.transfer_methods(), scratch.scratch_methods()
  sizes = [methods.GRID_SIZE] * len(transfer) + [len(scratch.DECAY_GRID)] * len(scratch_ms)
  for m, size in zip(transfer + scratch_ms, sizes, strict=True):
    if m.posthoc_of:  # trains nothing: checked in test_wise_ft_interpolates
      continue
    assert len(m.grid) == (1 if m.fixed else size), m.name
    tx = m.build(ctx, m.grid[0])
    assert isinstance(tx, optax.GradientTransformation), m.name
    updates, _ = tx.update(grads, tx.init(params), params)
    leaves = jax.tree.leaves(updates)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in leaves), m.name


def test_vision_transfer_smoke(tmp_path):
  cfg = vision.VisionConfig(seeds=2, pretrain_steps=10, finetune_steps=6, batch=16, chunk=6,
                            methods=("adam", "wise_ft", "dualopt_default", "dualopt_block",
                                     "linear_probe"))
  res = vision.run(cfg, progress=False, log=lambda _s: None)
  adam, probe = res["methods"]["adam"], res["methods"]["linear_probe"]
  assert adam["status"] == "ok" and probe["status"] == "ok"
  assert np.asarray(adam["grid_metrics"]["down_test_acc"]).shape == (methods.GRID_SIZE, 2)
  shifted = [np.asarray(adam["grid_metrics"][f"down_{k}_acc"]) for k in data.SHIFTS]
  np.testing.assert_allclose(np.mean(shifted, axis=0), adam["grid_metrics"]["down_shift_acc"],
                             atol=1e-6)
  # WiSE-FT at alpha = 1 is Adam at the base lr, exactly.
  wise = res["methods"]["wise_ft"]
  k = curves.base_index(res)
  for metric in ("down_test_acc", "up_test_acc", "down_shift_acc"):
    np.testing.assert_allclose(wise["grid_metrics"][metric][-1], adam["grid_metrics"][metric][k])
  # The frozen backbone does not move: zero drift, zero forgetting (exactly).
  g = probe["drift_groups"]
  drift = np.asarray(probe["drift_selected_mean"])
  assert np.all(drift[:, [g.index(x) for x in ("Conv_0", "Conv_1", "Dense_0")]] == 0)
  assert np.all(np.asarray(probe["grid_metrics"]["forgetting"]) == 0)
  # The chosen value is the best on validation, not on test.
  val = np.asarray(adam["grid_metrics"]["down_val_acc"]).mean(1)
  assert val[adam["selected_index"]] == val.max()
  if res["methods"]["dualopt_block"]["status"] == "ok":
    assert res["methods"]["dualopt_block"]["base_lr"] == adam["selected_hp"]
  header, rows = vision.table_rows(res)
  assert len(rows) == 5 and len(header) == len(rows[0])
  assert "Verdict:" in curves.default_verdict(res)
  header, rows = curves.summary_rows(res)
  assert len(rows) == 5 and all(len(r) == len(header) for r in rows)
  stats.write_json(str(tmp_path / "r.json"), res)
  stats.write_csv(str(tmp_path / "r.csv"), runner.csv_rows("v", res["methods"], res["seeds"]))
  plots.curves(res, str(tmp_path / "c.png"), chosen=curves.chosen_indices(res),
               spec=curves.spec_of(res), title="t")
  plots.drift_panels(res, str(tmp_path / "p.png"), methods=("adam", "wise_ft", "dualopt_block"),
                     chosen=curves.chosen_indices(res))
  assert json.loads((tmp_path / "r.json").read_text())["methods"]["adam"]["status"] == "ok"
  n_rows = (4 * methods.GRID_SIZE + 1) * 2  # four grids and one fixed point, two seeds
  assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + n_rows
  assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "p.png").exists()


def test_merge_reruns_one_method_into_stored_results(tmp_path):
  from evidence import run_all

  cfg = vision.VisionConfig(seeds=2, pretrain_steps=4, finetune_steps=6, batch=16, chunk=6,
                            methods=("adam", "dualopt_default"))
  res = vision.run(cfg, progress=False, log=lambda _s: None)
  res["command"] = "smoke"
  run_all.report("vision", res, str(tmp_path))
  path = tmp_path / "vision_transfer.json"
  stored = json.loads(path.read_text())
  stored["methods"]["dualopt_default"]["grid_metrics"]["down_test_acc"] = [[-1.0, -1.0]]
  path.write_text(json.dumps(stored))
  run_all.merge_bench("vision", str(tmp_path), ("dualopt_default",), progress=False)
  merged = json.loads(path.read_text())
  assert merged["methods"]["dualopt_default"]["grid_metrics"]["down_test_acc"] == \
    res["methods"]["dualopt_default"]["grid_metrics"]["down_test_acc"]  # rerun, not kept
  assert merged["methods"]["adam"] == stored["methods"]["adam"]  # other rows kept
  assert merged["merged"][0]["methods"] == ["dualopt_default"]
  # A pre-training that does not reproduce the stored one refuses to merge.
  stored["pretrain"]["up_test_acc"]["values"] = [0.0, 0.0]
  path.write_text(json.dumps(stored))
  with pytest.raises(SystemExit, match="did not reproduce"):
    run_all.merge_bench("vision", str(tmp_path), ("dualopt_default",), progress=False)
  with pytest.raises(SystemExit):  # options --merge would ignore are refused
    run_all.main(["vision", "--out", str(tmp_path), "--merge", "adam", "--seeds", "3"])


def test_language_transfer_smoke():
  cfg = language.LanguageConfig(seeds=2, pretrain_steps=4, finetune_steps=4, chunk=4,
                                methods=("dualopt_block",), **TINY_LM)
  res = language.run(cfg, progress=False, log=lambda _s: None)
  e = res["methods"]["dualopt_block"]
  assert e["status"] == "ok"
  up = np.asarray(e["grid_metrics"]["up_test_loss"])
  assert up.shape == (methods.GRID_SIZE, 2) and np.all(np.isfinite(up)) and np.all(up > 0)
  assert np.all(np.isfinite(e["grid_metrics"]["down_shift_loss"]))
  pre = np.asarray(res["pretrain"]["up_test_loss"]["values"])
  np.testing.assert_allclose(np.asarray(e["grid_metrics"]["forgetting"]), up - pre[None], atol=1e-6)


@pytest.mark.parametrize(
  ("bench", "names"),
  [("vision", ("dualopt_deep_p1_lr",)), ("language", ("dualopt_flat_const",))],
)
def test_scratch_smoke(bench, names):
  cfg = scratch.ScratchConfig(seeds=2, vision_steps=4, language_steps=4, chunk=4, methods=names,
                              language=language.LanguageConfig(**TINY_LM))
  res = scratch.run(cfg, bench, progress=False, log=lambda _s: None)
  assert all(res["methods"][n]["status"] == "ok" for n in names)
  header, rows = scratch.table_rows(res)
  assert len(rows) == len(names) and len(rows[0]) == len(header)


def test_models_shapes():
  gpt = models.TinyGPT(d=16, n_layers=1, heads=2, context=8)
  p = gpt.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert gpt.apply({"params": p}, jnp.zeros((3, 8), jnp.int32)).shape == (3, 8, 128)
  # causal: changing a later token does not change earlier logits
  x = jnp.arange(8)[None] % 128
  y = x.at[0, 5].set(7)
  a, b = gpt.apply({"params": p}, x), gpt.apply({"params": p}, y)
  np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-5)


def test_tensor_rollback_follows_definition_order_despite_head_mask():
  """dualopt_tensor with rollback=1: the first tensor the model defined (Conv_0/kernel) is
  pulled all the way back after one step, the next one (Conv_0/bias) only part of the way."""
  params = models.CNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  order = ("backbone/Conv_0/kernel", "backbone/Conv_0/bias", "backbone/Conv_1/kernel",
           "backbone/Conv_1/bias", "backbone/Dense_0/kernel", "backbone/Dense_0/bias")
  ctx = methods.Context(steps=10, base_lr=1e-2, head="head", order=order)
  m = next(m for m in methods.transfer_methods() if m.name == "dualopt_tensor")
  tx = m.build(ctx, 1.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  conv0 = new["backbone"]["Conv_0"]
  np.testing.assert_allclose(conv0["kernel"], params["backbone"]["Conv_0"]["kernel"], atol=1e-7)
  # bias: Adam's first step moves it by -lr; depth 1/5 -> lambda = 0.8 -> 20% of the step stays.
  np.testing.assert_allclose(conv0["bias"], -0.2 * 1e-2, rtol=1e-4)
  # new head: plain Adam step, no rollback
  np.testing.assert_allclose(new["head"]["bias"], -1e-2, rtol=1e-4)


def test_hypervolume_matches_counting_on_a_fine_grid():
  rng = np.random.RandomState(0)
  xs, ys = rng.uniform(0.2, 1, 6), rng.uniform(0.2, 1, 6)
  u = np.linspace(0.2, 1, 801)[:-1] + 0.0005  # cell centres, 0.001 wide
  gx, gy = np.meshgrid(u, u, indexing="ij")
  dominated = np.zeros_like(gx, bool)
  for x, y in zip(xs, ys, strict=True):
    dominated |= (gx <= x) & (gy <= y)
  assert curves.hypervolume(xs, ys, (0.2, 0.2)) == pytest.approx(dominated.mean() * 0.64,
                                                                 abs=2e-3)
  assert curves.hypervolume(np.array([0.1]), np.array([0.9]), (0.2, 0.2)) == 0.0


def test_shifted_images_are_deterministic_and_differ():
  d = data.digits_transfer()
  x = d.down_test.x[:20]
  for kind in data.SHIFTS:
    a, b = data.shifted_images(x, kind), data.shifted_images(x, kind)
    assert a.shape == x.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and np.abs(a - x).mean() > 0.01, kind
  with pytest.raises(ValueError, match="kind"):
    data.shifted_images(x, "fog")
  text = data.stdlib_docstrings_text(max_chars=5000)
  assert len(text) == 5000 and text not in data.stdlib_source_text(600_000)


def test_lp_ft_probes_then_fine_tunes_with_a_fresh_adam():
  params = models.CNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  m = next(m for m in methods.transfer_methods() if m.name == "lp_ft")
  lr = 1e-2
  tx = m.build(methods.Context(steps=4, base_lr=1e-3, head="head"), lr)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  moves = []
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    moves.append(updates)
  body = lambda u: np.abs(np.asarray(u["backbone"]["Conv_0"]["kernel"])).max()
  head = lambda u: np.abs(np.asarray(u["head"]["kernel"])).max()
  assert body(moves[0]) == 0 and body(moves[1]) == 0 and head(moves[0]) > 0
  # The first fine-tuning step is a fresh Adam's: |update| = peak lr for constant gradients.
  assert body(moves[2]) == pytest.approx(lr, rel=1e-4)


def test_wise_ft_interpolates_backbone_and_keeps_the_new_head():
  p0 = models.CNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  ft = jax.tree.map(lambda x: x + 1.0, p0)
  m = next(m for m in methods.transfer_methods() if m.name == "wise_ft")
  ctx = methods.Context(steps=1, base_lr=1e-3, head="head")
  mixed = m.interpolate(ctx, ft, p0, 0.25)
  np.testing.assert_allclose(mixed["backbone"]["Dense_0"]["kernel"],
                             p0["backbone"]["Dense_0"]["kernel"] + 0.25, atol=1e-6)
  np.testing.assert_array_equal(mixed["head"]["kernel"], ft["head"]["kernel"])


def test_large_lm_caches_pretrained_weights_by_content(tmp_path, monkeypatch):
  from evidence import large_lm

  monkeypatch.setenv("DUALOPT_CACHE", str(tmp_path))
  cfg = large_lm.LargeConfig(seeds=2, d=16, n_layers=1, heads=2, context=8, batch=4,
                             up_chars=20_000, pretrain_steps=3, finetune_steps=2, eval_windows=4,
                             chunk=2)
  names = ("adam", "wise_ft", "dualopt_default")
  first = large_lm.run(cfg, names=names, progress=False, log=lambda _s: None)
  assert all(first["methods"][n]["status"] == "ok" for n in names)
  assert len(list(tmp_path.glob("large_lm-*.msgpack"))) == 1
  again = large_lm.run(cfg, names=("adam",), progress=False, log=lambda _s: None)
  assert again["pretrain"]["seconds"] == 0.0  # read from the cache, not trained
  assert again["pretrain"]["up_test_loss"] == first["pretrain"]["up_test_loss"]
  other = dataclasses.replace(cfg, pretrain_steps=4)
  assert large_lm.content_hash(other, np.zeros(3, np.int32)) != large_lm.content_hash(
    cfg, np.zeros(3, np.int32))
  assert "dualopt_default" in large_lm.table(first)
