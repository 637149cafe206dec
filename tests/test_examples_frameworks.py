"""The framework examples run end to end: examples/nnx_digits.py (Flax NNX + Orbax) and
examples/tunix_finetune.py (Tunix's own trainer; skipped unless Tunix's trainer stack imports).

Each test runs the example's ``main`` in-process with few steps and checks what the run did,
not just that it finished.
"""

import importlib.util
import os

import numpy as np
import pytest

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(_EXAMPLES,
                                                                                  f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
  nnx_digits = _load("nnx_digits")
  ckpt = tmp_path_factory.mktemp("nnx_ckpt")
  return nnx_digits.main(["--pretrain-steps", "60", "--finetune-steps", "30", "--log-every", "10",
                          "--compare-adam", "--ckpt", str(ckpt)])


def test_nnx_pretraining_learns_and_the_checkpoint_round_trips(nnx_run):
  assert nnx_run["pretrain_upstream"] > 0.5                  # 5 classes: chance is 0.2
  assert os.path.isdir(nnx_run["ckpt"])
  saved, restored = _flat(nnx_run["saved"]), _flat(nnx_run["restored"])
  assert set(saved) == set(restored) == {
    f"{m}/{p}" for m in ("conv1", "conv2", "linear1", "head") for p in ("kernel", "bias")}
  for path in saved:
    np.testing.assert_array_equal(restored[path], saved[path], err_msg=path)
  # The restored model (pre-trained head kept aside) scores what the saved one did.
  assert nnx_run["before"]["upstream"] == pytest.approx(nnx_run["pretrain_upstream"])


def test_nnx_describe_has_a_row_per_param_and_skips_the_head(nnx_run):
  rows = {r["path"]: r for r in nnx_run["describe"]}
  assert set(rows) == set(_flat(nnx_run["saved"]))
  assert rows["head/kernel"]["depth"] is None and rows["head/kernel"]["rollback"] is None
  # Three backbone blocks in forward order: conv1 (shallowest, full rollback) .. linear1 (the
  # default floor, a quarter): multiplier = 0.25 + 0.75 * (1 - depth).
  assert [rows[f"{m}/kernel"]["depth"] for m in ("conv1", "conv2", "linear1")] == [0, 0.5, 1]
  assert [rows[f"{m}/kernel"]["multiplier"] for m in ("conv1", "conv2", "linear1")] == [
    1, 0.625, 0.25]


def test_nnx_finetuning_learns_the_new_task_and_rollback_holds_the_shallow_layers(nnx_run):
  before, after = nnx_run["before"], nnx_run["after"]
  assert after["downstream"] > before["downstream"] + 0.15
  assert after["downstream"] > 0.35
  assert [r["step"] for r in nnx_run["drift"]] == [10, 20, 30]
  last = nnx_run["drift"][-1]
  assert set(k for k in last if k.startswith("drift/")) == {
    "drift/conv1", "drift/conv2", "drift/linear1", "drift/head"}
  assert all(last[k] > 0 for k in last if k.startswith("drift/"))
  # Drift grows over the run, and the rollback keeps conv1 (multiplier 1) closer to the
  # pre-trained weights than plain Adam with the same schedule does, relatively more than
  # linear1 (multiplier 0.25).
  assert nnx_run["drift"][0]["drift/conv1"] < last["drift/conv1"]
  adam = nnx_run["adam"]["drift"]
  assert last["drift/conv1"] < 0.97 * adam["drift/conv1"]          # measured: 0.91
  assert last["drift/conv1"] / adam["drift/conv1"] < last["drift/linear1"] / adam["drift/linear1"]


# --- Tunix ---------------------------------------------------------------------------------------


def _tunix_example():
  """The Tunix example module, or a skip naming what is missing.

  The main environment has google-tunix installed with --no-deps (for the model zoos): its
  trainer stack is missing there, and importing ``tunix`` (whose ``__init__`` imports the
  trainer) is not even attempted. ``pip install -e ".[tunix]"`` installs it (``make test-tunix``).
  """
  missing = [m for m in ("grain", "metrax", "qwix", "tunix")
             if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"Tunix's trainer stack is not installed (missing {', '.join(missing)}); "
                "pip install -e '.[tunix]' (make test-tunix) runs this test")
  pytest.importorskip("tunix.sft.peft_trainer", reason="Tunix's trainer does not import")
  import flax

  flag = flax.config.flax_always_shard_variable
  try:
    return _load("tunix_finetune")
  finally:
    # tunix's model modules turn this flag off for the whole process at import; undo that.
    flax.config.update("flax_always_shard_variable", flag)


def _param_paths(tree):
  return set(_flat(tree))


def test_tunix_full_weight_finetune_through_peft_trainer():
  example = _tunix_example()
  run = example.main(["--mode", "full", "--pretrain-steps", "10", "--steps", "20",
                      "--log-every", "5", "--eval-batches", "2", "--seq-len", "32"])
  assert run["steps"] == 20 and len(run["train_loss"]) == 20
  # Learned something about the downstream text (pre-trained 10 steps, then 20 more).
  assert run["after_loss"]["downstream"] < run["before"]["downstream"] - 0.1
  rows = {r["path"]: r for r in run["describe"]}
  assert set(rows) == _param_paths(run["base"])                # a row per parameter
  depth = lambda p: rows[p]["depth"]
  assert (depth("embedder/input_embedding") == 0 < depth("layers/0/attn/q_proj/w")
          < depth("layers/1/attn/q_proj/w") < depth("lm_head/w") == 1)
  assert [r["step"] for r in run["drift"]] == [5, 10, 15, 20]
  last = run["drift"][-1]
  assert {"drift/embedder", "drift/layers/0", "drift/layers/1", "drift/lm_head"} <= set(last)
  assert all(v > 0 for k, v in last.items() if k.startswith("drift/"))
  changed = [p for p, v in _flat(run["after"]).items()
             if not np.array_equal(v, _flat(run["base"])[p])]
  assert set(changed) == _param_paths(run["base"])            # full weights: every param trained


def test_tunix_lora_finetune_through_peft_trainer():
  example = _tunix_example()
  run = example.main(["--mode", "lora", "--pretrain-steps", "10", "--steps", "20",
                      "--log-every", "5", "--eval-batches", "2", "--seq-len", "32"])
  assert run["steps"] == 20
  # 20 adapter-only steps barely move this byte-level loss (the frozen embedder and lm_head hold
  # its unigram statistics; measured 4.792 -> 4.787): only check that nothing blew up.
  assert np.isfinite(run["after_loss"]["downstream"])
  assert run["after_loss"]["downstream"] < run["before"]["downstream"] + 0.05
  base, after = _flat(run["base"]), _flat(run["after"])
  adapters = {p for p in after if p not in base}
  assert adapters and all(p.rsplit("/", 1)[-1].endswith(("_lora_a", "_lora_b")) for p in adapters)
  for path, value in base.items():                            # the base weights stay frozen
    np.testing.assert_array_equal(after[path], value, err_msg=path)
  for path in (p for p in adapters if p.endswith("_lora_b")):  # Qwix's B starts at 0: trained
    assert np.any(after[path] != 0), path
  assert [r["step"] for r in run["drift"]] == [5, 10, 15, 20]
  b_factors = {p for p in adapters if p.endswith("_lora_b")}
  last = {k[len("drift/"):]: v for k, v in run["drift"][-1].items() if k.startswith("drift/")}
  assert set(last) == b_factors and len(b_factors) == 14     # 7 projections x 2 layers
  assert all(v > 0 for v in last.values())                   # merged drift ||A B|| / ||W0||
  rows = {r["path"]: r for r in run["describe"]}
  assert set(rows) == adapters                                # the trainer optimizes adapters only
  for path, row in rows.items():
    if path.endswith("_lora_b"):
      assert row["depth"] is not None and row["rollback"] is not None, path
    else:
      assert row["rollback"] is None, path                    # A factors: the plain step
