"""Flax linen capture of MAC's per-layer statistics.

A ``flax.linen.intercept_methods`` interceptor hands every module call to a
:class:`~mac_optax._tracking.Tracker`, which turns layer calls into statistics
and gives attention value projections the attention-weighted statistic. The
statistics are sown into the ``'mac_stats'`` collection at each layer's path.

Inside lifted transforms whose ``variable_axes`` do not list ``'mac_stats'``
(``nn.scan(..., variable_axes={'params': 0})`` as in big_vision), that
collection cannot leave the transform. The statistics then travel in a
collection the transform does scan: ``'intermediates'`` when it is listed
(MaxText), else ``'params'``, which ``apply`` makes mutable for this purpose
only when it is needed, and strips again, so the model needs no edit.

A function that calls ``model.apply`` (a wrapper) is captured through
``nn.Module.apply`` itself: while a capture runs, the class attribute is a
dispatcher that hands each call made in the capturing thread to that thread's
handler, and every other call to the original. The dispatcher is installed
once for all threads and removed when the last capture ends; flax keeps its
interceptors per thread, so captures in several threads do not meet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
from flax.core import scope as flax_scope
from flax.core import tracers as flax_tracers
from flax.nnx import bridge as nnx_bridge
import jax

from mac_optax import _geometry
from mac_optax import _rules
from mac_optax import _stats
from mac_optax import _tracking

STATS_COLLECTION = 'mac_stats'
STAT_NAME = _stats.MEAN
# Sown name in collections that are not ours (lifted-transform fallback).
FOREIGN_NAME = '__mac_stats__'
# Sown name of the statistics of an NNX model inside linen (nnx.bridge).
NESTED_NAME = '__mac_nested__'
_WEIGHTS_COLLECTION = 'intermediates'
_WEIGHTS_NAME = 'attention_weights'
_CHANNELS = (_WEIGHTS_COLLECTION, 'params')
ORIGINAL_APPLY = nn.Module.apply


class _ApplyHandlers(threading.local):
  """Per thread: who handles ``Module.apply`` calls now (innermost last)."""

  def __init__(self):
    super().__init__()
    self.stack: list[Callable[..., Any]] = []


_HANDLERS = _ApplyHandlers()
_PATCH_LOCK = threading.Lock()
_patch_users = 0


@functools.wraps(ORIGINAL_APPLY)
def _dispatching_apply(module, *args, **kwargs):
  """``nn.Module.apply`` while any thread captures: this thread's handler."""
  stack = _HANDLERS.stack
  if not stack:
    return ORIGINAL_APPLY(module, *args, **kwargs)
  return stack[-1](module, *args, **kwargs)


@contextlib.contextmanager
def handling_applies(handler: Callable[..., Any]) -> Iterator[None]:
  """Sends this thread's ``Module.apply`` calls to ``handler`` meanwhile.

  ``handler(module, *args, **kwargs)`` runs in place of ``apply``; other
  threads keep the original. ``nn.Module.apply`` is the original again once
  no thread handles applies, also after an exception.
  """
  global _patch_users
  with _PATCH_LOCK:
    if _patch_users == 0:
      nn.Module.apply = _dispatching_apply
    _patch_users += 1
  _HANDLERS.stack.append(handler)
  try:
    yield
  finally:
    _HANDLERS.stack.pop()
    with _PATCH_LOCK:
      _patch_users -= 1
      if _patch_users == 0:
        nn.Module.apply = ORIGINAL_APPLY


def current_trace():
  """An opaque token of the JAX trace that values are made in now."""
  return flax_tracers.current_trace()


def _unjit(function):
  """The Python function inside ``jax.jit(function)``, else ``function``.

  Captured inside the caller's trace, a jitted function runs inlined there;
  called as a jitted function it could reuse a trace made before the capture.
  """
  while (callable(function) and hasattr(function, '__wrapped__')
         and hasattr(function, 'lower') and hasattr(function, 'trace')):
    function = function.__wrapped__
  return function


