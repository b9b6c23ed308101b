"""MAC's hyperparameters: checked when concrete, guarded when injected.

``optax.inject_hyperparams`` makes them traced arrays, which cannot be checked
at construction; a bad injected value is then clamped to the nearest sound
one instead of turning every update into NaN.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

# An injected damping below this (or NaN) acts as this.
MIN_DAMPING = 1e-20
# The largest float32 below 1: an injected stat_decay is clamped to it.
_MAX_DECAY = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def is_concrete_number(value) -> bool:
  return isinstance(value, numbers.Number) or (
      isinstance(value, (np.ndarray, np.generic, jax.Array))
      and not isinstance(value, jax.core.Tracer)
      and np.ndim(value) == 0
  )


def validate(damping, stat_decay, t_cov, t_inv) -> None:
  """Checks concrete hyperparameters (injected, traced ones cannot be)."""
  if is_concrete_number(damping) and not float(damping) > 0:
    raise ValueError(f'damping must be > 0, got {damping}.')
  if is_concrete_number(stat_decay) and not 0 <= float(stat_decay) < 1:
    raise ValueError(f'stat_decay must be in [0, 1), got {stat_decay}.')
  for name, period in (('t_cov', t_cov), ('t_inv', t_inv)):
    if is_concrete_number(period) and (
        int(period) != period or int(period) < 1
    ):
      raise ValueError(f'{name} must be a positive integer, got {period}.')


def check_scalar(name: str, value) -> None:
  """Hyperparameters are single numbers (one damping for every layer)."""
  shape = jnp.shape(value)
  if shape:
    raise ValueError(
        f'{name} must be a scalar, got an array of shape {shape}: MAC uses'
        ' one value for every layer.'
    )


def guarded_decay(stat_decay) -> jax.Array:
  """``stat_decay`` as float32, clamped into ``[0, 1)`` when traced.

  An injected (traced) value cannot be checked; 1.0 would stop the EMA and
  make the bias correction divide by zero. NaN counts as 0 (no memory).
  """
  decay = jnp.asarray(stat_decay, jnp.float32)
  if is_concrete_number(stat_decay):
    return decay  # checked at construction
  return jnp.where(decay >= 0.0, jnp.minimum(decay, _MAX_DECAY), 0.0)


def guarded_damping(damping) -> jax.Array:
  """``damping`` as float32, at least ``MIN_DAMPING`` when traced.

  With 0 the ``'exact'`` scale divides by zero and a zero statistic gives
  0 / 0; NaN counts as the floor too.
  """
  value = jnp.asarray(damping, jnp.float32)
  if is_concrete_number(damping):
    return value  # checked at construction
  return jnp.where(value >= MIN_DAMPING, value, MIN_DAMPING)


def guarded_period(period):
  """An injected ``t_cov``/``t_inv`` below 1 acts as 1 (no modulo by 0)."""
  if is_concrete_number(period):
    return period  # checked at construction
  return jnp.maximum(period, 1)


def check_full_precision(name: str, value) -> None:
  """Rejects float16/bfloat16 hyperparameters, e.g. from inject_hyperparams."""
  dtype = getattr(value, 'dtype', None)
  if (
      dtype is not None
      and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32
  ):
    raise ValueError(
        f'{name} is a {jnp.dtype(dtype).name} value: MAC keeps its statistics'
        ' arithmetic in float32, and a rounded stat_decay or damping changes'
        ' the algorithm (bfloat16 rounds a stat_decay of 0.999 to 1.0).'
        ' optax.inject_hyperparams casts float hyperparameters to the'
        ' parameters\' dtype; pass hyperparam_dtype=jnp.float32 to it.'
    )


def check(damping, stat_decay, t_cov, t_inv) -> None:
  """All construction-time checks of MAC's four hyperparameters."""
  # Before the range checks: a rounded value may be out of range (1.0).
  check_full_precision('damping', damping)
  check_full_precision('stat_decay', stat_decay)
  for name, value in (('damping', damping), ('stat_decay', stat_decay),
                      ('t_cov', t_cov), ('t_inv', t_inv)):
    check_scalar(name, value)
  validate(damping, stat_decay, t_cov, t_inv)
