"""The README's code blocks run as written, and do what the text says."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._markdown import python_block_after

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
  return python_block_after(README, heading)


@pytest.fixture(scope="module")
def quick_start() -> dict:
  namespace: dict = {}
  exec(_python_block_after("## Fine-tuning quick start"), namespace)  # noqa: S102
  return namespace


def test_fine_tuning_quick_start_trains(quick_start: dict, capsys) -> None:
  namespace = dict(quick_start)
  exec(_python_block_after("## Fine-tuning quick start"), namespace)  # noqa: S102
  assert "rollback/step" in capsys.readouterr().out
  params, opt_state = namespace["params"], namespace["opt_state"]
  x, y = jnp.ones((4, 32)), jnp.array([1, 2, 3, 4])
  new_params, state = params, opt_state
  for _ in range(3):  # the warm-up starts at lr 0
    new_params, state, loss = namespace["train_step"](new_params, state, x, y)
  assert jnp.isfinite(loss)
  assert not jnp.array_equal(new_params["head"]["kernel"], params["head"]["kernel"])


def test_restore_then_fine_tune_block(quick_start: dict) -> None:
  namespace = dict(quick_start)
  exec(_python_block_after("## Restore pre-trained weights"), namespace)  # noqa: S102
  assert list(namespace["restored"]) == sorted(namespace["params"])  # the keys came back sorted


def test_nnx_block_trains_and_describes(quick_start: dict, capsys) -> None:
  namespace = dict(quick_start)
  exec(_python_block_after("## NNX"), namespace)  # noqa: S102
  table = capsys.readouterr().out
  assert "conv1/kernel" in table and "rollback/step" in table


def test_forward_order_block_orders_the_towers(quick_start: dict) -> None:
  namespace = dict(quick_start)
  exec(_python_block_after("## When the names do not say the order"), namespace)  # noqa: S102
  order, towers = namespace["order"], namespace["towers"]
  first = {k.split("/")[0]: v for k, v in reversed(order.items())}
  assert first["text_embed"] < first["vision"] < first["text_layers"] < first["head"]
  dj = namespace["dj"]
  with pytest.raises(ValueError, match="dj.forward_order"):
    dj.dualopt(1e-4, head="head").init(towers)
  depths = dj.layer_depths(towers, order=order, head="head")
  assert [float(np.min(depths[k]["kernel" if k != "text_embed" else "embedding"]))
          for k in ("text_embed", "vision", "text_layers")] == [0.0, 0.5, 1.0]


def test_building_blocks_mask_selects_the_backbone(quick_start: dict) -> None:
  namespace = dict(quick_start)
  exec(_python_block_after("## Building blocks"), namespace)  # noqa: S102
  state = namespace["opt_state"]
  anchors = [x for x in jax.tree.leaves(state[2].inner_state.anchor)]
  assert len(anchors) == 6  # Dense_0..2 kernels and biases; the head is masked out


def test_scratch_snippet_builds_an_optimizer() -> None:
  namespace: dict = {}
  exec("import dualopt_jax as dj\n" + _python_block_after("## Training from scratch"), namespace)  # noqa: S102
  state = namespace["tx"].init({"layers_0": {"w": jnp.ones(2)}})
  assert state is not None


def test_lora_block_rolls_the_adapters_back_at_their_base_weights_depths(
  quick_start: dict, capsys
) -> None:
  namespace = dict(quick_start)
  exec(_python_block_after("## LoRA: the rollback of the merged weight"), namespace)  # noqa: S102
  lines = capsys.readouterr().out.splitlines()
  rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
  # embed 0, layers/0..2 at 1/4..3/4, head 1 in the whole model; the optimizer sees only adapters.
  assert [rows[f"layers/{i}/lora/lora_b"][2] for i in range(3)] == ["0.25", "0.5", "0.75"]
  assert rows["layers/0/lora/lora_a"][2] == "-"  # A factors: the plain step