def module_of_apply(function) -> nn.Module | None:
  """The module when ``function`` is ``module.apply``, else None."""
  if isinstance(function, functools.partial) and not function.keywords:
    if function.func in (ORIGINAL_APPLY, _dispatching_apply) and (
        len(function.args) == 1 and isinstance(function.args[0], nn.Module)):
      return function.args[0]
    return None
  if (inspect.ismethod(function)
      and function.__func__ in (ORIGINAL_APPLY, _dispatching_apply)
      and isinstance(function.__self__, nn.Module)):
    return function.__self__
  return None


def params_of(variables: Any) -> Any:
  """The parameter tree of linen ``variables`` (or the tree itself)."""
  if isinstance(variables, Mapping) and 'params' in variables:
    return variables['params']
  return variables


def describe_modules(paths, module_types: Mapping[Path, str]) -> str:
  """``'a/b (Type), c (not called)'`` for error messages."""
  return ', '.join(
      f'{path_str(p)} ({module_types.get(p, "not called")})' for p in paths)


def no_statistics_error(what: str, owners, module_types) -> ValueError:
  """The error for a capture that found kernels but recorded nothing."""
  return ValueError(
      f'{what}, but no layer MAC knows ran, so MAC would train as plain'
      ' momentum. Modules owning a kernel:'
      f' {describe_modules(owners, module_types)}. Teach MAC their layer'
      ' classes with mac_optax.register_layer (or register_attention), or'
      ' pass allow_empty=True to accept no statistics.'
  )

Path = _stats.Path
path_str = _stats.path_str


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
  owner = _tracking.rule_owner(type(module), rule)
  own = getattr(owner.__call__, '__wrapped__', owner.__call__)
  called = getattr(context.orig_method, 'func', context.orig_method)
  return called is own


