"""NNX module calls routed to a tracker: class ``__call__`` wrapping.

NNX has no method interceptor, so while a capture runs, the ``__call__`` of
every module class in the model that has a rule (and of the norms that
attention rules name) is wrapped. The wrapper hands the call to the same
:class:`~mac_optax._capture.tracking.Tracker` that linen uses. Every module is
tagged with its path first, as a plain attribute that the copies NNX
transforms make keep.

A class's ``__call__`` is wrapped once for all threads while any capture
needs it (counted) and restored after the last; the wrapper hands each call to
the tracker of the calling thread, or runs the original where that thread
captures nothing. Linen uses the same wrapping for NNX models inside linen
(``nnx.bridge.ToLinen``, see :func:`hosted`) and to refuse NNX layers that no
capture tracks (:func:`refusing`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, Iterator

from flax import nnx

from mac_optax import _stats
from mac_optax._capture import rules
from mac_optax._capture import tracking

Path = _stats.Path
path_str = _stats.path_str
_PATH_ATTRIBUTE = '_mac_optax_path'


class _ThreadState(threading.local):
  """Per thread: current trackers and NNX-in-linen hosts (innermost last)."""

  def __init__(self):
    super().__init__()
    self.trackers: list[Any] = []
    self.hosts: list[tuple[type, Path]] = []


_THREAD = _ThreadState()
_HOOK_LOCK = threading.Lock()
# Wrapped classes: [how many captures need the wrapper, the class's own
# __call__ before (None when inherited)].
_HOOKS: dict[type, list[Any]] = {}


@functools.lru_cache(maxsize=None)
def _signature(function) -> inspect.Signature:
  return inspect.signature(function)


class _Probe:
  """Stands in for the module an ``attention_fn`` sows its weights into."""

  def __init__(self, frame, module):
    self._frame = frame
    self._module = module

  def sow(self, variable_type, name, value, *args, **kwargs):
    self._frame.probabilities = value
    if self._module is not None:
      return self._module.sow(variable_type, name, value, *args, **kwargs)
    return True


def _attention(tracker, module, path, rule, bound, original):
  arguments = bound.arguments
  with tracker.attention_call(module, path, rule, arguments) as frame:
    attention_fn = getattr(module, 'attention_fn', None)
    # Without dropout or sown weights, Flax's attention_fn takes the fused
    # jax.nn.dot_product_attention path and never forms probabilities; they
    # are recomputed then rather than forcing the model off that path.
    probe = (
        frame is not None
        and isinstance(module, nnx.MultiHeadAttention)
        and (arguments.get('sow_weights') or module.dropout_rate > 0)
        and 'module' in _signature(attention_fn).parameters
    )
    if probe:
      # Flax's attention_fn sows its probabilities into `module`: hand it a
      # probe so the model's own probabilities are read, not recomputed.
      def probing_attention_fn(*args, module=None, **kwargs):
        return attention_fn(*args, module=_Probe(frame, module), **kwargs)

      object.__setattr__(module, 'attention_fn', probing_attention_fn)
    try:
      outputs = original(*bound.args, **bound.kwargs)
    finally:
      if probe:
        object.__setattr__(module, 'attention_fn', attention_fn)
  tracker.finish_attention(frame, arguments, outputs)
  return outputs


def _own_call(cls: type, rule) -> Callable[..., Any]:
  """The ``__call__`` function of the class that ``rule`` was registered for."""
  function = tracking.rule_owner(cls, rule).__call__
  return getattr(function, 'mac_optax_original', function)


def _wrapped_call(original: Callable[..., Any]) -> Callable[..., Any]:

  @functools.wraps(original)
  def __call__(self, *args, **kwargs):
    hosts = _THREAD.hosts
    if hosts and isinstance(self, hosts[-1][0]) and (
        _PATH_ATTRIBUTE not in vars(self)):
      return _tagged_call(self, hosts[-1][1],
                          lambda: _tracked_call(original, self, args, kwargs))
    return _tracked_call(original, self, args, kwargs)

  __call__.mac_optax_original = original
  return __call__


def _tagged_call(model, prefix: Path, run: Callable[[], Any]):
  """Runs a hosted NNX model with its modules tagged by path under prefix."""
  modules = list(nnx.iter_modules(model))
  for path, module in modules:
    object.__setattr__(module, _PATH_ATTRIBUTE, prefix + tuple(path))
  try:
    return run()
  finally:
    for _, module in modules:
      if _PATH_ATTRIBUTE in vars(module):
        object.__delattr__(module, _PATH_ATTRIBUTE)


def _tracked_call(original, self, args, kwargs):
  """One call of a wrapped class: to this thread's tracker, if any."""
  trackers = _THREAD.trackers
  tracker = trackers[-1] if trackers else None
  if tracker is None:
    return original(self, *args, **kwargs)
  path = getattr(self, _PATH_ATTRIBUTE, None)
  if tracker is _REFUSE or path is None:
    raise ValueError(
        f'an NNX {type(self).__name__} was called during a MAC capture but'
        ' is not part of a captured model: capture the model that owns it'
        ' (mac_optax.capture(model), or mac_optax.with_stats on a loss'
        ' function taking the model as a positional argument).'
    )
  if tracker.is_active(self):
    return original(self, *args, **kwargs)
  bound = _signature(original).bind(self, *args, **kwargs)
  bound.apply_defaults()
  attention = rules.attention_rule_of(self)
  if attention is not None:
    return _attention(tracker, self, path, attention, bound, original)
  run = lambda: original(*bound.args, **bound.kwargs)
  rule = rules.rule_of(self)
  if rule is None:
    return tracker.other_call(self, path, run)
  inputs = list(bound.arguments.values())[1]
  # A subclass overriding __call__: its input is not what the kernel
  # multiplies; the rule class's own __call__ (super()) records then.
  call = (tracker.layer_call if original is _own_call(type(self), rule)
          else tracker.override_call)
  return call(self, path, rule, bound.arguments, inputs, run)


