"""Flax linen capture of MAC's per-layer statistics.

A ``flax.linen.intercept_methods`` interceptor hands every module call to a
:class:`~mac_optax._capture.tracking.Tracker`, which turns layer calls into
statistics and gives attention value projections the attention-weighted
statistic. The statistics are sown into the ``'mac_stats'`` collection at each
layer's path.

Inside lifted transforms whose ``variable_axes`` do not list ``'mac_stats'``
(``nn.scan(..., variable_axes={'params': 0})`` as in big_vision), that
collection cannot leave the transform. The statistics then travel in a
collection the transform does scan: ``'intermediates'`` when it is listed
(MaxText), else ``'params'``, which ``apply`` makes mutable for this purpose
only when it is needed, and strips again, so the model needs no edit.

A function that calls ``model.apply`` (a wrapper, or any code inside a
:class:`Recording` block) is captured through ``nn.Module.apply`` itself (see
``module_apply``): every apply it reaches is captured like ``model.apply``,
into the block's :class:`Recording`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterator, Literal, Mapping

import flax.linen as nn
from flax.core import scope as flax_scope
from flax.nnx import bridge as nnx_bridge

from mac_optax import _geometry
from mac_optax import _stats
from mac_optax._capture import common
from mac_optax._capture import module_apply
from mac_optax._capture import nnx_hooks
from mac_optax._capture import rules
from mac_optax._capture import tracking

STATS_COLLECTION = 'mac_stats'
STAT_NAME = _stats.MEAN
# Sown name in collections that are not ours (lifted-transform fallback).
FOREIGN_NAME = '__mac_stats__'
# Sown name of the statistics of an NNX model inside linen (nnx.bridge).
NESTED_NAME = '__mac_nested__'
_WEIGHTS_COLLECTION = 'intermediates'
_WEIGHTS_NAME = 'attention_weights'
# Where statistics travel when a lifted transform (nn.scan, nn.vmap) does not
# list 'mac_stats' in its variable_axes: collections such transforms carry
# per iteration anyway. 'intermediates' first (MaxText lists it); else
# 'params', which every scan over layers with their own weights lists.
_CHANNELS = (_WEIGHTS_COLLECTION, 'params')

Path = _stats.Path
path_str = _stats.path_str


def params_of(variables: Any) -> Any:
  """The parameter tree of linen ``variables`` (or the tree itself)."""
  if isinstance(variables, Mapping) and 'params' in variables:
    return variables['params']
  return variables


class _NeedsParamsChannel(Exception):
  """A layer inside a lifted transform found no collection to sow into."""

  def __init__(self, path: Path):
    super().__init__(path)
    self.path = path


@functools.lru_cache(maxsize=None)
def _signature(method) -> inspect.Signature:
  return inspect.signature(method)


def _bind(context, args, kwargs) -> inspect.BoundArguments:
  method = context.orig_method
  func = getattr(method, 'func', method)
  bound = _signature(func).bind(context.module, *args, **kwargs)
  bound.apply_defaults()
  return bound


def _call_bound(next_fun, bound: inspect.BoundArguments):
  return next_fun(*bound.args[1:], **bound.kwargs)


def _first_argument(bound: inspect.BoundArguments):
  return list(bound.arguments.values())[1]


def _is_own_call(module: nn.Module, rule, context) -> bool:
  """Whether this is the ``__call__`` of the class that ``rule`` is for.

  Not so for a subclass's override (``super().__call__(2 * x)``), whose input
  is not what the kernel multiplies.
  """
  owner = tracking.rule_owner(type(module), rule)
  own = getattr(owner.__call__, '__wrapped__', owner.__call__)
  called = getattr(context.orig_method, 'func', context.orig_method)
  return called is own


def sow_entry(module: nn.Module, path: Path, entry, nested=False) -> None:
  """Sows one call's statistics where they can leave ``apply``.

  ``nested`` marks a tree of statistics of layers below ``module`` (an NNX
  model inside linen) rather than one entry of ``module`` itself. The
  tracker's store for linen.
  """
  if module.is_mutable_collection(STATS_COLLECTION):
    module.sow(STATS_COLLECTION, NESTED_NAME if nested else STAT_NAME, entry)
    return
  for collection in _CHANNELS:
    if module.is_mutable_collection(collection):
      module.sow(collection, NESTED_NAME if nested else FOREIGN_NAME, entry)
      return
  raise _NeedsParamsChannel(path)


class Interceptor:
  """The ``intercept_methods`` interceptor feeding a tracker."""

  def __init__(self, tracker: tracking.Tracker):
    self.tracker = tracker
    self.injected_weight_paths: list[Path] = []
    self.nested_applies = 0

  def passing_nested_applies(self):
    """Lets ``Module.apply`` calls made inside the captured one pass through.

    A model may run another module through its own ``apply`` (Hugging Face
    BERT's output decoder, tied to the word embedding, is applied to the
    embedding's transpose). Such a layer's weights are not parameters of the
    captured model, so they are not its layers.
    """
    return module_apply.handling_applies(self._nested_apply)

  def _nested_apply(self, module, *args, **kwargs):
    self.nested_applies += 1
    try:
      return module_apply.ORIGINAL_APPLY(module, *args, **kwargs)
    finally:
      self.nested_applies -= 1

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    # Lifted transforms (scan, remat, vmap, jit) add pseudo-calls of subclasses
    # of the wrapped module under a '<lambda>' method: only real calls count.
    if (context.method_name != '__call__' or module.is_initializing()
        or self.nested_applies or self.tracker.is_active(module)):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if isinstance(module, nnx_bridge.ToLinen):
      return self._nnx_inside(next_fun, args, kwargs, module, path)
    attention = rules.attention_rule_of(module)
    if attention is not None:
      return self._attention(next_fun, args, kwargs, context, attention)
    rule = rules.rule_of(module)
    if rule is None:
      return self.tracker.other_call(
          module, path, lambda: next_fun(*args, **kwargs))
    bound = _bind(context, args, kwargs)
    call = (self.tracker.layer_call if _is_own_call(module, rule, context)
            else self.tracker.override_call)
    return call(module, path, rule, bound.arguments, _first_argument(bound),
                lambda: _call_bound(next_fun, bound))

  def _attention(self, next_fun, args, kwargs, context, rule):
    module = context.module
    path = tuple(module.path)
    bound = _bind(context, args, kwargs)
    arguments = bound.arguments
    # Flax's own attention sows its probabilities when asked to (and when its
    # attention_fn takes `module`); read them instead of recomputing.
    can_sow = (
        isinstance(module, nn.MultiHeadDotProductAttention)
        and 'sow_weights' in arguments
        and 'module' in _signature(module.attention_fn).parameters
        and module.is_mutable_collection(_WEIGHTS_COLLECTION)
    )
    with self.tracker.attention_call(module, path, rule, arguments) as frame:
      if frame is not None and can_sow and not arguments['sow_weights']:
        arguments['sow_weights'] = True
        self.injected_weight_paths.append(path)
      outputs = _call_bound(next_fun, bound)
      if frame is not None and can_sow:
        sown = module.get_variable(_WEIGHTS_COLLECTION, _WEIGHTS_NAME)
        frame.probabilities = sown[-1] if sown else None
    self.tracker.finish_attention(frame, arguments, outputs)
    return outputs

  def _nnx_inside(self, next_fun, args, kwargs, module, path):
    """An NNX model inside linen (``nnx.bridge.ToLinen``): track it too."""
    entries: dict[Path, list] = {}

    def store(_, layer_path, entry):
      entries.setdefault(tuple(layer_path[len(path):]), []).append(entry)

    with nnx_hooks.hosted(module.nnx_class, path, self.tracker, store):
      outputs = next_fun(*args, **kwargs)
    if entries:
      tree = _stats.nest_nodes(
          {p: {STAT_NAME: tuple(e)} for p, e in entries.items()})
      sow_entry(module, path, tree, nested=True)
    return outputs


def _pop_foreign(tree: Any, found: dict[Path, Any], path: Path = ()) -> Any:
  """Removes fallback-channel statistics from a collection, collecting them.

  ``found`` maps a module path to what was sown there, as our own collection
  would hold it: ``{STAT_NAME: entries}`` or ``{NESTED_NAME: trees}``.
  """
  if not isinstance(tree, Mapping):
    return tree
  result = {}
  for key, value in tree.items():
    if key == FOREIGN_NAME:
      found.setdefault(path, {})[STAT_NAME] = value
    elif key == NESTED_NAME:
      found.setdefault(path, {})[NESTED_NAME] = value
    else:
      child = _pop_foreign(value, found, path + (key,))
      if not isinstance(child, Mapping) or child:
        result[key] = child
  return result


def _drop_path(tree: dict, path: Path, name: str) -> dict:
  """``tree`` without ``tree[path...][name]``, pruning emptied dicts."""
  if not path:
    return {k: v for k, v in tree.items() if k != name}
  head, rest = path[0], path[1:]
  if not isinstance(tree, Mapping) or head not in tree:
    return tree
  result = dict(tree)
  child = _drop_path(result[head], rest, name)
  if child:
    result[head] = child
  else:
    del result[head]
  return result


def _finalize(collection: Any, foreign: dict[Path, Any]) -> dict:
  """Merges each layer's per-call statistics into one ``mac_stats`` tree."""
  per_path: dict[Path, list] = {}

  def walk(node, path):
    for name, value in node.items():
      if name == STAT_NAME:
        per_path.setdefault(path, []).extend(value)
      elif name == NESTED_NAME:
        for tree in value:
          walk(tree, path)
      else:
        walk(value, path + (name,))

  walk(collection, ())
  for path, sown in foreign.items():
    walk(sown, path)
  return _stats.nest_nodes({path: _stats.merge_layer(entries)
               for path, entries in per_path.items()})


@dataclasses.dataclass
class Seen:
  """What a capture ran: ``Module.apply`` calls, and every module's type."""

  applies: int = 0
  module_types: dict[Path, str] = dataclasses.field(default_factory=dict)
  # Layers deliberately not recorded (decoding, PassThrough rules).
  skipped: set[Path] = dataclasses.field(default_factory=set)


class Capture:
  """A linen ``apply`` that also returns MAC's per-layer statistics.

  Created by :func:`capture`; see there.
  """

  def __init__(
      self,
      apply_fn: Callable[..., Any],
      *,
      attention_aware: bool = True,
      # rules.ValueStat, spelled out: the docs show a class's annotations as
      # written.
      value_stat: Literal['reference', 'per_head'] = 'reference',
      depthwise_shared: bool = True,
      allow_empty: bool = False,
  ):
    self._set_up(apply_fn, rules.Options(attention_aware, value_stat,
                                         depthwise_shared), allow_empty)

  @classmethod
  def with_options(cls, apply_fn: Callable[..., Any], options: rules.Options,
                   allow_empty: bool = False) -> Capture:
    """The capture of ``apply_fn`` with options already made."""
    capture = cls.__new__(cls)
    capture._set_up(apply_fn, options, allow_empty)
    return capture

  def _set_up(self, apply_fn, options: rules.Options, allow_empty: bool):
    self.apply_fn = apply_fn
    self.options = options
    self.allow_empty = allow_empty
    # model.apply itself runs under the interceptor here; any other function
    # (a wrapper) is run with its applies captured as they happen.
    self._target = module_apply.unjit(apply_fn)
    self._module = module_apply.module_of_apply(self._target)
    if self._module is not None:
      # Not the bound method: looked up while another thread captured, it
      # would be the dispatcher, which hands this call to the nested handler.
      self._target = functools.partial(module_apply.ORIGINAL_APPLY,
                                       self._module)
    # Set once a lifted transform needed 'params' to carry the statistics;
    # later calls (and retraces) then sow into 'params' from the start.
    self._params_channel = False
    functools.update_wrapper(self, apply_fn, updated=())

  def __call__(self, variables, *args, **kwargs):
    result, stats, seen = self.run(None, variables, *args, **kwargs)
    if not stats and not self.allow_empty:
      self._raise_empty(variables, seen)
    return result, stats

  def _raise_empty(self, variables, seen) -> None:
    """Raises for a call that recorded nothing where something should be."""
    name = getattr(self.apply_fn, '__name__', 'the function')
    if self._module is None and not seen.applies:
      raise ValueError(
          f'capture({name}): no flax Module.apply ran while capturing, so no'
          ' statistics were recorded. A function jitted with jax.jit and'
          ' already traced outside the capture reuses that trace and runs no'
          ' model here: capture the function without its jax.jit (capture'
          ' unwraps a jax.jit given to it directly), or call model.apply'
          ' inside it. Pass allow_empty=True to accept no statistics.'
      )
    if self._module is None:  # the kernels of the applies the wrapper ran
      owners = seen.kernel_owners
    else:
      owners = [path for path in _geometry.kernel_owners(params_of(variables))
                if path not in seen.skipped]
    if owners:
      raise common.no_statistics_error(
          f'capture({name}) ran the model', owners, seen.module_types)

  def trace(self, survey: tracking.Survey, args, kwargs):
    """Traces one call for ``find_layers``, shapes only.

    Returns:
      ``(mac_stats shapes, the parameter tree, [])`` (no NNX models).
    """
    if not args:
      raise TypeError('find_layers(model.apply, variables, *inputs): the'
                      ' variables are missing.')
    variables = args[0]
    stats = common.eval_shape(
        lambda: self.run(survey, *args, **kwargs)[1], survey=survey)
    # A wrapper may take the parameter tree itself first.
    params = params_of(variables) if isinstance(variables, Mapping) else {}
    return stats, params, []

  def run(self, survey, variables, *args, **kwargs):
    """Runs the wrapped function; ``survey`` (or None) collects layer facts.

    Returns:
      ``(result, mac_stats, seen)``; ``seen`` (a :class:`Seen`, or for a
      wrapper the ``Recording`` of its applies) tells how many applies ran,
      the type of every module called and the layers skipped on purpose.
    """
    if self._module is None:
      return self._run_wrapper(survey, variables, args, kwargs)
    mutable = kwargs.pop('mutable', False)
    return self._run_apply(survey, variables, args, mutable, kwargs)

  def _run_wrapper(self, survey, variables, args, kwargs):
    """A function calling ``model.apply``: its applies are captured."""
    with recording_applies(self.options, survey) as block:
      result = self._target(variables, *args, **kwargs)
    stats = common.merge_trees(block.parts) if block.parts else {}
    return result, stats, block

  def _run_apply(self, survey, variables, args, mutable, kwargs):
    # The first call tries 'mac_stats' (and 'intermediates'); a layer inside
    # a lifted transform that carries neither raises _NeedsParamsChannel, and
    # the call is made again with 'params' mutable as the way out.
    try:
      return self._apply(survey, variables, args, mutable, kwargs)
    except _NeedsParamsChannel as error:
      if self._params_channel:
        raise ValueError(
            f'layer {path_str(error.path)} runs inside a lifted transform'
            ' (nn.scan, nn.vmap, ...) whose variable_axes leave its'
            f" statistics no way out: add '{STATS_COLLECTION}': 0 to that"
            ' transform\'s variable_axes.'
        ) from None
      self._params_channel = True
      try:
        return self._apply(survey, variables, args, mutable, kwargs)
      except ValueError as retry_error:
        if 'broadcast' not in str(retry_error):
          raise
        raise ValueError(
            f'layer {path_str(error.path)} runs inside a lifted transform'
            ' (nn.scan, nn.vmap, ...) that broadcasts its params (weights'
            ' shared across iterations); MAC cannot carry per-iteration'
            ' statistics out of it. Capture a model whose scanned layers'
            ' have their own weights (variable_axes={"params": 0}).'
        ) from retry_error

  def _apply(self, survey, variables, args, mutable, kwargs):
    tracker = tracking.Tracker(self.options, sow_entry, survey)
    interceptor = Interceptor(tracker)
    ours = [STATS_COLLECTION]
    if self.options.attention_aware:
      ours.append(_WEIGHTS_COLLECTION)
    if self._params_channel:
      # Mutable only to carry statistics out of lifted transforms; the
      # 'params' collection is not returned unless the caller asked for it.
      ours.append('params')
    # The interceptor is entered here, inside whatever function the caller
    # traces, because intercept_methods is not part of jax.jit's cache key.
    with nn.intercept_methods(interceptor), (
        interceptor.passing_nested_applies()):
      outputs, state = self._target(
          variables,
          *args,
          mutable=flax_scope.union_filters(mutable, ours),
          **kwargs,
      )
    state = dict(state)
    # Statistics that came out through a channel are taken out of it (the
    # channel then holds only what the model itself put there) and merged
    # with those of the 'mac_stats' collection.
    foreign: dict[Path, Any] = {}
    for collection in _CHANNELS:
      if collection in state:
        state[collection] = _pop_foreign(state[collection], foreign)
    stats = _finalize(state.pop(STATS_COLLECTION, {}), foreign)
    if survey is not None:
      stats_paths = set(_stats.mean_inputs(stats)) if stats else set()
      lost = [p for p in survey.layers if p not in stats_paths]
      if lost:
        raise ValueError(
            f'the statistics of {", ".join(map(path_str, lost))} were'
            ' recorded but did not come out of apply.'
        )
    # Return only the collections the caller made mutable (or asked for), and
    # attention weights only where the model sowed them, not we.
    kept = {
        name for name in state
        if flax_scope.in_filter(mutable, name)
        or (name == _WEIGHTS_COLLECTION
            and kwargs.get('capture_intermediates'))
    }
    if _WEIGHTS_COLLECTION in kept:
      weights = state[_WEIGHTS_COLLECTION]
      for path in interceptor.injected_weight_paths:
        weights = _drop_path(weights, path, _WEIGHTS_NAME)
      state[_WEIGHTS_COLLECTION] = weights
    state = {k: v for k, v in state.items() if k in kept and (
        v or k not in (_WEIGHTS_COLLECTION,))}
    seen = Seen(applies=1, module_types=tracker.module_types,
                skipped=tracker.skipped)
    # Same rule as flax.core.apply: any mutable other than False returns state.
    if mutable is not False or kwargs.get('capture_intermediates'):
      return (outputs, state), stats, seen
    return outputs, stats, seen


@dataclasses.dataclass
class Recording:
  """The statistics recorded so far in a :func:`recording` block.

  Every ``Module.apply`` of the block's thread is captured into it, as
  :func:`mac_optax.capture` would capture that apply.
  """

  options: rules.Options
  survey: tracking.Survey | None = None
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
          + common.describe_modules(self.kernel_owners, self.module_types))
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
    return common.merge_trees(self.parts)


