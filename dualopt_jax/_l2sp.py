"""L2-SP: an L2 penalty toward the starting point (pre-trained weights), coupled or decoupled."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from dualopt_jax import _anchor, _hyperparams, _masks, _paths

ScalarOrSchedule = optax.ScalarOrSchedule


class L2SPState(NamedTuple):
  """State of :func:`add_l2sp_gradient` and :func:`decay_to_anchor`."""

  count: chex.Array  # int32 scalar: the step at which alpha/beta schedules are evaluated.
  anchor: optax.Params  # the anchor; MaskedNode for decay_to_zero leaves.


def _l2sp_term(
  alpha: ScalarOrSchedule,
  beta: ScalarOrSchedule,
  *,
  params0: optax.Params | None,
  decay_to_zero: Any,
  mask: Any,
  anchor_dtype: Any,
  name: str,
) -> optax.GradientTransformation:
  _hyperparams.check_at_least(alpha, 0.0, name=f"{name}: alpha")
  _hyperparams.check_at_least(beta, 0.0, name=f"{name}: beta")

  _anchor.check_dtype(anchor_dtype, name=name)

  def to_zero(params: Any) -> Any:
    return _masks.flags(decay_to_zero, params, name=f"{name}: decay_to_zero")

  def stored(params: Any) -> Any:
    return _paths.map_with_path(
      lambda _p, x, zero: not zero and _paths.is_float_leaf(x), params, to_zero(params)
    )

  def init_fn(params: optax.Params) -> L2SPState:
    anchor = _anchor.init(params, params0, anchor_dtype=anchor_dtype, stored=stored)
    return L2SPState(count=jnp.zeros([], jnp.int32), anchor=anchor)

  def update_fn(updates, state: L2SPState, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    _anchor.check_restored(state.anchor, params, name=name, stored=stored(params))
    a_t = _hyperparams.value_at(alpha, state.count, name=f"{name}: alpha")
    b_t = _hyperparams.value_at(beta, state.count, name=f"{name}: beta")

    def leaf(_path, u, p, a, zero):
      if not _paths.is_float_leaf(p):
        return u
      compute = jnp.promote_types(u.dtype, jnp.float32)
      pf = p.astype(compute)
      if zero:
        term = jnp.asarray(b_t, compute) * pf
      else:
        term = jnp.asarray(a_t, compute) * (pf - a.astype(compute))
      return (u.astype(compute) + term).astype(u.dtype)

    new_updates = _paths.map_with_path(leaf, updates, params, state.anchor, to_zero(params))
    return new_updates, L2SPState(_hyperparams.increment(state.count), state.anchor)

  # update_fn takes this transformation's own state; Optax's protocol types it OptState.
  return _masks.masked(optax.GradientTransformation(init_fn, update_fn), mask)  # pyright: ignore[reportArgumentType]


_ARGS_DOC = """
  Args:
    alpha: :math:`\\alpha \\ge 0`, strength toward the anchor (scalar or
      Optax schedule of the step count).
    beta: :math:`\\beta \\ge 0`, strength toward 0 for the ``decay_to_zero``
      leaves.
    params0: the anchor; ``None`` uses (a copy of) the params given to
      ``init``. Kept in the optimizer state, never in a closure.
    decay_to_zero: the leaves decayed toward 0 with ``beta`` instead of
      toward the anchor -- in L2-SP the new classifier head (pytree of bools,
      ``params -> bools`` callable, or glob patterns such as ``'head'``); they
      store no anchor.
    mask: which leaves get any penalty at all (pytree of bools, callable or
      glob patterns); others pass through unchanged and store nothing.
    anchor_dtype: store the anchor at this dtype (e.g. ``jnp.bfloat16``).
"""


def _l2sp_factory(name: str, doc: str) -> Any:
  """The public factory ``name``: both L2-SP placements share one signature."""

  def factory(
    alpha: ScalarOrSchedule,
    beta: ScalarOrSchedule = 0.0,
    *,
    params0: optax.Params | None = None,
    decay_to_zero: Any = None,
    mask: Any = None,
    anchor_dtype: Any = None,
  ) -> optax.GradientTransformation:
    return _l2sp_term(
      alpha, beta, params0=params0, decay_to_zero=decay_to_zero, mask=mask,
      anchor_dtype=anchor_dtype, name=name,
    )

  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = doc
  return factory


_ADD_GRADIENT_DOC = r"""Coupled L2-SP: adds the penalty's gradient to the raw gradient.

  Place it *before* the preconditioner (first in the chain), where it acts
  exactly like the loss term

  .. math::

    \frac{\alpha}{2}\lVert\theta_S - \theta_{0,S}\rVert^2
    + \frac{\beta}{2}\lVert\theta_{Z}\rVert^2, \qquad
    g \leftarrow g + \alpha(\theta - \theta_0) \;\; (\text{decay\_to\_zero: } g + \beta\theta),

  (:math:`S` the other leaves, :math:`Z` the ``decay_to_zero`` leaves), so under
  Adam it is divided by :math:`\sqrt{\hat v}` like the rest of the
  gradient ("coupled"). Unlike a loss term it needs no change to the model's
  loss and keeps the anchor in the optimizer state.