def _classes_to_wrap(modules) -> set[type]:
  classes = set()
  by_path = dict(modules)
  for path, module in modules:
    layer_rule = rules.rule_of(module)
    if layer_rule is not None:
      classes.add(type(module))
      # Where a subclass overrides __call__, its super().__call__ records.
      classes.add(tracking.rule_owner(type(module), layer_rule))
    rule = rules.attention_rule_of(module)
    if rule is not None:
      classes.add(type(module))
      for role in ('query_norm', 'key_norm'):
        name = getattr(rule, role)
        child = by_path.get(tuple(path) + rules.as_path(name)) if name else None
        if child is not None:
          classes.add(type(child))
  return classes


@contextlib.contextmanager
def _hooking(classes) -> Iterator[None]:
  """Wraps ``__call__`` of ``classes`` (once for all threads) meanwhile.

  Each wrapper calls the class's own (or inherited) original ``__call__``,
  never another class's wrapper, so classes can be unwrapped in any order.
  """
  classes = list(dict.fromkeys(classes))
  with _HOOK_LOCK:
    for cls in classes:
      hook = _HOOKS.get(cls)
      if hook is None:
        current = cls.__call__
        original = getattr(current, 'mac_optax_original', current)
        hook = _HOOKS[cls] = [0, cls.__dict__.get('__call__')]
        setattr(cls, '__call__', _wrapped_call(original))
      hook[0] += 1
  try:
    yield
  finally:
    with _HOOK_LOCK:
      for cls in reversed(classes):
        hook = _HOOKS[cls]
        hook[0] -= 1
        if not hook[0]:
          del _HOOKS[cls]
          if hook[1] is None:
            delattr(cls, '__call__')
          else:
            setattr(cls, '__call__', hook[1])


@contextlib.contextmanager
def _pushed(stack: list[Any], item: Any) -> Iterator[None]:
  stack.append(item)
  try:
    yield
  finally:
    stack.pop()


@contextlib.contextmanager
def _wrapping(classes, tracker) -> Iterator[None]:
  """Wraps ``__call__`` of ``classes``; ``tracker`` serves this thread."""
  with _hooking(classes), _pushed(_THREAD.trackers, tracker):
    yield


@contextlib.contextmanager
def tracking_model(model: nnx.Module,
                   tracker: tracking.Tracker) -> Iterator[None]:
  """Routes the NNX module calls of ``model`` to ``tracker`` while active."""
  modules = list(nnx.iter_modules(model))
  for path, module in modules:
    object.__setattr__(module, _PATH_ATTRIBUTE, tuple(path))
    # Only classes with a rule are wrapped; the others (norms, user blocks)
    # are named from the model itself, for summary.
    tracker.seen(tuple(path), module)
  try:
    with _wrapping(_classes_to_wrap(modules), tracker):
      yield
  finally:
    for _, module in modules:
      if _PATH_ATTRIBUTE in vars(module):
        object.__delattr__(module, _PATH_ATTRIBUTE)


@contextlib.contextmanager
def hosted(root_class, prefix: Path, tracker: tracking.Tracker,
           store: tracking.Store) -> Iterator[None]:
  """Tracks NNX models of ``root_class`` created and called meanwhile.

  For an NNX model inside linen (``nnx.bridge.ToLinen``), which builds a new
  instance on every call: each instance is tagged with paths under ``prefix``
  when called, and its statistics go to ``store``.
  """
  if not isinstance(root_class, type):
    raise ValueError(
        f'layers under {path_str(prefix)}: MAC can capture an NNX model in'
        ' linen (nnx.bridge.ToLinen) only when it is given as a class, not'
        f' as a factory ({root_class!r}).'
    )
  classes = [cls for cls in rules.rule_classes()
             if issubclass(cls, nnx.Module)]
  with _wrapping(classes + [root_class], tracker), (
      tracker.storing_to(store)), (
          _pushed(_THREAD.hosts, (root_class, prefix))):
    yield


class _Refuse:
  """The current 'tracker' where NNX layers must not run uncaptured."""


_REFUSE = _Refuse()


def refusing():
  """Makes calls of NNX layers that no capture tracks raise while active."""
  classes = [cls for cls in rules.rule_classes()
             if issubclass(cls, nnx.Module)]
  return _wrapping(classes, _REFUSE)
