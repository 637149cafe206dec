"""describe: the per-layer table users inspect before training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import dualopt_jax as dj


class _Cnn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def params():
  return _Cnn().init(jax.random.key(0), jnp.ones((1, 6, 6, 1)))["params"]


def test_finetune_table_rows_in_definition_order(params) -> None:
  lines = []
  rows = dj.describe(params, dj.dualopt(1e-4, rollback=0.02, head="head"), print_fn=lines.append)
  assert [r["path"] for r in rows] == [
    "Conv_0/kernel", "Conv_0/bias", "Conv_1/kernel", "Conv_1/bias",
    "Dense_0/kernel", "Dense_0/bias", "head/kernel", "head/bias",
  ]
  # Backbone units Conv_0, Conv_1, Dense_0 at depths 0, 1/2, 1: multipliers 1, 1/2, 0.
  fractions = [r["fraction"] for r in rows]
  assert fractions == pytest.approx([0.02, 0.02, 0.01, 0.01, 0.0, 0.0, 0.0, 0.0])
  assert rows[-1]["head"] and rows[-1]["depth"] is None
  assert "rollback/step @peak" in lines[0] and "head/kernel  [head]" in lines[0]


def test_olor_table_uses_tensor_indices(params) -> None:
  rows = dj.describe(params, dj.olor(1e-4, back_level_max=100.0, back_pow=1.0), print_fn=None)
  n = len(rows) - 1
  for i, row in enumerate(rows):
    assert row["depth"] == pytest.approx(i / n)
    assert row["fraction"] == pytest.approx(1e-4 * 100.0 * (1 - i / n))


def test_scratch_deep_profile_and_plain_spec(params) -> None:
  rows = dj.describe(
    params, dj.dualopt(1e-3, mode="scratch", weight_decay=1e-3, decay_profile="deep"),
    print_fn=None,
  )
  assert rows[0]["multiplier"] == 0.0 and rows[-1]["multiplier"] == 1.0
  plain = dj.describe(params, 0.5, print_fn=None)
  assert all(r["multiplier"] == 0.5 and r["fraction"] is None for r in plain)


def test_unknown_transformation_is_rejected(params) -> None:
  with pytest.raises(ValueError, match="not built by dualopt"):
    dj.describe(params, optax.adamw(1e-3), print_fn=None)
