"""Capture where you cannot wrap ``apply``: inside someone else's code.

Training loops often call ``model.apply`` deep inside code the user does not
own (big_vision's ``train.py``, an AlgoPerf workload's ``model_fn``, trainer
libraries), but the loss function is theirs. :func:`recording` (linen) and
:func:`with_stats` (linen and NNX) capture every model call made while they are
active, exactly as :func:`~mac_optax.capture` would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

from mac_optax._capture import common
from mac_optax._capture import linen
from mac_optax._capture import nnx as nnx_lib
from mac_optax._capture import rules
from mac_optax._capture import tracking

# The attribute of a with_stats function that holds its WithStats, through
# which find_layers traces it.
WITH_STATS_ATTRIBUTE = 'mac_optax_with_stats'


@contextlib.contextmanager
def recording(
    *,
    attention_aware: bool = True,
    value_stat: rules.ValueStat = 'reference',
    depthwise_shared: bool = True,
) -> Iterator[linen.Recording]:
  """Records MAC's statistics of every linen ``apply`` inside the block.

  Enter it inside the traced loss function, around code that calls
  ``model.apply`` somewhere (yours or not), and return ``recording.stats``
  from the loss function. Each ``apply`` call inside runs as
  :func:`~mac_optax.capture` would run it, and returns exactly what the
  plain ``apply`` returns. Statistics of several calls merge (a model called
  on two views gives one statistic over both); calls of different models
  must not share layer paths.

  NNX models called inside the block raise: decorate the loss function with
  :func:`with_stats` for them.

  Each thread records its own calls: while any block is active,
  ``flax.linen.Module.apply`` is a dispatcher that hands the calls of a
  recording thread to its block and those of other threads to the original,
  which is restored when the last block ends. ``model.apply`` must be looked
  up inside the block (a bound method kept from before bypasses it and
  raises), and not run inside a JAX transformation entered within the block
  (its statistics could not leave it; it raises).

  Args:
    attention_aware: as for :func:`~mac_optax.capture`.
    value_stat: as for :func:`~mac_optax.capture`.
    depthwise_shared: as for :func:`~mac_optax.capture`.

  Yields:
    A ``Recording``; read its ``stats`` at the end of the block.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> def model_fn(params, x):  # someone else's code
    ...   return model.apply({'params': params}, x)
    >>> def loss_fn(params):
    ...   with mac_optax.recording() as record:
    ...     loss = jnp.mean(model_fn(params, x) ** 2)
    ...   return loss, record.stats
    >>> (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    >>> stats['mean_input']
    Array([1., 1., 1., 1.], dtype=float32)
  """
  options = rules.Options(attention_aware, value_stat, depthwise_shared)
  with linen.recording_applies(options) as block:
    yield block


def with_stats(
    loss_fn: Callable[..., Any] | None = None,
    *,
    has_aux: bool = False,
    attention_aware: bool = True,
    value_stat: rules.ValueStat = 'reference',
    depthwise_shared: bool = True,
):
  """Decorates a loss function to also return MAC's statistics.

  Every linen ``apply`` and every call of an NNX model passed as a positional
  argument, made while the function runs, is captured as by
  :func:`~mac_optax.capture`; NNX transforms inside the model (``nnx.scan``,
  ``nnx.remat``) are fine. The decorated function returns ``(out, stats)``,
  or with ``has_aux=True`` turns ``(loss, aux)`` into ``(loss, (aux,
  stats))``, ready for ``jax.value_and_grad(..., has_aux=True)``.

  Args:
    loss_fn: the function to decorate (or omit it to get a decorator).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    attention_aware: as for :func:`~mac_optax.capture`.
    value_stat: as for :func:`~mac_optax.capture`.
    depthwise_shared: as for :func:`~mac_optax.capture`.

  Returns:
    The decorated function.

  Examples:
    >>> import jax, jax.numpy as jnp, mac_optax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((4, 3))
    >>> @mac_optax.with_stats
    ... def loss_fn(model, x):
    ...   return jnp.mean(model(x) ** 2)
    >>> loss, stats = loss_fn(model, x)
    >>> stats['mean_input']
    Array([1., 1., 1., 1.], dtype=float32)
  """
  if loss_fn is None:
    return functools.partial(
        with_stats, has_aux=has_aux, attention_aware=attention_aware,
        value_stat=value_stat, depthwise_shared=depthwise_shared)
  options = rules.Options(attention_aware, value_stat, depthwise_shared)
  decorated = WithStats(loss_fn, has_aux, options)

  # A plain function (not a callable object), as JAX and NNX transforms
  # expect; find_layers reaches the survey-taking form through it.
  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    return decorated.run(None, *args, **kwargs)

  setattr(wrapped, WITH_STATS_ATTRIBUTE, decorated)
  return wrapped


@dataclasses.dataclass(frozen=True)
class WithStats:
  """A loss function that also returns MAC's statistics; see ``with_stats``."""

  loss_fn: Callable[..., Any]
  has_aux: bool
  options: rules.Options

  def run(self, survey, *args, **kwargs):
    """Calls the loss function; ``survey`` (or None) collects layer facts."""
    # Linen models are reached through Module.apply wherever they are called;
    # NNX models only as arguments: each is captured around the call.
    models = nnx_lib.models_among(args)
    call = lambda: self.loss_fn(*args, **kwargs)
    nnx_parts = []
    for model in models:
      call = _nnx_capturing(model, call, self.options, nnx_parts, survey)
    with linen.recording_applies(self.options, survey) as block:
      result = call()
      parts = block.parts + nnx_parts
    if not parts:
      raise ValueError(self._nothing_recorded(block, models))
    stats = common.merge_trees(parts)
    if self.has_aux:
      loss, aux = result
      return loss, (aux, stats)
    return result, stats

  def trace(self, survey: tracking.Survey, args, kwargs):
    """Traces one call for ``find_layers``, shapes only.

    Returns:
      ``(mac_stats shapes, the NNX models' Param state or None, the NNX
      models among args)``.
    """

    def statistics(*call_args):
      _, aux = self.run(survey, *call_args, **kwargs)
      return aux[1] if self.has_aux else aux

    return nnx_lib.eval_shape_with_models(statistics, args, survey)

  def _nothing_recorded(self, block: linen.Recording, models) -> str:
    """The error message when no statistic was recorded: what happened."""
    name = getattr(self.loss_fn, '__name__', 'the loss function')
    if not block.applies and not models:
      return (
          f'{name} called no model whose statistics MAC can record: it'
          ' called no linen Module.apply (looked up while it runs) and got no'
          ' NNX model as a positional argument.')
    told = []
    if block.applies:
      told.append(f'{name} called linen models through Module.apply: '
                  + block.describe_empty())
    if models:
      owners = [owner for model in models
                for owner in nnx_lib.kernel_owners(model)]
      told.append(
          f'{name} got {len(models)} NNX model(s), but no layer of theirs'
          ' with a rule MAC knows ran'
          + ('; modules owning a kernel: ' + common.describe_modules(
              [path for path, _ in owners], dict(owners)) if owners else ''))
    return ('; '.join(told) + '. Teach MAC the layer classes with'
            ' mac_optax.register_layer (or register_attention).')


def _nnx_capturing(model, call, options: rules.Options, parts, survey):
  """``call`` wrapped to capture ``model``'s statistics into ``parts``."""

  def run():
    outputs, stats = nnx_lib.capture_call(model, call, options, survey)
    if stats:
      parts.append(stats)
    return outputs

  return run
