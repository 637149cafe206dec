"""Ready-made optimizers: ``dualopt`` (fine-tune / scratch modes) and ``olor`` (AdamB)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import jax
import optax

from dualopt_jax import _depths, _hyperparams, _lora, _masks, _paths
from dualopt_jax._profile import LayerProfile, as_tuple
from dualopt_jax._rollback import layerwise_decay, rollback_to

MODES = ("finetune", "scratch")
OPTIMIZERS = ("adam", "sgd")
DECAY_PROFILES = ("shallow", "deep", "flat")

# Scratch-mode defaults, chosen by measurement (BUILD_NOTES.md, "Scratch-mode defaults").
DEFAULT_WEIGHT_DECAY = 3e-3
DEFAULT_DECAY_PROFILE = "shallow"
DEFAULT_DECAY_FOLLOWS_LR = True
# OLOR's reference uses 0; 0.25 keeps the last backbone layer pulled back (BUILD_NOTES.md).
DEFAULT_ROLLBACK_FLOOR = 0.25


# Arguments that only one mode, or one base optimizer, reads: given in the other, they raise.
_MODE_DEFAULTS = MappingProxyType({
  # Fine-tune defaults chosen on the evidence curves (BUILD_NOTES.md, "Fine-tune defaults").
  "finetune": MappingProxyType({"rollback": 0.01, "rollback_floor": DEFAULT_ROLLBACK_FLOOR}),
  "scratch": MappingProxyType({
    "weight_decay": DEFAULT_WEIGHT_DECAY,
    "decay_profile": DEFAULT_DECAY_PROFILE,
    "decay_follows_lr": DEFAULT_DECAY_FOLLOWS_LR,
  }),
})
_OPTIMIZER_DEFAULTS = MappingProxyType({
  "adam": MappingProxyType({"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
  "sgd": MappingProxyType({"momentum": 0.9}),
})


def _own_settings(
  kind: str, choice: str, table: Mapping[str, Mapping[str, Any]], given: dict[str, Any], *,
  name: str,
) -> dict[str, Any]:
  """The settings ``choice`` reads (defaults filled in); raises for another choice's settings."""
  for other, defaults in table.items():
    if other == choice:
      continue
    passed = [k for k in defaults if given.get(k) is not None]
    if passed:
      raise ValueError(
        f"{name}: {', '.join(passed)} {'is' if len(passed) == 1 else 'are'} read only with "
        f"{kind}={other!r}; with {kind}={choice!r} {'it does' if len(passed) == 1 else 'they do'} "
        "nothing. Remove it, or change the "
        f"{kind}."
      )
  own = table[choice]
  return {k: own[k] if given.get(k) is None else given[k] for k in own}


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def _base_optimizer(
  optimizer: str, learning_rate: optax.ScalarOrSchedule, *, name: str, **given: Any
) -> optax.GradientTransformation:
  _check_choice("optimizer", optimizer, OPTIMIZERS)
  own = _own_settings("optimizer", optimizer, _OPTIMIZER_DEFAULTS, given, name=name)
  if optimizer == "adam":
    _hyperparams.check_in_range(own["b1"], 0.0, 1.0, name=f"{name}: b1")
    _hyperparams.check_in_range(own["b2"], 0.0, 1.0, name=f"{name}: b2")
    _hyperparams.check_at_least(own["eps"], 0.0, name=f"{name}: eps")
    direction = optax.scale_by_adam(b1=own["b1"], b2=own["b2"], eps=own["eps"], eps_root=0.0)
  else:
    _hyperparams.check_in_range(own["momentum"], 0.0, 1.0, name=f"{name}: momentum")
    direction = optax.trace(decay=own["momentum"], nesterov=False)  # m <- momentum * m + g
  return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))


