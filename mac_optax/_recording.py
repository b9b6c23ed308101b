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
from mac_optax import _geometry
from mac_optax import _nnx
from mac_optax import _rules
from mac_optax import _stats
from mac_optax import _tracking

_ORIGINAL_APPLY = _capture.ORIGINAL_APPLY


@dataclasses.dataclass
class Recording:
  """The statistics recorded so far in a :func:`recording` block."""

  options: dict[str, Any]
  recorder: _tracking.Recorder | None = None
  parts: list[Any] = dataclasses.field(default_factory=list)
  applies: int = 0
  depth: int = 0
  # The JAX trace the block was entered in: statistics made in another one
  # (an apply inside jax.jit / jax.vmap within the block) cannot leave it.
  trace: Any = None
  # Every module called in the block, by type name.
  module_types: dict[tuple, str] = dataclasses.field(default_factory=dict)
  # Layers deliberately not recorded (decoding, PassThrough rules).
  skipped: set[tuple] = dataclasses.field(default_factory=set)
  # Modules owning kernels in applies that recorded no statistic.
  kernel_owners: list[tuple] = dataclasses.field(default_factory=list)

  def describe_empty(self) -> str:
    """Why nothing was recorded, for error messages."""
    if not self.applies:
      return 'no Module.apply was called inside the block'
    message = (f'{self.applies} Module.apply call(s) ran, but no layer of'
               ' theirs has a rule MAC knows')
    if self.kernel_owners:
      message += (
          '; modules owning a kernel: '
          + _capture.describe_modules(self.kernel_owners, self.module_types))
    return message

  @property
  def stats(self) -> Any:
    """The ``mac_stats`` of every model call in the block, merged.

    Read them inside the traced function (e.g. return them as ``aux`` of the
    loss): they are traced values of that function.
    """
    if not self.parts:
      raise ValueError(
          'mac_optax.recording() recorded no statistics: '
          + self.describe_empty() + '.'
          + (' Teach MAC their layer classes with mac_optax.register_layer.'
             if self.applies else ''))
    return merge_disjoint(self.parts)


def merge_disjoint(trees: list[Any]) -> Any:
  """Merges trees; a layer seen in several (a model called twice) merges."""
  flat: dict[tuple, list] = {}
  for tree in trees:
    _stats.map_layers(
        lambda path, node: flat.setdefault(path, []).append(node), tree)
  return _stats.nest({path: _stats.merge_layer(nodes)
                        for path, nodes in flat.items()})


def _recording_apply(record: Recording, module, variables, *args, **kwargs):
  """``nn.Module.apply`` while a recording is active: capture, then record."""
  if _capture.current_trace() != record.trace:
    raise ValueError(
        f'{type(module).__name__}.apply was called inside a JAX'
        ' transformation (jax.jit, jax.vmap, jax.checkpoint, ...) that runs'
        ' inside the capture, so its statistics cannot leave that'
        ' transformation. Capture inside it instead (mac_optax.capture'
        ' around the function it transforms, returning the statistics), or'
        ' call the function untransformed. A jax.jit given to'
        ' mac_optax.capture directly is unwrapped.'
    )
  capture = _capture.Capture(
      functools.partial(_ORIGINAL_APPLY, module), **record.options)
  record.depth += 1
  try:
    result, stats, seen = capture.run(
        record.recorder, variables, *args, **kwargs)
  finally:
    record.depth -= 1
  record.applies += 1
  for path, name in seen.module_types.items():
    record.module_types.setdefault(path, name)
  record.skipped.update(seen.skipped)
  if stats:
    record.parts.append(stats)
  else:
    record.kernel_owners.extend(
        path for path in _geometry.kernel_owners(_capture.params_of(variables))
        if path not in seen.skipped)
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
          f' ({type(module).__name__}) was called outside Module.apply as'
          ' MAC sees it (a bound module, or a `model.apply` looked up before'
          ' the capture began and kept, e.g. by functools.partial or'
          ' jax.jit), so its statistics cannot be recorded: call'
          ' model.apply itself, or capture(model.apply) there.'
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
  with recording_applies(options, recorder) as record:
    yield record


@contextlib.contextmanager
def recording_applies(options, recorder) -> Iterator[Recording]:
  """Captures the ``Module.apply`` calls of this thread into a Recording."""
  record = Recording(options, recorder, trace=_capture.current_trace())
  with _capture.handling_applies(
      functools.partial(_recording_apply, record)), _nnx.refusing(), (
          nn.intercept_methods(_Guard(record))):
    yield record


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
      raise ValueError(self._nothing_recorded(record, models))
    stats = merge_disjoint(parts)
    if self.has_aux:
      loss, aux = result
      return loss, (aux, stats)
    return result, stats

  def _nothing_recorded(self, record: Recording, models) -> str:
    """The error message when no statistic was recorded: what happened."""
    name = getattr(self.loss_fn, '__name__', 'the loss function')
    if not record.applies and not models:
      return (
          f'{name} called no model whose statistics MAC can record: it'
          ' called no linen Module.apply (looked up while it runs) and got no'
          ' NNX model as a positional argument.')
    told = []
    if record.applies:
      told.append(f'{name} called linen models through Module.apply: '
                  + record.describe_empty())
    if models:
      owners = [owner for model in models
                for owner in _nnx.kernel_owners(model)]
      told.append(
          f'{name} got {len(models)} NNX model(s), but no layer of theirs'
          ' with a rule MAC knows ran'
          + ('; modules owning a kernel: ' + _capture.describe_modules(
              [path for path, _ in owners], dict(owners)) if owners else ''))
    return ('; '.join(told) + '. Teach MAC the layer classes with'
            ' mac_optax.register_layer (or register_attention).')


def _nnx_capturing(model, call, options, parts, recorder):
  """``call`` wrapped to capture ``model``'s statistics into ``parts``."""

  def run():
    outputs, stats = _nnx.capture_call(model, call, _rules.Options(**options),
                                       recorder)
    if stats:
      parts.append(stats)
    return outputs

  return run