def _apply_in_block(block: Recording, module, variables, *args, **kwargs):
  """``nn.Module.apply`` while a recording is active: captured into it."""
  if module_apply.current_trace() != block.trace:
    raise ValueError(
        f'{type(module).__name__}.apply was called inside a JAX'
        ' transformation (jax.jit, jax.vmap, jax.checkpoint, ...) that runs'
        ' inside the capture, so its statistics cannot leave that'
        ' transformation. Capture inside it instead (mac_optax.capture'
        ' around the function it transforms, returning the statistics), or'
        ' call the function untransformed. A jax.jit given to'
        ' mac_optax.capture directly is unwrapped.'
    )
  capture = Capture.with_options(
      functools.partial(module_apply.ORIGINAL_APPLY, module), block.options)
  block.depth += 1
  try:
    result, stats, seen = capture.run(
        block.survey, variables, *args, **kwargs)
  finally:
    block.depth -= 1
  block.applies += 1
  for path, name in seen.module_types.items():
    block.module_types.setdefault(path, name)
  block.skipped.update(seen.skipped)
  if stats:
    block.parts.append(stats)
  else:
    block.kernel_owners.extend(
        path for path in _geometry.kernel_owners(params_of(variables))
        if path not in seen.skipped)
  return result


class _Guard:
  """Refuses layer calls that bypass ``apply`` (bound modules) while active."""

  def __init__(self, block: Recording):
    self.block = block

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (self.block.depth == 0 and context.method_name == '__call__'
        and not module.is_initializing()
        and (rules.rule_of(module) is not None
             or rules.attention_rule_of(module) is not None)):
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
def recording_applies(
    options: rules.Options,
    survey: tracking.Survey | None = None) -> Iterator[Recording]:
  """Captures the ``Module.apply`` calls of this thread into a Recording.

  Meanwhile NNX layers that no capture tracks raise, and linen layers called
  outside ``apply`` (bound modules) raise: their statistics would be lost.
  """
  block = Recording(options, survey, trace=module_apply.current_trace())
  with module_apply.handling_applies(
      functools.partial(_apply_in_block, block)), nnx_hooks.refusing(), (
          nn.intercept_methods(_Guard(block))):
    yield block