def record_linen(module: nn.Module, path: Path, entry, nested=False) -> None:
  """Sows one call's statistics where they can leave ``apply``.

  ``nested`` marks a tree of statistics of layers below ``module`` (an NNX
  model inside linen) rather than one entry of ``module`` itself.
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

  def __init__(self, tracker: _tracking.Tracker):
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
    return handling_applies(self._nested_apply)

  def _nested_apply(self, module, *args, **kwargs):
    self.nested_applies += 1
    try:
      return ORIGINAL_APPLY(module, *args, **kwargs)
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
    attention = _rules.attention_rule_of(module)
    if attention is not None:
      return self._attention(next_fun, args, kwargs, context, attention)
    rule = _rules.rule_of(module)
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
    from mac_optax import _nnx  # pylint: disable=g-import-not-at-top
    entries: dict[Path, list] = {}

    def record(_, layer_path, entry):
      entries.setdefault(tuple(layer_path[len(path):]), []).append(entry)

    with _nnx.hosted(module.nnx_class, path, self.tracker, record):
      outputs = next_fun(*args, **kwargs)
    if entries:
      tree = _stats.nest(
          {p: {STAT_NAME: tuple(e)} for p, e in entries.items()})
      record_linen(module, path, tree, nested=True)
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
  return _stats.nest({path: _stats.merge_layer(entries)
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
      value_stat: str = 'reference',
      depthwise_shared: bool = True,
      allow_empty: bool = False,
  ):
    self.apply_fn = apply_fn
    self.allow_empty = allow_empty
    # model.apply itself runs under the interceptor here; any other function
    # (a wrapper) is run with its applies captured as they happen.
    self._target = _unjit(apply_fn)
    self._module = module_of_apply(self._target)
    if self._module is not None:
      # Not the bound method: looked up while another thread captured, it
      # would be the dispatcher, which hands this call to the nested handler.
      self._target = functools.partial(ORIGINAL_APPLY, self._module)
    self.options = _rules.Options(
        attention_aware=attention_aware,
        value_stat=value_stat,
        depthwise_shared=depthwise_shared,
    )
    if value_stat not in _tracking.VALUE_STATS:
      raise ValueError(
          f'value_stat must be one of {_tracking.VALUE_STATS}, got'
          f' {value_stat!r}.'
      )
    # Set once a lifted transform needed 'params' to carry the statistics.
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
      raise no_statistics_error(
          f'capture({name}) ran the model', owners, seen.module_types)

  def apply_with_recorder(self, recorder, variables, *args, **kwargs):
    """Runs the wrapped apply; ``recorder`` (or None) collects layer facts."""
    result, stats, _ = self.run(recorder, variables, *args, **kwargs)
    return result, stats

  def run(self, recorder, variables, *args, **kwargs):
    """Runs the wrapped function.

    Returns:
      ``(result, mac_stats, seen)``; ``seen`` (a :class:`Seen`, or for a
      wrapper the ``Recording`` of its applies) tells how many applies ran,
      the type of every module called and the layers skipped on purpose.
    """
    if self._module is None:
      return self._run_wrapper(recorder, variables, args, kwargs)
    mutable = kwargs.pop('mutable', False)
    return self._run_apply(recorder, variables, args, mutable, kwargs)

  def _run_wrapper(self, recorder, variables, args, kwargs):
    """A function calling ``model.apply``: its applies are captured."""
    from mac_optax import _recording  # pylint: disable=g-import-not-at-top
    options = dict(attention_aware=self.options.attention_aware,
                   value_stat=self.options.value_stat,
                   depthwise_shared=self.options.depthwise_shared)
    with _recording.recording_applies(options, recorder) as record:
      result = self._target(variables, *args, **kwargs)
    stats = _recording.merge_disjoint(record.parts) if record.parts else {}
    return result, stats, record

  def _run_apply(self, recorder, variables, args, mutable, kwargs):
    try:
      return self._apply(recorder, variables, args, mutable, kwargs)
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
        return self._apply(recorder, variables, args, mutable, kwargs)
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

  def _apply(self, recorder, variables, args, mutable, kwargs):
    tracker = _tracking.Tracker(self.options, record_linen, recorder)
    interceptor = Interceptor(tracker)
    ours = [STATS_COLLECTION]
    if self.options.attention_aware:
      ours.append(_WEIGHTS_COLLECTION)
    if self._params_channel:
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
    foreign: dict[Path, Any] = {}
    for collection in _CHANNELS:
      if collection in state:
        state[collection] = _pop_foreign(state[collection], foreign)
    stats = _finalize(state.pop(STATS_COLLECTION, {}), foreign)
    if recorder is not None:
      stats_paths = set(_stats.mean_inputs(stats)) if stats else set()
      lost = [p for p in recorder.layers if p not in stats_paths]
      if lost:
        raise ValueError(
            f'the statistics of {", ".join(map(path_str, lost))} were'
            ' recorded but did not come out of apply.'
        )
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


def capture(
    apply_fn: Callable[..., Any],
    *,
    attention_aware: bool = True,
    value_stat: str = 'reference',
    depthwise_shared: bool = True,
    allow_empty: bool = False,
):
  r"""Wraps ``model.apply`` (linen) or a model (NNX) to also return MAC's statistics.

  Linen: ``capture(model.apply)`` takes the same arguments as ``model.apply``
  and returns ``(outputs, mac_stats)``; when ``mutable`` (or
  ``capture_intermediates``) makes ``apply`` return ``(outputs, state)``, it
  returns ``((outputs, state), mac_stats)``. NNX: ``capture(model)`` (or a
  bound method of it) is called like the model and returns ``(outputs,
  mac_stats)``. The model's outputs, its other collections and its gradients
  are unchanged.

  ``mac_stats`` is a nested dict keyed by module path, like the params, with
  one node of fp32 statistics per preconditioned layer (see ``_stats``); the
  preconditioner uses its ``mean_input``:

  * ``Dense`` / ``DenseGeneral`` / ``Einsum`` (NNX ``Linear`` /
    ``LinearGeneral`` / ``Einsum``): the mean of the input rows over batch and
    positions, contracted axes flattened in kernel order, with a trailing 1
    when the layer has a bias. Weights per batch index
    (``DenseGeneral(batch_dims=...)``) get one mean per index.
  * ``Conv``: the mean im2col patch in the kernel's ``(*kernel_size,
    in_features // groups)`` layout (plus 1 for the bias), computed from the
    batch-mean input without building patches. Grouped convolutions get one
    row per group; depthwise convolutions share one patch over channels (as
    the reference does) unless ``depthwise_shared=False``. ``ConvTranspose``
    gets the mean patch of the stride-1 convolution it computes, ``ConvLocal``
    one mean patch per output position.
  * The value projection of attention modules (Flax's own, and those declared
    with :func:`register_attention`): the attention-weighted mean input
    :math:`v = \sum_j \bar p_j \bar x_j`, with :math:`\bar p_j` the attention
    that key :math:`j` receives, averaged over batch, heads and unmasked query
    rows, under the module's mask, and :math:`\bar x_j` the batch-mean value
    input at key position :math:`j`. ``value_stat='per_head'`` gives one row
    per head instead, the mean over batch and queries of :math:`\sum_j
    A_{bhij} x_{bj}`. A fused query/key/value projection gets the plain
    statistic on its query and key blocks and this one on its value blocks.

  A layer called several times gets the statistic of all its calls' rows.
  Statistics are ``stop_gradient``-ed and cost no backward work.

  The interceptor is installed inside the call, so call the wrapped function
  inside your traced (jitted, differentiated) loss function. Calls during
  ``model.init`` and autoregressive decoding record nothing.

  Attention probabilities come from the model itself where it can hand them
  over (linen: ``sow_weights``, stripped from the returned intermediates
  again; NNX: through its ``attention_fn``); otherwise they are recomputed as
  ``softmax(q kᵀ / √d)`` under the module's mask from the intercepted (and
  normalised) projections.

  Layers inside ``nn.scan`` need no change to the model: their statistics
  come out stacked like their kernels.

  A wrapper of ``model.apply`` is captured like ``model.apply`` itself: every
  ``Module.apply`` it reaches is captured (several merge, as in
  :func:`recording`), and applies made inside a captured one (a tied decoder)
  are part of it. A ``jax.jit``-ed function given here is run unjitted inside
  the caller's trace; an ``apply`` reached inside a JAX transformation that
  the wrapper applies itself (a nested ``jax.jit``, ``jax.vmap``) raises,
  since its statistics could not leave it.

  For a subclass of a known layer that overrides ``__call__`` (``class
  Scaled(nn.Dense)`` calling ``super().__call__(2 * x)``), the statistic is
  that of the input the layer class's own ``__call__`` receives, which is what
  the kernel multiplies.

  Args:
    apply_fn: a linen ``model.apply``, or any function that calls it (directly
      or through other functions; it is called with the arguments given and
      its result returned unchanged), or an NNX module (or bound method of
      one).
    attention_aware: give attention value projections the attention-weighted
      statistic; ``False`` treats them as plain layers.
    value_stat: ``'reference'`` (one head-averaged vector, the authors'
      statistic) or ``'per_head'``.
    depthwise_shared: share one mean patch over the channels of a depthwise
      convolution, as the reference does.
    allow_empty: accept a call that records no statistics. Otherwise a call
      that records none raises when the parameters have kernels (naming the
      modules that own them), or when a wrapper ran no ``Module.apply``.

  Returns:
    A callable returning ``(result, mac_stats)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, stats = mac_optax.capture(model.apply)(variables, x)
    >>> stats['mean_input']
    Array([1., 1., 1.], dtype=float32)
  """
  from mac_optax import _nnx  # pylint: disable=g-import-not-at-top
  options = dict(attention_aware=attention_aware, value_stat=value_stat,
                 depthwise_shared=depthwise_shared, allow_empty=allow_empty)
  if _nnx.is_nnx(apply_fn):
    return _nnx.NNXCapture(apply_fn, **options)
  return Capture(apply_fn, **options)
