"""The optimizers compared, as a registry.

Every entry names one main hyper-parameter -- its *strength* -- and a grid of
``GRID_SIZE`` log-spaced values wide enough to go from "no visible effect" to
"clearly too strong", so each method is a curve (downstream accuracy vs
upstream retention), not one point. The points the tables report are chosen
on validation splits only. Methods whose main hyper-parameter is not the learning rate use the
shared base learning rate (chosen for plain Adam on validation first, see
``vision.py``). Every method runs the same cosine learning-rate schedule
(peak -> 0, no warm-up) and the same step budget.

Every method is built from the public API (``import dualopt_jax as dj``)
and Optax; parameter paths are read with ``jax.tree_util`` key paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualopt_jax as dj

from .train import path_keys

GRID_SIZE = 8


def geom(lo: float, hi: float, n: int = GRID_SIZE) -> tuple[float, ...]:
  """``n`` log-spaced values from ``lo`` to ``hi``, rounded to 2 significant digits."""
  return tuple(float(f"{v:.2g}") for v in np.geomspace(lo, hi, n))


@dataclasses.dataclass(frozen=True)
class Context:
  """What a builder needs besides the hyper-parameter value."""

  steps: int
  base_lr: float  # peak lr for methods that do not tune the lr
  head: str | None  # glob of the newly initialised head, or None (language: head is pre-trained)
  # The model's forward order (dj.forward_order), for depth-by-tensor profiles: the names of a
  # Transformer block do not say the order of its norm, attention and MLP.
  order: Any = None
  # Block depths in [0, 1] of the non-head parameters (a pytree over them; None for the head),
  # for composed methods.
  depths: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  hp_name: str
  grid: tuple[float, ...]
  build: Callable[[Context, Any], optax.GradientTransformation]
  tunes_lr: bool = False  # the main hp is the peak lr (else base_lr is used)
  note: str = ""
  # Post-hoc methods train nothing: ``interpolate(finetuned, params0, hp) -> params`` maps the
  # weights ``posthoc_of`` reached at the base lr (one set per seed) to this method's weights.
  posthoc_of: str | None = None
  interpolate: Callable[[Any, Any, Any, Any], Any] | None = None
  # A method at fixed settings (a library default): one point, no grid to sweep.
  fixed: bool = False


def cosine(peak: Any, steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(init_value=peak, decay_steps=steps, alpha=0.0)


def _map_with_path(fn: Callable[[tuple, Any], Any], tree: Any) -> Any:
  """``jax.tree.map`` passing the leaf's path (a tuple of keys) first; MaskedNodes pass through."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree_util.tree_map_with_path(
    lambda kp, x: x if masked(x) else fn(path_keys(kp), x), tree, is_leaf=masked
  )


def _head_labels(head: str | None) -> Callable[[Any], Any]:
  selects = dj.path_filter(head) if head else (lambda _p: False)
  return lambda tree: _map_with_path(
    lambda path, _x: "head" if selects(path) else "body", tree
  )


# ----------------------------------------------------------------------------- builders


def _adam(ctx: Context, hp: Any) -> optax.GradientTransformation:
  return optax.adam(cosine(hp, ctx.steps))


def _adamw(ctx: Context, hp: Any) -> optax.GradientTransformation:
  # optax.adamw: p <- p - lr_t * (adam + wd * p); the decay follows the schedule.
  return optax.adamw(cosine(ctx.base_lr, ctx.steps), weight_decay=hp)


def _linear_probe(ctx: Context, hp: Any) -> optax.GradientTransformation:
  if ctx.head is None:
    labels = lambda tree: _map_with_path(
      lambda path, _x: "head" if dj.path_filter("head")(path) else "body", tree
    )
  else:
    labels = _head_labels(ctx.head)
  return optax.multi_transform(
    {"head": optax.adam(cosine(hp, ctx.steps)), "body": optax.set_to_zero()}, labels
  )


def _dualopt(granularity: str) -> Callable[[Context, Any], optax.GradientTransformation]:
  def build(ctx: Context, hp: Any) -> optax.GradientTransformation:
    return dj.dualopt(
      cosine(ctx.base_lr, ctx.steps), mode="finetune", rollback=hp, granularity=granularity,
      head=ctx.head, peak_learning_rate=ctx.base_lr, rollback_floor=0.0,
      order=ctx.order if granularity == "tensor" else None,
    )

  return build