def _following_lr(
  fraction: Any, learning_rate: optax.ScalarOrSchedule, peak_learning_rate: float | None,
  *, name: str,
) -> optax.ScalarOrSchedule:
  """``fraction * lr(t) / peak``: the per-step fraction follows the lr schedule."""
  if callable(learning_rate):
    if peak_learning_rate is None:
      raise ValueError(
        f"{name} follows the learning-rate schedule, scaled so that it equals {name} at the "
        "peak learning rate: pass peak_learning_rate=<the schedule's peak value> (e.g. the "
        "peak_value of optax.warmup_cosine_decay_schedule)."
      )
    return lambda count: fraction * learning_rate(count) / peak_learning_rate
  if peak_learning_rate is None:
    return fraction
  return fraction * learning_rate / peak_learning_rate


def _check_fraction(name: str, value: Any) -> None:
  _hyperparams.check_in_range(
    value, 0.0, 1.0, name=name,
    why=": it is the fraction of the way back per step at the peak learning rate for the most "
    "affected layer",
  )


def not_head(head: Any, *, name: str) -> Callable[[Any], Any] | None:
  """The mask of the parameters that are not ``head`` (None when there is no head)."""
  if head is None:
    return None
  selects_head = _masks.mask_callable(head, name=name)
  return lambda tree: jax.tree.map(lambda is_head: not is_head, selects_head(tree))


def _lora_patterns(lora: Any, *, name: str) -> tuple[str, ...] | None:
  if lora is None:
    return None
  pats = _paths.patterns(lora, name=f"{name}: lora")
  if not pats:
    raise ValueError(f"{name}: lora must name at least one pattern (or be None), got {lora!r}.")
  return tuple(p.text for p in pats)


def _full_shapes(full_params: Any, head: Any, *, name: str) -> Any:
  """``((path, shape), ...)`` of ``full_params`` without the head (the depths' source)."""
  if full_params is None:
    return None
  tree = full_params if head is None else _depths.without(full_params, head, name=f"{name}: head")
  shapes = _lora.shapes(tree)
  if not shapes:
    raise ValueError(f"{name}: full_params holds no parameter.")
  return shapes


def _rolled_back(head: Any, lora: tuple[str, ...] | None, *, name: str) -> Any:
  """The mask of the leaves the rollback covers: not the head, not a LoRA A factor."""
  if lora is None:
    return not_head(head, name=f"{name}: head")
  pats = _paths.patterns(lora, name=f"{name}: lora")
  selects_head = None if head is None else _masks.mask_callable(head, name=f"{name}: head")

  def mask(tree: Any) -> Any:
    _, is_a = _lora.adapter_flags(pats, tree, name=f"{name}: lora")
    if selects_head is None:
      return jax.tree.map(lambda a: not a, is_a)
    return jax.tree.map(lambda a, h: not (a or h), is_a, selects_head(tree))

  return mask