""" + _ARGS_DOC + r"""
  Returns:
    An ``optax.GradientTransformation`` with :class:`L2SPState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> tx = optax.chain(dj.add_l2sp_gradient(0.01, 0.01, decay_to_zero='head'),
    ...                  optax.adam(1e-4))
    >>> params = {'body': jnp.ones(3), 'head': jnp.ones(2)}
    >>> state = tx.init(params)

  References:
    Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks", ICML 2018.
"""


add_l2sp_gradient = _l2sp_factory("add_l2sp_gradient", _ADD_GRADIENT_DOC)


_DECAY_DOC = r"""Decoupled L2-SP: decay toward the anchor, as AdamW's decay toward 0.

  Adds :math:`\alpha(\theta - \theta_0)` (``decay_to_zero`` leaves: :math:`\beta\theta`)
  to the *preconditioned* update. Place it between the preconditioner and
  the learning-rate scaling, exactly where ``optax.add_decayed_weights`` goes
  in ``optax.adamw``::

    optax.chain(optax.scale_by_adam(), decay_to_anchor(alpha),
                optax.scale_by_learning_rate(lr))

  The step is then :math:`-\eta_t(\hat a + \alpha(\theta - \theta_0))`: the
  decay is multiplied by the learning rate (and follows its schedule), as in
  AdamW. The sign convention is Optax's (the update is a descent direction
  *before* ``scale_by_learning_rate`` negates it), so do not place it after
  the learning-rate scaling; for a pull applied to the post-step weights and
  not scaled by the lr use ``rollback_to``.
""" + _ARGS_DOC + r"""
  Returns:
    An ``optax.GradientTransformation`` with :class:`L2SPState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualopt_jax as dj
    >>> tx = optax.chain(optax.scale_by_adam(), dj.decay_to_anchor(0.1),
    ...                  optax.scale_by_learning_rate(1e-4))
    >>> state = tx.init({'w': jnp.ones(3)})

  References:
    Li, Grandvalet, Davoine, ICML 2018 (the penalty); Loshchilov, Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019 (the decoupling).
"""


decay_to_anchor = _l2sp_factory("decay_to_anchor", _DECAY_DOC)


def l2sp(
  learning_rate: ScalarOrSchedule,
  *,
  alpha: ScalarOrSchedule,
  beta: ScalarOrSchedule = 0.0,
  coupled: bool = True,
  params0: optax.Params | None = None,
  decay_to_zero: Any = None,
  mask: Any = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  anchor_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Adam with L2-SP, coupled (as the loss term would be) or decoupled (AdamW-style).

  ``coupled=True``: ``chain(add_l2sp_gradient(...), scale_by_adam, scale_by_learning_rate)``.
  ``coupled=False``: ``chain(scale_by_adam, decay_to_anchor(...), scale_by_learning_rate)``.

  Args:
    learning_rate: scalar or Optax schedule.
    alpha: strength toward the anchor (see :func:`add_l2sp_gradient`).
    beta: strength toward 0 of the ``decay_to_zero`` leaves.
    params0: the anchor; ``None`` copies the params given to ``init``.
    decay_to_zero: the leaves decayed toward 0 instead (see :func:`add_l2sp_gradient`).
    mask: which leaves get any penalty (see :func:`add_l2sp_gradient`).
    anchor_dtype: store the anchor at this dtype.
    coupled: where the penalty enters (see above).
    b1: as in ``optax.scale_by_adam``.
    b2: as in ``optax.scale_by_adam``.
    eps: as in ``optax.scale_by_adam``.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> import dualopt_jax as dj
    >>> tx = dj.l2sp(1e-4, alpha=0.01, beta=0.01, decay_to_zero='head', coupled=False)
    >>> state = tx.init({'body': jnp.ones(3), 'head': jnp.ones(2)})

  References:
    Li, Grandvalet, Davoine, ICML 2018.
  """
  kwargs = dict(params0=params0, decay_to_zero=decay_to_zero, mask=mask, anchor_dtype=anchor_dtype)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  lr = optax.scale_by_learning_rate(learning_rate)
  if coupled:
    return optax.chain(add_l2sp_gradient(alpha, beta, **kwargs), adam, lr)
  return optax.chain(adam, decay_to_anchor(alpha, beta, **kwargs), lr)