def _dualopt_default(ctx: Context, _hp: Any) -> optax.GradientTransformation:
  """``dj.dualopt`` at its fine-tune defaults; only the schedule, its peak and the head given."""
  return dj.dualopt(cosine(ctx.base_lr, ctx.steps), peak_learning_rate=ctx.base_lr, head=ctx.head)


def _rollback_with_floor(ctx: Context, hp: Any) -> optax.GradientTransformation:
  """DualOpt fine-tune (block) composed from ``rollback_to`` with a floor kappa_min = rho / 4.

  Not a library preset: an ablation. With kappa_min = 0 the deepest non-head
  block is never rolled back; here it gets a quarter of the shallowest's pull.
  """
  lr = cosine(ctx.base_lr, ctx.steps)
  scale = dj.depth_profile(ctx.depths, start=1.0, end=0.25, power=1.0)
  return optax.chain(
    optax.scale_by_adam(eps_root=0.0), optax.scale_by_learning_rate(lr),
    dj.rollback_to(rate=lambda count: hp * lr(count) / ctx.base_lr, layer_scale=scale,
                   mask=_not_head(ctx.head)),
  )


def _olor_reference(ctx: Context, hp: Any) -> optax.GradientTransformation:
  # Reference pipeline: Adam, cosine lr from eta0, kappa_max = 0.01 / eta0, kappa_min 0, gamma 1.
  return dj.olor(
    cosine(hp, ctx.steps), back_level_max=0.01 / hp, back_level_min=0.0, back_pow=1.0,
    head=ctx.head, order=ctx.order,
  )


def _not_head(head: str | None) -> Any:
  """Mask callable selecting every leaf except the new head (None: every leaf)."""
  selects = dj.path_filter(head) if head else (lambda _p: False)
  return lambda tree: _map_with_path(lambda path, _x: not selects(path), tree)


def _l2sp(coupled: bool) -> Callable[[Context, Any], optax.GradientTransformation]:
  def build(ctx: Context, hp: Any) -> optax.GradientTransformation:
    # The new head stores no anchor and, with beta = 0, is not penalised (the reference repo's
    # L2-SP baseline).
    return dj.l2sp(cosine(ctx.base_lr, ctx.steps), alpha=hp, beta=0.0, coupled=coupled,
                   decay_to_zero=ctx.head)

  return build


def _spd(ctx: Context, hp: Any) -> optax.GradientTransformation:
  return dj.spd(optax.adam(cosine(ctx.base_lr, ctx.steps)), strength=hp, mask=_not_head(ctx.head))


def _llrd(ctx: Context, hp: Any) -> optax.GradientTransformation:
  return optax.chain(optax.scale_by_adam(), dj.layerwise_lr_decay(hp),
                     optax.scale_by_learning_rate(cosine(ctx.base_lr, ctx.steps)))


def _uniform_rollback(ctx: Context, hp: Any) -> optax.GradientTransformation:
  """Ablation of the depth profile: the same rollback operator, one fraction for every layer."""
  lr = cosine(ctx.base_lr, ctx.steps)
  return optax.chain(
    optax.scale_by_adam(eps_root=0.0), optax.scale_by_learning_rate(lr),
    dj.rollback_to(rate=lambda count: hp * lr(count) / ctx.base_lr, mask=_not_head(ctx.head)),
  )


def staged(first: optax.GradientTransformation, second: optax.GradientTransformation,
           switch: int) -> optax.GradientTransformation:
  """``first`` for the steps before ``switch``, then ``second`` with a fresh state (count 0)."""

  def init(params: Any) -> Any:
    return jnp.zeros([], jnp.int32), first.init(params), second.init(params)

  def update(grads: Any, state: Any, params: Any = None) -> Any:
    count, s1, s2 = state

    def run_first(_: Any) -> Any:
      u, n1 = first.update(grads, s1, params)
      return u, n1, s2

    def run_second(_: Any) -> Any:
      u, n2 = second.update(grads, s2, params)
      return u, s1, n2

    u, n1, n2 = jax.lax.cond(count < switch, run_first, run_second, None)
    return u, (optax.safe_increment(count), n1, n2)

  return optax.GradientTransformation(init, update)


LP_FT_PROBE_LR = 0.03  # the linear probe's validation choice in the committed full vision run