def dualopt(
  learning_rate: optax.ScalarOrSchedule,
  *,
  mode: Literal["finetune", "scratch"] = "finetune",
  rollback: float | None = None,
  rollback_floor: float | None = None,
  weight_decay: float | None = None,
  power: float = 1.0,
  granularity: Literal["block", "tensor"] = "block",
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
  head: Any = None,
  optimizer: Literal["adam", "sgd"] = "adam",
  b1: float | None = None,
  b2: float | None = None,
  eps: float | None = None,
  momentum: float | None = None,
  anchor_dtype: Any = None,
  peak_learning_rate: float | None = None,
  decay_profile: Literal["shallow", "deep", "flat"] | None = None,
  decay_follows_lr: bool | None = None,
  lora: str | Sequence[str] | None = None,
  full_params: Any = None,
) -> optax.GradientTransformation:
  r"""DualOpt: Adam (or SGD) with paradigm-aware per-layer rollback or decay.

  With :math:`\hat\theta_t = \theta_{t-1} - \eta_t \hat a_t` the weights after
  the plain optimizer step (:math:`\hat a` the Adam direction, or the momentum
  buffer for ``optimizer="sgd"``) and :math:`d_i \in [0, 1]` the depth of
  layer :math:`i`:

  * ``mode="finetune"`` (OLOR weight rollback toward the pre-trained weights
    :math:`\theta_0`, captured at ``init``):

    .. math::
      \theta_t = \hat\theta_t - \lambda_{i,t}(\hat\theta_t - \theta_0), \quad
      \lambda_{i,t} = \rho\,\frac{\eta_t}{\eta_{peak}}\,(f + (1 - d_i)^{p}(1 - f))

    with :math:`\rho` = ``rollback`` and :math:`f` = ``rollback_floor``: the
    shallowest layer is pulled back the fraction :math:`\rho` per step at the
    peak learning rate, the deepest :math:`f\rho` (:math:`f` = 0.25 by
    default; OLOR's reference code uses 0).
    ``head`` parameters get the plain optimizer step.
  * ``mode="scratch"`` (real-time layer-wise decay, anchor 0):

    .. math::
      \theta_t = (1 - \lambda_{i,t})\,\hat\theta_t, \quad
      \lambda_{i,t} = \omega\,c_t\,s_i

    with :math:`\omega` = ``weight_decay``, :math:`c_t = \eta_t/\eta_{peak}` if
    ``decay_follows_lr`` else 1, and :math:`s_i = (1 - d_i)^p` (``"shallow"``),
    :math:`d_i^p` (``"deep"``) or 1 (``"flat"``).
  * ``lora=`` (fine-tune mode; LoRA, :math:`W = W_0 + A B` with :math:`W_0`
    frozen and only the factors trained): with :math:`\hat A_t, \hat B_t` the
    factors after the plain step, the selected ``B`` factors are rolled back
    toward 0, :math:`B_t = (1 - \lambda_{i,t})\hat B_t`, and their ``A``
    factors keep the plain step, :math:`A_t = \hat A_t`. Then

    .. math::
      W_t - W_0 = A_t B_t = (1 - \lambda_{i,t})\,\hat A_t \hat B_t
      = (1 - \lambda_{i,t})(\hat W_t - W_0),

    exactly the rollback of the merged weight :math:`\hat W_t = W_0 + \hat A_t
    \hat B_t` toward :math:`W_0`, with no anchor stored for the adapters (the
    anchor of :math:`A B` is 0), and :math:`\lambda_{i,t}` the one the base
    weight would get: an adapter takes its base weight's depth in the
    full-weight tree (``full_params`` with the adapters left out). Every
    other leaf the optimizer sees (a fully trained norm, say) keeps the
    rollback toward its stored anchor; the head gets the plain step.

  Args:
    learning_rate: scalar or Optax schedule.
    mode: ``"finetune"`` or ``"scratch"``.
    rollback: fine-tune mode's per-step fraction at the peak learning rate for
      the shallowest layer (default 0.01, as the reference pipeline). Each
      mode's own arguments raise when given in the other mode.
    rollback_floor: the deepest backbone layer's rollback as a fraction of
      ``rollback`` (OLOR's κ_min/κ_max). Default 0.25, chosen on the evidence
      curves: with OLOR's 0 the deepest backbone layer is never pulled back,
      and on a backbone whose last layers hold most weights forgetting stays
      near Adam's (BUILD_NOTES.md, "Fine-tune defaults"). Pass 0.0 for the
      reference behaviour.
    weight_decay: scratch mode's per-step fraction at the peak learning rate
      for the most decayed layer. The default 3e-3 was chosen by measurement
      (about half a typical Adam peak lr; scale it with your lr).
    power: exponent of the depth profile (1 linear, 2 quadratic), >= 0.
    granularity: ``"block"`` (one depth per block, parsed from paths) or
      ``"tensor"`` (one per tensor in definition order, as OLOR's code does).
    order: the model's forward order, from :func:`~dualopt_jax.forward_order`,
      or glob patterns input to output, for models whose names do not say
      the order (see ``layer_depths``).
    stacked: glob patterns of stacked-layer subtrees (see ``layer_depths``).
    head: the newly initialised parameters (glob patterns such as
      ``"head"``, a pytree of bools or a callable ``params -> bools``): no
      rollback or decay, and not counted in the depth profile.
    optimizer: ``"adam"`` or ``"sgd"`` (heavy-ball momentum, the 2023 OLOR SGD
      form).
    b1: Adam's decay rate of the first moment (default 0.9; Adam only).
    b2: Adam's decay rate of the second moment (default 0.999; Adam only).
    eps: Adam's term added to the denominator (default 1e-8; Adam only).
    momentum: SGD's momentum (default 0.9; SGD only).
    anchor_dtype: store the anchor at this float dtype (e.g. ``jnp.bfloat16``;
      fine-tune mode only).
    peak_learning_rate: the peak of a learning-rate schedule, to scale the
      rollback/decay with it; needed when ``learning_rate`` is a schedule, and
      under ``optax.inject_hyperparams`` when the rollback should follow an
      injected learning rate.
    decay_profile: scratch mode's direction, ``"shallow"`` (default),
      ``"deep"`` or ``"flat"``.
    decay_follows_lr: scratch mode: whether the decay follows the lr schedule
      (default True).
    lora: fine-tune mode: glob patterns selecting the LoRA ``B`` factors
      (``"**/lora_b"`` for ``nnx.LoRA``/``nnx.LoRALinear``, ``"**/*_lora_b"``
      for Qwix's ``<weight>_lora_b``): rolled back toward 0 (no anchor
      stored), their ``A`` factors (the sibling named ``...a`` instead of
      ``...b``) get the plain step. Each pattern must match; a selected leaf
      whose name does not end in ``b`` raises. See the math above.
    full_params: the full-weight tree the depths come from (e.g.
      ``nnx.state(model, nnx.Param)``, base weights and adapters; arrays or
      ``jax.ShapeDtypeStruct`` s; only paths and shapes are read). Needed when
      the optimizer sees only part of the model (``nnx.Optimizer(...,
      wrt=nnx.LoRAParam)``), so that every leaf gets the depth it has in the
      whole model; with ``lora``, an adapter gets its base weight's depth
      (``x/lora/lora_b`` -> ``x/kernel``; ``x/kernel_lora_b`` -> ``x/kernel``).
      ``None``: the depths come from the tree given to ``init``. ``head``
      is left out of it too; a ``head`` pattern must still match a leaf the
      optimizer sees (a frozen head is no head: leave ``head`` out).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))}, 'head': {'kernel': jnp.ones((2, 1))}}
    >>> tx = dj.dualopt(1e-3, rollback=0.01, head='head')
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

    LoRA on an NNX model, the optimizer seeing only the adapters:

    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.embed = nnx.Embed(8, 4, rngs=rngs)
    ...     self.layers = nnx.List(
    ...       [nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs) for _ in range(2)])
    ...     self.head = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     h = self.embed(x)
    ...     for layer in self.layers:
    ...       h = layer(h)
    ...     return self.head(h)
    >>> model = Net(nnx.Rngs(0))
    >>> tx = dj.dualopt(1e-3, lora='**/lora_b', full_params=nnx.state(model, nnx.Param))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    >>> loss = lambda m: jnp.mean(m(jnp.array([1, 2])) ** 2)
    >>> grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    >>> _ = optimizer.update(model, grads)
    >>> print(dj.describe(nnx.state(model, nnx.LoRAParam), optimizer.opt_state))
    path                  shape  depth   multiplier  rollback/step
    --------------------  -----  ------  ----------  -------------
    layers/0/lora/lora_b  2x4    0.3333  0.75        0.0075
    layers/1/lora/lora_b  2x4    0.6667  0.5         0.005
    layers/0/lora/lora_a  4x2    -       -           -
    layers/1/lora/lora_a  4x2    -       -           -

  References:
    Ning, Li et al., "DualOpt: decoupled optimization for scratch and
    fine-tuning", 2026; Huang, Li et al., "One Step Learning, One Step Review"
    (OLOR), AAAI 2024.
  """
  _check_choice("mode", mode, MODES)
  _check_choice("granularity", granularity, ("block", "tensor"))
  if mode == "scratch" and lora is not None:
    raise ValueError(
      "dualopt: lora is read only with mode='finetune' (it rolls the merged weights W0 + B A "
      "back toward the frozen W0); scratch mode has no pre-trained weights. Remove it, or "
      "change the mode."
    )
  lora_t = _lora_patterns(lora, name="dualopt")
  full = _full_shapes(full_params, head, name="dualopt")
  own = _own_settings("mode", mode, _MODE_DEFAULTS, {
    "rollback": rollback, "rollback_floor": rollback_floor, "weight_decay": weight_decay,
    "decay_profile": decay_profile, "decay_follows_lr": decay_follows_lr,
  }, name="dualopt")
  if mode == "scratch" and anchor_dtype is not None:
    raise ValueError("dualopt: anchor_dtype is read only with mode='finetune' (scratch mode "
                     "keeps no anchor). Remove it, or change the mode.")
  _hyperparams.check_at_least(power, 0.0, name="dualopt: power")
  if peak_learning_rate is not None:
    _hyperparams.check_at_least(peak_learning_rate, 0.0, name="dualopt: peak_learning_rate",
                                strict=True)
  _hyperparams.check_at_least(learning_rate, 0.0, name="dualopt: learning_rate")
  base = _base_optimizer(optimizer, learning_rate, name="dualopt", b1=b1, b2=b2, eps=eps,
                         momentum=momentum)
  order_t, stacked_t = as_tuple(order), as_tuple(stacked)
  mask = _rolled_back(head, lora_t, name="dualopt")
  if mode == "finetune":
    rollback, rollback_floor = own["rollback"], own["rollback_floor"]
    _check_fraction("rollback", rollback)
    _check_fraction("rollback_floor", rollback_floor)
    profile = LayerProfile(
      1.0, rollback_floor, power, granularity, order_t, stacked_t, lora=lora_t, full=full
    )
    rate = _following_lr(rollback, learning_rate, peak_learning_rate, name="rollback")
    pull = rollback_to(
      rate=rate, layer_scale=profile, mask=mask, anchor_dtype=anchor_dtype, decay_to_zero=lora_t
    )
  else:
    weight_decay, decay_profile = own["weight_decay"], own["decay_profile"]
    decay_follows_lr = own["decay_follows_lr"]
    _check_fraction("weight_decay", weight_decay)
    _check_choice("decay_profile", decay_profile, DECAY_PROFILES)
    end = 1.0 if decay_profile == "flat" else 0.0
    flip = decay_profile == "deep"
    profile = LayerProfile(1.0, end, power, granularity, order_t, stacked_t, flip, full=full)
    rate = (
      _following_lr(weight_decay, learning_rate, peak_learning_rate, name="weight_decay")
      if decay_follows_lr
      else weight_decay
    )
    # `own` fills weight_decay from the scratch defaults, so it is never None here.
    pull = layerwise_decay(rate=rate, layer_scale=profile, mask=mask)  # pyright: ignore[reportArgumentType]
  return optax.chain(base, pull)


