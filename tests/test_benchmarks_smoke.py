"""Smoke test of the benchmark scripts: each main runs on tiny trees and writes its tables.

No timing is asserted (benchmarks print numbers; they are not tests). What is
checked: every script runs end to end for every method, writes its results,
and the optimizer-state accounting of ``memory.py`` holds (moments + anchor at
its dtype, nothing else param-sized), which is exact, not timed.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import _trees  # noqa: E402
import compile_time  # noqa: E402
import memory  # noqa: E402
import step_time  # noqa: E402
import xla_cpu_limits  # noqa: E402

pytestmark = pytest.mark.slow


def test_tree_shape_matches_docstring():
  spec = _trees.TreeSpec("x", d_model=8, n_layers=24, vocab=16)
  structs = _trees.shape_structs(spec)
  leaves = _trees.jax.tree.leaves(structs)
  assert len(leaves) == 169 == spec.n_leaves
  n = sum(int(_trees.np.prod(x.shape)) for x in leaves)
  assert n == spec.n_params == 16 * 8 + 24 * (12 * 64 + 2 * 8 + 32)
  assert structs["params"]["layers_3"]["mlp"]["fc1"]["kernel"].shape == (8, 32)
  params = _trees.make_params(_trees.TreeSpec("y", d_model=8, n_layers=2, vocab=16))
  assert list(params["params"]) == ["embed", "layers_0", "layers_1"]  # definition order
  assert float(params["params"]["layers_1"]["ln1"]["scale"][0]) == 1.0
  assert abs(_trees.spec_with_leaves(2000).n_leaves - 2000) <= 4


def test_step_time_smoke(tmp_path):
  rows = step_time.main(["--tiny", "--out", str(tmp_path)])
  methods = {r["method"] for r in rows}
  assert {"adamw", "dualopt_ft", "dualopt_ft_bf16", "dualopt_scratch", "olor"} <= methods
  assert all(r["median_ms"] > 0 and r["eff_bandwidth_GBps"] > 0 for r in rows)
  meta = json.loads((tmp_path / "step_time_tiny.json").read_text())
  assert len(meta["rows"]) == len(rows)
  assert "| adamw |" in (tmp_path / "step_time_tiny.md").read_text()
  # The --large path rebuilds params/state every round (one method's state alive at a time).
  low = step_time.main(["--tiny", "--low-memory", "--rounds", "1", "--methods", "adamw",
                        "dualopt_ft", "--no-write"])
  assert [r["method"] for r in low] == ["adamw", "dualopt_ft"]
  by_method = {r["method"]: r for r in rows}
  # XLA's own accounting of the compiled step: adamw reads/writes 40 B/param on CPU (no
  # multi-output fusion), the f32 anchor adds its read; SPD's per-tensor sums need temporaries.
  assert by_method["dualopt_ft"]["xla_bytes_per_param"] > by_method["adamw"]["xla_bytes_per_param"]
  assert by_method["adamw"]["temp_MB"] < by_method["spd"]["temp_MB"]
  assert all(r["page_faults_per_step"] >= 0 for r in rows)


def test_step_time_scanned_layout(tmp_path):
  spec = _trees.TreeSpec("x", d_model=8, n_layers=3, vocab=16).layout
  structs = _trees.shape_structs(spec)
  assert spec.n_leaves == len(_trees.jax.tree.leaves(structs)) == 8
  assert spec.n_params == _trees.TreeSpec("x", d_model=8, n_layers=3, vocab=16).n_params
  assert structs["params"]["layers"]["mlp"]["fc1"]["kernel"].shape == (3, 8, 32)
  positions = _trees.forward_positions(spec)
  assert positions["params/layers/ln1/scale"] == (1, 8, 15)  # one position per slice
  rows = step_time.main(["--tiny", "--scanned", "--methods", "adamw", "dualopt_ft", "olor", "spd",
                         "--out", str(tmp_path)])
  assert [r["n_leaves"] for r in rows] == [8, 8, 8, 8]
  assert (tmp_path / "step_time_tiny_scanned.md").exists()


def test_memory_smoke(tmp_path):
  rows = memory.main(["--tiny", "--out", str(tmp_path)])
  n = rows[0]["n_params"]
  by_method = {r["method"]: r for r in rows}
  # Exact accounting: two f32 moments, plus the anchor at its dtype.
  assert by_method["adamw"]["expected_state_bytes"] == 8 * n
  assert by_method["dualopt_ft"]["expected_state_bytes"] == 12 * n
  assert by_method["dualopt_ft_bf16"]["expected_state_bytes"] == 10 * n
  assert by_method["dualopt_scratch"]["expected_state_bytes"] == 8 * n
  n_leaves = _trees.TINY_SIZES[0].n_leaves
  for r in rows:
    # Step counters, one float32 depth per leaf, the rate and profile numbers the next update
    # applies (20 bytes per transformation); nothing param-sized.
    assert 0 <= r["other_state_bytes"] <= 4 * n_leaves + 16 + 2 * 20, r
    assert r["state_ok"], r
  assert (tmp_path / "memory_tiny.md").exists()


def test_compile_time_smoke(tmp_path):
  rows = compile_time.main(["--tiny", "--methods", "adamw", "dualopt_ft", "--out", str(tmp_path)])
  assert {r["n_leaves"] for r in rows} == {8, 29}
  assert all(r["compile_s"] > 0 for r in rows)
  assert (tmp_path / "compile_time_tiny.json").exists()


def test_proto_fused_adam_layouts_agree_and_time():
  import proto_fused_adam

  tiny = _trees.TINY_SIZES[0]
  diffs = proto_fused_adam.check_same_numbers(tiny, steps=3)
  assert set(diffs) == {"dualopt", "leaf", "packed", "grouped", "flat", "flat+ravel"}
  assert all(d < 1e-5 for d in diffs.values()), diffs
  rows = proto_fused_adam.time_size(tiny, rounds=1, block=1)
  assert [r["method"] for r in rows][0] == "adamw" and len(rows) == 7
  assert all(r["fusions"] > 0 and r["ms"] > 0 for r in rows)


def test_xla_cpu_limit_probes_run(capsys):
  """The probes behind BUILD_NOTES' issue-14 limits run; their SPD forms equal ``dj.spd``."""
  xla_cpu_limits.main(["--tiny"])
  out = capsys.readouterr().out
  assert "passed-through buffers" in out and "+ anchor read, returned" in out
  assert "all match dj.spd" in out and "| variadic reduce |" in out
