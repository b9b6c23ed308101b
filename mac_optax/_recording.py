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

import flax.linen as nn
from flax import nnx

from mac_optax import _capture
from mac_optax import _nnx
from mac_optax import _rules
from mac_optax import _stats
from mac_optax import _tracking

_ORIGINAL_APPLY = _capture.ORIGINAL_APPLY
_ACTIVE: list['Recording'] = []


@dataclasses.dataclass
class Recording:
  """The statistics recorded so far in a :func:`recording` block."""

  options: dict[str, Any]
  recorder: _tracking.Recorder | None = None
  parts: list[Any] = dataclasses.field(default_factory=list)
  applies: int = 0
  depth: int = 0

  @property
  def stats(self) -> Any:
    """The ``mac_stats`` of every model call in the block, merged.

    Read them inside the traced function (e.g. return them as ``aux`` of the
    loss): they are traced values of that function.
    """
    if not self.parts:
      raise ValueError(
          'mac_optax.recording() recorded no statistics: '
          + ('no Module.apply was called inside the `with` block.'
             if not self.applies else
             f'{self.applies} Module.apply call(s) ran no layer that MAC'
             ' knows (see mac_optax.register_layer).')
      )
    return _merge_disjoint(self.parts)


def _merge_disjoint(trees: list[Any]) -> Any:
  """Merges trees; a layer seen in several (a model called twice) merges."""
  flat: dict[tuple, list] = {}
  for tree in trees:
    _stats.map_layers(
        lambda path, node: flat.setdefault(path, []).append(node), tree)
  return _stats.nest({path: _stats.merge_layer(nodes)
                        for path, nodes in flat.items()})


def _recording_apply(self, variables, *args, mutable=False, **kwargs):
  """``nn.Module.apply`` while a recording is active: capture, then record."""
  record = _ACTIVE[-1]
  capture = _capture.Capture(
      functools.partial(_ORIGINAL_APPLY, self), **record.options)
  record.depth += 1
  try:
    result, stats = capture.apply_with_recorder(
        record.recorder, variables, *args, mutable=mutable, **kwargs)
  finally:
    record.depth -= 1
  record.applies += 1
  if stats:
    record.parts.append(stats)
  return result


class _Guard:
  """Refuses layer calls that bypass ``apply`` (bound modules) while active."""

  def __init__(self, record: Recording):
    self.record = record

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (self.record.depth == 0 and context.method_name == '__call__'
        and not module.is_initializing()
        and (_rules.rule_of(module) is not None
             or _rules.attention_rule_of(module) is not None)):
      raise ValueError(
          f'layer {_stats.path_str(tuple(module.path))}'
          f' ({type(module).__name__}) was called outside Module.apply inside'
          ' mac_optax.recording() (a bound module?), so its statistics cannot'
          ' be recorded: use mac_optax.capture(model.apply) there.'
      )
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def recording(
    *,
    attention_aware: bool = True,
    value_stat: str = 'reference',
    depthwise_shared: bool = True,
) -> Iterator[Recording]:
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

  While active, ``flax.linen.Module.apply`` is replaced process-wide: do not
  trace in several Python threads at once.

  Args:
    attention_aware: as for :func:`~mac_optax.capture`.
    value_stat: as for :func:`~mac_optax.capture`.
    depthwise_shared: as for :func:`~mac_optax.capture`.

  Yields:
    A :class:`Recording`; read its ``stats`` at the end of the block.

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
  options = dict(attention_aware=attention_aware, value_stat=value_stat,
                 depthwise_shared=depthwise_shared)
  with _recording(options, None) as record:
    yield record


@contextlib.contextmanager
def _recording(options, recorder) -> Iterator[Recording]:
  if options['value_stat'] not in _tracking.VALUE_STATS:
    raise ValueError(
        f'value_stat must be one of {_tracking.VALUE_STATS}, got'
        f' {options["value_stat"]!r}.'
    )
  record = Recording(options, recorder)
  _ACTIVE.append(record)
  nn.Module.apply = functools.wraps(_ORIGINAL_APPLY)(_recording_apply)
  try:
    with _nnx.refusing(), nn.intercept_methods(_Guard(record)):
      yield record
  finally:
    _ACTIVE.pop()
    if not _ACTIVE:
      nn.Module.apply = _ORIGINAL_APPLY


def with_stats(
    loss_fn: Callable[..., Any] | None = None,
    *,
    has_aux: bool = False,
    attention_aware: bool = True,
    value_stat: str = 'reference',
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
  options = dict(attention_aware=attention_aware, value_stat=value_stat,
                 depthwise_shared=depthwise_shared)
  if loss_fn is None:
    return functools.partial(with_stats, has_aux=has_aux, **options)
  decorated = WithStats(loss_fn, has_aux, options)

  # A plain function (not a callable object), as JAX and NNX transforms
  # expect; find_layers reaches the recorder-taking form through it.
  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    return decorated.run(None, *args, **kwargs)

  wrapped.mac_optax_with_stats = decorated
  return wrapped


@dataclasses.dataclass(frozen=True)
class WithStats:
  """A loss function that also returns MAC's statistics; see ``with_stats``."""

  loss_fn: Callable[..., Any]
  has_aux: bool
  options: dict[str, Any]

  def run(self, recorder, *args, **kwargs):
    """Calls the loss function; ``recorder`` (or None) collects layer facts."""
    models = []
    for arg in args:
      if isinstance(arg, nnx.Module) and all(arg is not m for m in models):
        models.append(arg)
    call = lambda: self.loss_fn(*args, **kwargs)
    nnx_parts = []
    for model in models:
      call = _nnx_capturing(model, call, self.options, nnx_parts, recorder)
    with _recording(self.options, recorder) as record:
      result = call()
      parts = record.parts + nnx_parts
    if not parts:
      raise ValueError(
          f'{getattr(self.loss_fn, "__name__", "the loss function")} called'
          ' no model whose statistics MAC can record: pass NNX models as'
          ' positional arguments, and call linen models through'
          ' Module.apply.'
      )
    stats = _merge_disjoint(parts)
    if self.has_aux:
      loss, aux = result
      return loss, (aux, stats)
    return result, stats


def _nnx_capturing(model, call, options, parts, recorder):
  """``call`` wrapped to capture ``model``'s statistics into ``parts``."""

  def run():
    outputs, stats = _nnx.capture_call(model, call, _rules.Options(**options),
                                       recorder)
    if stats:
      parts.append(stats)
    return outputs

  return run