def olor(
  learning_rate: optax.ScalarOrSchedule,
  *,
  back_level_max: float = 1.0,
  back_level_min: float = 0.0,
  back_pow: float = 2.0,
  b1: float | None = None,
  b2: float | None = None,
  eps: float | None = None,
  optimizer: Literal["adam", "sgd"] = "adam",
  momentum: float | None = None,
  head: Any = None,
  order: Any = None,
  stacked: str | Sequence[str] | None = None,
  anchor_dtype: Any = None,
  lora: str | Sequence[str] | None = None,
  full_params: Any = None,
) -> optax.GradientTransformation:
  r"""OLOR with the authors' AdamB constructor semantics.

  .. math::
    \hat\theta_t = \theta_{t-1} - \eta_t \hat a_t, \quad
    \theta_t = \hat\theta_t - \eta_t\kappa_i(\hat\theta_t - \theta_0), \quad
    \kappa_i = \kappa_{min} + (1 - i/N)^{\gamma}(\kappa_{max} - \kappa_{min})

  with one index :math:`i = 0..N` per parameter tensor in forward order
  (kernel before bias; one index per slice of a stacked tensor),
  :math:`\theta_0` the params at ``init``. Where the names do not fix the
  order of the tensors (most transformer blocks: the norm, attention and MLP
  inside a block), pass ``order=dj.forward_order(...)``; the error says so.
  The rollback is multiplied by the learning rate itself, so ``back_level_max``
  is not a fraction: the reference pipeline uses ``0.01 / peak_lr`` with
  ``back_pow=1``; the class defaults (1.0, 2.0) are 100x weaker at lr 1e-4.
  ``optimizer="sgd"`` is the 2023 form: heavy-ball momentum
  :math:`m \leftarrow 0.9m + g`, :math:`\hat\theta = \theta - \eta m`, same rollback.

  Unlike the reference code, :math:`1 - i/N` is clamped at 0 (no negative or
  complex :math:`\kappa` on the last tensor) and :math:`N = 0` is allowed.

  Args:
    learning_rate: scalar or Optax schedule :math:`\eta_t`.
    back_level_max: :math:`\kappa_{max}`, for the first tensor.
    back_level_min: :math:`\kappa_{min}`, for the last tensor.
    back_pow: :math:`\gamma`.
    b1: Adam's first-moment decay (default 0.9; Adam only).
    b2: Adam's second-moment decay (default 0.999; Adam only).
    eps: Adam's denominator term (default 1e-8; Adam only).
    optimizer: ``"adam"`` (AdamB) or ``"sgd"``.
    momentum: SGD's momentum (default 0.9; SGD only).
    head: parameters excluded from the rollback (plain optimizer step).
    order: the model's forward order (:func:`~dualopt_jax.forward_order`) or
      glob patterns, input to output (see ``layer_depths``).
    stacked: glob patterns of stacked-layer subtrees.
    anchor_dtype: store the anchor at this dtype.
    lora: glob patterns selecting LoRA ``B`` factors, rolled back toward 0
      (no anchor), their ``A`` factors plain (see :func:`dualopt`).
    full_params: the full-weight tree the tensor indices come from (see
      :func:`dualopt`); an adapter takes its base weight's index.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> tx = dj.olor(1e-4, back_level_max=0.01 / 1e-4, back_pow=1.0)
    >>> state = tx.init({'w': jnp.ones(3), 'b': jnp.zeros(1)})

  References:
    Huang, Li et al., "One Step Learning, One Step Review", AAAI 2024.
  """
  _hyperparams.check_at_least(back_level_max, 0.0, name="olor: back_level_max")
  _hyperparams.check_at_least(back_level_min, 0.0, name="olor: back_level_min")
  _hyperparams.check_at_least(back_pow, 0.0, name="olor: back_pow")
  _hyperparams.check_at_least(learning_rate, 0.0, name="olor: learning_rate")
  base = _base_optimizer(optimizer, learning_rate, name="olor", b1=b1, b2=b2, eps=eps,
                         momentum=momentum)
  lora_t = _lora_patterns(lora, name="olor")
  profile = LayerProfile(
    back_level_max, back_level_min, back_pow, "tensor", as_tuple(order), as_tuple(stacked),
    lora=lora_t, full=_full_shapes(full_params, head, name="olor"),
  )
  pull = rollback_to(
    rate=learning_rate, layer_scale=profile, mask=_rolled_back(head, lora_t, name="olor"),
    anchor_dtype=anchor_dtype, decay_to_zero=lora_t,
  )
  return optax.chain(base, pull)
