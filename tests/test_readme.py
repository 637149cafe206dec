"""The README's quick start runs as written."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
  text = README.read_text()
  start = text.index("```python", text.index(heading)) + len("```python")
  return text[start : text.index("```", start)]


def test_fine_tuning_quick_start_trains(capsys) -> None:
  namespace: dict = {}
  exec(_python_block_after("## Fine-tuning quick start"), namespace)  # noqa: S102
  assert "rollback/step @peak" in capsys.readouterr().out
  params, opt_state = namespace["params"], namespace["opt_state"]
  x, y = jnp.ones((4, 32)), jnp.array([1, 2, 3, 4])
  new_params, state = params, opt_state
  for _ in range(3):  # the warm-up starts at lr 0
    new_params, state, loss = namespace["train_step"](new_params, state, x, y)
  assert jnp.isfinite(loss)
  assert not jnp.array_equal(new_params["head"]["kernel"], params["head"]["kernel"])


def test_scratch_snippet_builds_an_optimizer() -> None:
  namespace: dict = {}
  exec("import dualopt_jax as dj\n" + _python_block_after("## Training from scratch"), namespace)  # noqa: S102
  state = namespace["tx"].init({"layers_0": {"w": jnp.ones(2)}})
  assert state is not None
