"""Flax NNX capture of MAC's per-layer statistics.

NNX has no method interceptor, so while a capture runs, the ``__call__`` of
every module class in the model that has a rule (and of the norms that
attention rules name) is wrapped. The wrapper hands the call to the same
:class:`~mac_optax._tracking.Tracker` that linen uses; statistics are sown as
:class:`MacStats` variables and collected with ``nnx.capture``, so they come
out of NNX transforms such as ``nnx.scan`` stacked like the kernels. Every
module is tagged with its path first, as a plain attribute that the copies NNX
transforms make keep.

The wrapping affects the classes process-wide while a capture runs: do not run
captures from several Python threads at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator, Mapping

from flax import nnx

from mac_optax import _capture
from mac_optax import _rules
from mac_optax import _stats
from mac_optax import _tracking

Path = _stats.Path
path_str = _stats.path_str
_PATH_ATTRIBUTE = '_mac_optax_path'
_TRACKERS: list[_tracking.Tracker] = []


class MacStats(nnx.Variable):
  """Per-call MAC statistics sown by NNX layers during a capture."""


def is_nnx(target: Any) -> bool:
  """Whether ``target`` is an NNX module or a bound method of one."""
  return isinstance(target, nnx.Module) or (
      inspect.ismethod(target) and isinstance(target.__self__, nnx.Module))


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


def _record(module, path: Path, entry) -> None:
  if not module.sow(MacStats, _capture.STAT_NAME, entry):
    raise ValueError(
        f'NNX layer {path_str(path)} ({type(module).__name__}) was called'
        ' during a capture but outside nnx.capture.'
    )


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


def _wrapped_call(original: Callable[..., Any]) -> Callable[..., Any]:

  @functools.wraps(original)
  def __call__(self, *args, **kwargs):
    tracker = _TRACKERS[-1] if _TRACKERS else None
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
    attention = _rules.attention_rule_of(self)
    if attention is not None:
      return _attention(tracker, self, path, attention, bound, original)
    run = lambda: original(*bound.args, **bound.kwargs)
    rule = _rules.rule_of(self)
    if rule is None:
      return tracker.other_call(self, path, run)
    inputs = list(bound.arguments.values())[1]
    return tracker.layer_call(self, path, rule, bound.arguments, inputs, run)

  __call__.mac_optax_original = original
  return __call__


def _classes_to_wrap(modules) -> set[type]:
  classes = set()
  by_path = dict(modules)
  for path, module in modules:
    if _rules.rule_of(module) is not None:
      classes.add(type(module))
    rule = _rules.attention_rule_of(module)
    if rule is not None:
      classes.add(type(module))
      for role in ('query_norm', 'key_norm'):
        name = getattr(rule, role)
        child = by_path.get(tuple(path) + _rules.as_path(name)) if name else None
        if child is not None:
          classes.add(type(child))
  return classes


@contextlib.contextmanager
def _wrapping(classes, tracker) -> Iterator[None]:
  """Wraps ``__call__`` of ``classes`` and makes ``tracker`` current."""
  wrapped = []
  for cls in classes:
    current = cls.__call__
    if not hasattr(current, 'mac_optax_original'):
      own = cls.__dict__.get('__call__')
      setattr(cls, '__call__', _wrapped_call(current))
      wrapped.append((cls, own))
  _TRACKERS.append(tracker)
  try:
    yield
  finally:
    _TRACKERS.pop()
    for cls, own in reversed(wrapped):
      if own is None:
        delattr(cls, '__call__')
      else:
        setattr(cls, '__call__', own)


@contextlib.contextmanager
def tracking(model: nnx.Module, tracker: _tracking.Tracker) -> Iterator[None]:
  """Routes the NNX module calls of ``model`` to ``tracker`` while active."""
  modules = list(nnx.iter_modules(model))
  for path, module in modules:
    object.__setattr__(module, _PATH_ATTRIBUTE, tuple(path))
  try:
    with _wrapping(_classes_to_wrap(modules), tracker):
      yield
  finally:
    for _, module in modules:
      if _PATH_ATTRIBUTE in vars(module):
        object.__delattr__(module, _PATH_ATTRIBUTE)


@contextlib.contextmanager
def hosted(root_class, prefix: Path, tracker: _tracking.Tracker,
           record: Callable[[Any, Path, dict], None]) -> Iterator[None]:
  """Tracks NNX models of ``root_class`` created and called meanwhile.

  For an NNX model inside linen (``nnx.bridge.ToLinen``), which builds a new
  instance on every call: each instance is tagged with paths under ``prefix``
  when called, and its statistics go to ``record``.
  """
  if not isinstance(root_class, type):
    raise ValueError(
        f'layers under {path_str(prefix)}: MAC can capture an NNX model in'
        ' linen (nnx.bridge.ToLinen) only when it is given as a class, not'
        f' as a factory ({root_class!r}).'
    )
  classes = [cls for cls in _rules.rule_classes()
             if issubclass(cls, nnx.Module)]
  with _wrapping(classes, tracker), tracker.recording_to(record):
    inner_call = root_class.__call__
    own = root_class.__dict__.get('__call__')

    @functools.wraps(inner_call)
    def tagging_call(self, *args, **kwargs):
      modules = list(nnx.iter_modules(self))
      for path, module in modules:
        object.__setattr__(module, _PATH_ATTRIBUTE, prefix + tuple(path))
      try:
        return inner_call(self, *args, **kwargs)
      finally:
        for _, module in modules:
          object.__delattr__(module, _PATH_ATTRIBUTE)

    root_class.__call__ = tagging_call
    try:
      yield
    finally:
      if own is None:
        delattr(root_class, '__call__')
      else:
        root_class.__call__ = own


class _Refuse:
  """The current 'tracker' where NNX layers must not run uncaptured."""


_REFUSE = _Refuse()


def refusing():
  """Makes calls of NNX layers that no capture tracks raise while active."""
  classes = [cls for cls in _rules.rule_classes()
             if issubclass(cls, nnx.Module)]
  return _wrapping(classes, _REFUSE)


def capture_call(model: nnx.Module, fn: Callable[[], Any],
                 options: _rules.Options, recorder=None):
  """Runs ``fn()`` capturing the statistics of ``model``'s layers.

  Returns:
    ``(fn(), mac_stats)``.
  """
  tracker = _tracking.Tracker(options, _record, recorder)
  with tracking(model, tracker):
    outputs, captured = nnx.capture(lambda _: fn(), MacStats)(model)
  per_path: dict[Path, list] = {}
  _collect(captured, (), per_path)
  stats = _stats.nest({path: _stats.merge_layer(entries)
                         for path, entries in per_path.items()})
  return outputs, stats


def _collect(state: Any, path: Path, per_path: dict[Path, list]) -> None:
  for key, value in state.items():
    if isinstance(value, nnx.Variable):
      if key == _capture.STAT_NAME:
        per_path.setdefault(path, []).extend(value.get_value())
    elif isinstance(value, Mapping):
      _collect(value, path + (key,), per_path)


class NNXCapture:
  """An NNX model (or bound method) that also returns MAC's statistics.

  Created by :func:`mac_optax.capture`; see there.
  """

  def __init__(self, target, *, attention_aware=True, value_stat='reference',
               depthwise_shared=True):
    self.target = target
    self.options = _rules.Options(attention_aware, value_stat,
                                  depthwise_shared)
    if value_stat not in _tracking.VALUE_STATS:
      raise ValueError(
          f'value_stat must be one of {_tracking.VALUE_STATS}, got'
          f' {value_stat!r}.'
      )

  @property
  def model(self) -> nnx.Module:
    target = self.target
    return target if isinstance(target, nnx.Module) else target.__self__

  def bound_to(self, model: nnx.Module):
    """The same capture for another instance (e.g. a merged copy)."""
    target = model
    if not isinstance(self.target, nnx.Module):
      target = getattr(model, self.target.__name__)
    return NNXCapture(target, **self._options_dict())

  def _options_dict(self):
    return dict(attention_aware=self.options.attention_aware,
                value_stat=self.options.value_stat,
                depthwise_shared=self.options.depthwise_shared)

  def __call__(self, *args, **kwargs):
    return self.run(None, *args, **kwargs)

  def run(self, recorder, *args, **kwargs):
    """Calls the model; ``recorder`` (or None) collects layer facts."""
    return capture_call(self.model, lambda: self.target(*args, **kwargs),
                        self.options, recorder)