def _lp_ft(ctx: Context, hp: Any) -> optax.GradientTransformation:
  """LP-FT (Kumar et al., ICLR 2022): linear probe for half the budget, then full fine-tuning."""
  switch = ctx.steps // 2
  probe = _linear_probe(dataclasses.replace(ctx, steps=switch), LP_FT_PROBE_LR)
  return staged(probe, optax.adam(cosine(hp, ctx.steps - switch)), switch)


def _wise_ft(ctx: Context, finetuned: Any, params0: Any, alpha: Any) -> Any:
  """WiSE-FT (Wortsman et al., CVPR 2022): theta0 + alpha (theta_ft - theta0).

  A newly initialised head has no pre-trained value to interpolate toward; it
  keeps its fine-tuned weights (alpha = 0 is then the pre-trained backbone
  with the head fine-tuned on the moving backbone).
  """
  selects = dj.path_filter(ctx.head) if ctx.head else (lambda _p: False)
  mix = lambda path, ft, p0: ft if selects(path) else p0 + alpha * (ft - p0)
  return jax.tree_util.tree_map_with_path(lambda kp, ft, p0: mix(path_keys(kp), ft, p0),
                                          finetuned, params0)


# ----------------------------------------------------------------------------- registry

ROLLBACK_GRID = geom(1e-3, 0.3)


def transfer_methods() -> list[Method]:
  """The fine-tuning comparison (vision and language): every method a curve of GRID_SIZE points."""
  return [
    Method("adam", "lr", geom(1e-4, 3e-2), _adam, tunes_lr=True,
           note="plain Adam, no decay; its lr choice becomes the base lr"),
    Method("wise_ft", "alpha", tuple(float(f"{a:.2g}") for a in np.linspace(0, 1, GRID_SIZE)),
           None, posthoc_of="adam", interpolate=_wise_ft,
           note="WiSE-FT: interpolate Adam's fine-tuned weights (base lr) with the pre-trained"),
    Method("adamw", "weight_decay", geom(1e-2, 30.0), _adamw,
           note="optax.adamw, decay toward 0 multiplied by the lr"),
    Method("l2sp_coupled", "alpha", geom(1e-4, 3.0), _l2sp(True),
           note="L2-SP penalty gradient through Adam"),
    Method("l2sp_decoupled", "alpha", geom(1e-3, 30.0), _l2sp(False),
           note="L2-SP decay toward the anchor after Adam"),
    Method("spd", "strength", geom(0.01, 3.0), _spd,
           note="selective projection decay"),
    Method("dualopt_default", "defaults", (0.0,), _dualopt_default, fixed=True,
           note="dj.dualopt(schedule, peak_learning_rate=base lr, head=...) and nothing else"),
    Method("dualopt_block", "rollback", ROLLBACK_GRID, _dualopt("block"),
           note="DualOpt fine-tune, one depth per block, floor 0 (OLOR's profile)"),
    Method("dualopt_tensor", "rollback", ROLLBACK_GRID, _dualopt("tensor"),
           note="DualOpt fine-tune, one depth per tensor, floor 0 (OLOR's profile)"),
    Method("dualopt_block_floor", "rollback", ROLLBACK_GRID, _rollback_with_floor,
           note="ablation: block rollback with kappa_min = rollback/4 (composed from rollback_to)"),
    Method("uniform_rollback", "rollback", ROLLBACK_GRID, _uniform_rollback,
           note="ablation: the same rollback, one fraction for every layer (no depth profile)"),
    Method("olor_ref", "lr", geom(1e-4, 3e-2), _olor_reference, tunes_lr=True,
           note="OLOR, reference settings: kappa_max=0.01/eta0, kappa_min=0, gamma=1, cosine"),
    Method("llrd", "decay", tuple(float(f"{1 - v:.2g}") for v in geom(0.03, 0.8)), _llrd,
           note="layer-wise lr decay"),
    Method("lp_ft", "lr", geom(1e-4, 3e-2), _lp_ft, tunes_lr=True,
           note=f"LP-FT: head-only (lr {LP_FT_PROBE_LR:g}) for half the steps, then Adam at lr"),
    Method("linear_probe", "lr", geom(1e-3, 1e-1), _linear_probe, tunes_lr=True,
           note="frozen backbone, head trained with Adam"),
  ]


def check_grids(methods: list[Method], size: int = GRID_SIZE) -> None:
  """Every method of a benchmark gets a grid of the same size."""
  for m in methods:
    if m.fixed and len(m.grid) == 1:
      continue
    if len(m.grid) != size:
      raise ValueError(f"method {m.name}: grid has {len(m.grid)} values, expected {size}.")
