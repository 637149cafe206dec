"""The contract: every wrapping of the same parameters gives the same results.

In the manner of Optax's ``optax/contrib/_common_test.py``: one list of factories (``CASES``),
one list of contexts (``tests/_contexts.py``), every factory through every context. Depths are a
pure function of the parameter tree's paths and shapes, stored at ``init`` in the optimizer state,
so a sorted copy, a checkpoint, an ``nnx.State``, ``nnx.Optimizer``, ``optax.partition``/
``masked``/``inject_hyperparams``/``MultiSteps``, FSDP, donation, bf16 and a fresh process must
all end where the reference run (eager ``init`` on a reversed-order dict, jitted steps) ends.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax
import pytest

import dualopt_jax as dj
from tests import _contexts
from tests._contexts import Case

BACKBONE = ["conv*", "linear1"]  # every parameter but the head
# Kept out of inject_hyperparams: injected, Adam's b1/b2 become float32 arrays and move the
# result by ~7e-6 relative (plain optax.adam does the same), which is not what is under test.
ADAM_CONSTANTS = ("b1", "b2", "eps", "momentum")

# --- factories of keyword arguments, so that optax.inject_hyperparams can inject the numbers ---


def adam_rollback_to(learning_rate: float, rate: float, start: float, end: float,
                     mask: Any = None) -> optax.GradientTransformation:
  return optax.chain(optax.adam(learning_rate), dj.rollback_to(
    rate=rate, layer_scale=dj.LayerProfile(start, end), mask=mask))


def adam_layerwise_decay(learning_rate: float, rate: float, start: float, end: float,
                         mask: Any = None) -> optax.GradientTransformation:
  return optax.chain(optax.adam(learning_rate), dj.layerwise_decay(
    rate=rate, layer_scale=dj.LayerProfile(start, end), mask=mask))


def adam_spd(learning_rate: float, strength: float, mask: Any = None
             ) -> optax.GradientTransformation:
  return dj.spd(optax.adam(learning_rate), strength=strength, mask=mask)


def adam_project_to_anchor(learning_rate: float, radius: float, mask: Any = None
                           ) -> optax.GradientTransformation:
  return optax.chain(optax.adam(learning_rate), dj.project_to_anchor(radius, mask=mask))


def adam_fix_norm(learning_rate: float, classifier_norm: float | None = None,
                  classifier: Any = None) -> optax.GradientTransformation:
  return optax.chain(optax.adam(learning_rate), dj.fix_norm(
    normalized="conv*/kernel", classifier=classifier, classifier_norm=classifier_norm))


def adam_layerwise_lr_decay(learning_rate: float, decay: float) -> optax.GradientTransformation:
  return optax.chain(optax.scale_by_adam(), dj.layerwise_lr_decay(decay),
                     optax.scale_by_learning_rate(learning_rate))


CASES = [
  Case("dualopt_finetune", dj.dualopt, dict(learning_rate=1e-2, rollback=0.1, head="head"),
       change=dict(learning_rate=5e-3, rollback=0.3, power=2.0), static_args=ADAM_CONSTANTS,
       without_head={}),
  Case("dualopt_scratch", dj.dualopt,
       dict(learning_rate=1e-2, mode="scratch", weight_decay=1e-2),
       change=dict(learning_rate=5e-3, weight_decay=3e-2, power=2.0), static_args=ADAM_CONSTANTS,
       without_head=dict(head="head")),
  # One index per tensor, no head: init sees the tree exactly as each context hands it over, so
  # this is where depths taken from key order would show.
  Case("dualopt_tensor", dj.dualopt, dict(learning_rate=1e-2, rollback=0.1, granularity="tensor"),
       change=dict(learning_rate=5e-3, rollback=0.3, power=2.0), static_args=ADAM_CONSTANTS),
  Case("olor", dj.olor,
       dict(learning_rate=1e-2, back_level_max=5.0, back_pow=1.0, head="head"),
       change=dict(learning_rate=5e-3, back_level_max=10.0, back_pow=2.0),
       static_args=ADAM_CONSTANTS, without_head={}),
  Case("rollback_to", adam_rollback_to, dict(learning_rate=1e-2, rate=0.1, start=1.0, end=0.2),
       change=dict(learning_rate=5e-3, rate=0.3, end=0.5), without_head=dict(mask=BACKBONE)),
  Case("layerwise_decay", adam_layerwise_decay,
       dict(learning_rate=1e-2, rate=0.05, start=1.0, end=0.0),
       change=dict(learning_rate=5e-3, rate=0.2, start=0.5), without_head=dict(mask=BACKBONE)),
  Case("spd", adam_spd, dict(learning_rate=1e-2, strength=1.0),
       change=dict(learning_rate=5e-3, strength=0.5), without_head=dict(mask=BACKBONE)),
  Case("l2sp_coupled", dj.l2sp,
       dict(learning_rate=1e-2, alpha=0.1, decay_to_zero="head", coupled=True),
       change=dict(learning_rate=5e-3, alpha=1.0), static_args=ADAM_CONSTANTS[:3],
       without_head={}),
  Case("l2sp_decoupled", dj.l2sp,
       dict(learning_rate=1e-2, alpha=0.1, decay_to_zero="head", coupled=False),
       change=dict(learning_rate=5e-3, alpha=1.0), static_args=ADAM_CONSTANTS[:3],
       without_head={}),
  Case("project_to_anchor", adam_project_to_anchor, dict(learning_rate=1e-2, radius=0.05),
       change=dict(learning_rate=5e-3, radius=0.02), without_head=dict(mask=BACKBONE)),
  Case("fix_norm", adam_fix_norm,
       dict(learning_rate=1e-2, classifier="head/kernel", classifier_norm=1.0),
       change=dict(learning_rate=5e-3, classifier_norm=2.0),
       without_head=dict(classifier=None, classifier_norm=None)),
  # Their mask= keeps the head in the depths (optax.partition leaves it out): partition only
  # checks that the backbone moves and the head does not.
  Case("layerwise_lr_decay", adam_layerwise_lr_decay, dict(learning_rate=1e-2, decay=0.5),
       change=dict(learning_rate=5e-3, decay=0.8)),
  Case("layerwise_lr_decay_adamw", dj.layerwise_lr_decay_adamw,
       dict(learning_rate=1e-2, decay=0.5, weight_decay=0.01),
       change=dict(learning_rate=5e-3, decay=0.8, weight_decay=0.1),
       static_args=ADAM_CONSTANTS[:3]),
]

FRESH_PROCESS = _contexts.FreshProcess("tests.test_contract:CASES")
CONTEXTS = {**_contexts.CONTEXTS, "orbax_fresh_process": FRESH_PROCESS}

# (case, context) -> a library bug, reported; "active" is test_factory_is_active. Strict: once the
# bug is fixed the test fails until its entry is removed.
# (factory, context) cells expected to fail, with the reason; none today.
KNOWN: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _fresh_process(request: pytest.FixtureRequest):
  """Starts the fresh process early, when its tests are selected, so it compiles beside us
  (not under xdist, where every worker collects them all: there it starts on first use)."""
  xdist = hasattr(request.config, "workerinput")
  if not xdist and any("orbax_fresh_process" in item.name for item in request.session.items):
    FRESH_PROCESS.start()
  yield
  FRESH_PROCESS.close()


def _param(*values: Any, case: Case, context: str, test_id: str) -> Any:
  reason = KNOWN.get((case.name, context))
  marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
  return pytest.param(*values, id=test_id, marks=marks)


@pytest.mark.parametrize(("case", "context"), [
  _param(case, context, case=case, context=context, test_id=f"{context}-{case.name}")
  for context in CONTEXTS for case in CASES])
def test_contract(case: Case, context: str) -> None:
  CONTEXTS[context](case)


@functools.cache
def _adam() -> Any:
  adam = optax.adam(1e-2)
  p, _ = _contexts.run_steps(jax.jit(_contexts.train_step(adam)), _contexts.params(),
                             adam.init(_contexts.params()), _contexts.grads())
  return p


@pytest.mark.parametrize("case", [
  _param(case, case=case, context="active", test_id=case.name) for case in CASES])
def test_factory_is_active(case: Case) -> None:
  """Not vacuous: the reference run differs from plain Adam's, beyond the contract's tolerance;
  a state that holds depths or strengths shows them in ``describe``."""
  got, want = _contexts.flat(_contexts.reference(case).params), _contexts.flat(_adam())
  ten = dict(rtol=10 * _contexts.RTOL, atol=10 * _contexts.ATOL)  # 10x the contract's tolerance
  assert not all(np.allclose(got[k], v, **ten) for k, v in want.items()), (
    f"{case.name} acts like Adam")
  rows = _contexts.describe_rows(_contexts.reference(case).state)
  if rows is not None:
    kinds = [k for k in rows[0] if k not in ("path", "shape", "depth", "multiplier")]
    assert any(r[k] is not None for r in rows for k in kinds), "describe shows no strength"
