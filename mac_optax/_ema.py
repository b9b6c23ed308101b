"""The EMA of each layer's mean input and its bias-corrected refresh."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
# A mean activation beyond this (in magnitude) is a numerical fault, not a
# statistic: it is skipped like a NaN one. Far beyond what a working network
# produces, it keeps the EMA and its bias correction (a division by at least
# 1 - stat_decay >= 2**-24 in float32) finite. The preconditioner itself is
# exact for any finite statistic.
MAX_STATISTIC = 1e24


class Clock(NamedTuple):
  """What step ``t`` does: ``t mod T_cov = 0`` and ``t mod T_inv = 0``."""

  capture_now: jax.Array
  refresh_now: jax.Array
  stat_count: jax.Array  # captures so far, this one included


class LayerEma(NamedTuple):
  """One layer's part of the state: EMA, refreshed ``â`` and skip count."""

  ema: jax.Array
  mean_input: jax.Array
  skipped: jax.Array


def usable(stat: jax.Array, counts: Sequence[jax.Array]) -> jax.Array:
  """Whether a layer's statistic may enter its EMA (a bool scalar).

  Not if any entry is NaN, Inf or beyond ``MAX_STATISTIC`` in magnitude (a
  numerical fault), nor if it saw no rows (an empty batch, or attention with
  every query masked, whose value statistic is all zeros).
  """
  ok = jnp.all(jnp.abs(stat) <= MAX_STATISTIC)  # False for NaN too
  for count in counts:
    ok &= jnp.all(count > 0)
  return ok


def layer_step(stat: jax.Array, counts: Sequence[jax.Array], old: LayerEma,
               clock: Clock, decay: jax.Array) -> LayerEma:
  r"""One step of a layer's EMA and, at refreshes, of its ``â``.

  On a capture step the EMA takes the statistic,
  :math:`m \leftarrow \beta m + (1 - \beta) \bar a`, unless the statistic is
  not :func:`usable`, which is counted in ``skipped`` instead. On a refresh
  step :math:`\hat a = m / (1 - \beta^{k})`, with :math:`k` the captures this
  layer's EMA took; a layer that has taken none keeps its :math:`\hat a`.

  Args:
    stat: this step's statistic, float32.
    counts: the row counts behind it (may be empty).
    old: the layer's state before the step.
    clock: the step's schedule.
    decay: :math:`\beta`, float32.

  Returns:
    The layer's state after the step.
  """
  ok = usable(stat, counts)
  ema = jnp.where(clock.capture_now & ok,
                  decay * old.ema + (1.0 - decay) * stat, old.ema)
  skipped = old.skipped + (clock.capture_now & ~ok).astype(jnp.int32)
  # Bias correction counts only the captures this layer's EMA took.
  taken = clock.stat_count - skipped
  refresh = clock.refresh_now & (taken > 0)
  correction = 1.0 - decay ** taken.astype(jnp.float32)
  mean_input = jnp.where(refresh, ema / jnp.where(refresh, correction, 1.0),
                         old.mean_input)
  return LayerEma(ema, mean_input, skipped)
