"""Hyper-parameter values: scalars and schedules, and the checks the factories run on them.

One rule for callables, as in Optax: a callable hyper-parameter (``rate``,
``strength``, ``radius``, ``decay``, ...) is a schedule of the step count.
Per-leaf values are never callables of a path; they are pytrees (or
``params -> pytree`` functions, see ``_per_leaf``).
"""

from __future__ import annotations

from typing import Any, cast

import chex
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = optax.ScalarOrSchedule


def increment(count: chex.Array) -> jax.Array:
  """``optax.safe_increment(count)``, typed as the array it is (Optax annotates ``ArrayLike``)."""
  return cast(jax.Array, optax.safe_increment(count))


def concrete(x: Any) -> np.ndarray | None:
  """The value of ``x`` as float64 if it is known now (not traced), else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError, jax.errors.TracerArrayConversionError):
    return None


def value_at(spec: ScalarOrSchedule, count: chex.Array, *, name: str = "hyper-parameter") -> Any:
  """``spec(count)`` for a schedule, else ``spec``.

  A callable that cannot be called with the step count alone is refused with
  the rule for callables, naming the argument.
  """
  if not callable(spec):
    return spec
  try:
    return spec(count)
  except TypeError as e:
    raise ValueError(
      f"{name}: a callable is an Optax schedule `count -> value` (one argument); give "
      f"per-leaf values as a pytree over the params or a LayerProfile. Calling it failed: {e}"
    ) from e


def fraction_at(spec: ScalarOrSchedule, count: chex.Array, *, name: str) -> Any:
  """``value_at`` of a per-step fraction; a schedule's (or an array's) value is clipped to [0, 1].

  A Python number is checked at construction instead (``check_in_range``):
  only values that cannot be known ahead are clipped, since a fraction
  outside [0, 1] overshoots the anchor or pushes away from it.
  """
  value = value_at(spec, count, name=name)
  if isinstance(spec, (int, float)):
    return value
  return jnp.clip(value, 0.0, 1.0)


def state_value(spec: ScalarOrSchedule, count: chex.Array, *, name: str) -> chex.Array:
  """``value_at`` as the float32 scalar a state keeps (what the next update applies)."""
  return jnp.asarray(value_at(spec, count, name=name), jnp.float32)


def _known(value: Any, name: str) -> np.ndarray | None:
  """The value of a non-schedule hyper-parameter if it is known now; refuses non-numbers and NaN."""
  if callable(value):
    return None
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{name} must be a number or a schedule, got the string {value!r}.")
  v = concrete(value)
  if v is not None and not np.all(np.isfinite(v)):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")
  return v


def check_at_least(value: Any, low: float, *, name: str, strict: bool = False) -> None:
  """Raises when a known (non-schedule) ``value`` is below ``low`` (or at it, if ``strict``)."""
  v = _known(value, name)
  if v is not None and (np.any(v <= low) if strict else np.any(v < low)):
    raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value!r}.")


def check_in_range(value: Any, low: float, high: float, *, name: str, low_open: bool = False,
                   why: str = "") -> None:
  """Raises when a known ``value`` leaves ``[low, high]`` (``(low, high]`` if ``low_open``)."""
  v = _known(value, name)
  if v is None:
    return
  below = np.any(v <= low) if low_open else np.any(v < low)
  if below or np.any(v > high):
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"{name} must lie in {interval}{why}, got {value!r}.")


def check_fraction_range(rate: Any, layer_scale: Any, *, name: str) -> None:
  """Raises when ``rate * layer_scale`` is known now and leaves [0, 1]."""
  check_in_range(
    rate, 0.0, 1.0, name=f"{name}: rate", why=" (it is the fraction of the way back per step)"
  )
  if callable(rate) or callable(layer_scale) or not is_scalar_like(layer_scale):
    return
  rate_value, scale_value = concrete(rate), _known(layer_scale, f"{name}: layer_scale")
  if rate_value is None or scale_value is None:
    return
  lam = rate_value * scale_value
  if np.any(scale_value < 0) or np.any(lam > 1):
    raise ValueError(
      f"{name}: rate * layer_scale = {float(np.max(lam)):g} leaves [0, 1]; "
      f"layer_scale must be >= 0 and rate * layer_scale <= 1."
    )


def is_scalar_like(x: Any) -> bool:
  """A number or an array (the same value for every leaf), as opposed to a pytree."""
  return isinstance(x, (int, float, np.number, np.ndarray, jax.Array))
