"""Flax NNX capture of MAC's per-layer statistics.

The calls of the model's layers reach the tracker through
:mod:`~mac_optax._capture.nnx_hooks`; their statistics are stored in a
:class:`MacStats` variable that each module holds during the capture, so they
come out of NNX transforms such as ``nnx.scan`` stacked like the kernels.
That variable is MAC's own, not ``nnx.capture``'s storage, so a model's own
``nnx.capture(..., nnx.Intermediate)`` works around or inside a MAC capture.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Sequence

from flax import nnx

from mac_optax import _stats
from mac_optax._capture import common
from mac_optax._capture import nnx_hooks
from mac_optax._capture import rules
from mac_optax._capture import tracking

Path = _stats.Path
path_str = _stats.path_str
_STATS_ATTRIBUTE = '_mac_optax_stats'
# The key of a module's entries in its MacStats variable.
_ENTRIES = _stats.MEAN


class MacStats(nnx.Variable):
  """Per-call MAC statistics sown by NNX layers during a capture."""


def is_nnx(target: Any) -> bool:
  """Whether ``target`` is an NNX module or a bound method of one."""
  return isinstance(target, nnx.Module) or (
      inspect.ismethod(target) and isinstance(target.__self__, nnx.Module))


def _store_entry(module, path: Path, entry) -> None:
  """Keeps one call's statistics in the module's :class:`MacStats`."""
  storage = vars(module).get(_STATS_ATTRIBUTE)
  if not isinstance(storage, MacStats):
    raise ValueError(
        f'NNX layer {path_str(path)} ({type(module).__name__}) was called'
        ' during a capture but is not a module of the captured model as it'
        ' was when the capture began.'
    )
  storage[_ENTRIES] = (storage[_ENTRIES] if _ENTRIES in storage
                       else ()) + (entry,)


def kernel_owners(model: nnx.Module) -> list[tuple[Path, str]]:
  """``(path, class name)`` of the modules of ``model`` that own a kernel."""
  return [(tuple(path), type(module).__name__)
          for path, module in nnx.iter_modules(model)
          if isinstance(vars(module).get('kernel'), nnx.Variable)]


def capture_call(model: nnx.Module, fn: Callable[[], Any],
                 options: rules.Options,
                 survey: tracking.Survey | None = None):
  """Runs ``fn()`` capturing the statistics of ``model``'s layers.

  Returns:
    ``(fn(), mac_stats)``.
  """
  tracker = tracking.Tracker(options, _store_entry, survey)
  with nnx_hooks.tracking_model(model, tracker), _storing(model) as collect:
    outputs = fn()
    per_path = collect()
  stats = _stats.nest_nodes({path: _stats.merge_layer(entries)
                      for path, entries in per_path.items()})
  return outputs, stats


@contextlib.contextmanager
def _storing(model: nnx.Module):
  """Gives every module of ``model`` an empty :class:`MacStats` meanwhile.

  Yields a function returning the entries stored so far, by module path. A
  variable of the module's own (not ``nnx.capture``'s ``__captures__``, which
  an ``nnx.capture`` around or inside would replace), so NNX transforms carry
  it like any other state. What was there before (a capture of the same model
  around this one) is put back.
  """
  modules = list(nnx.iter_modules(model))
  before = [vars(module).get(_STATS_ATTRIBUTE) for _, module in modules]
  for _, module in modules:
    setattr(module, _STATS_ATTRIBUTE, MacStats({}))

  def collect() -> dict[Path, list]:
    per_path: dict[Path, list] = {}
    for path, module in modules:
      storage = vars(module).get(_STATS_ATTRIBUTE)
      if isinstance(storage, MacStats) and _ENTRIES in storage:
        per_path[tuple(path)] = list(storage[_ENTRIES])
    return per_path

  try:
    yield collect
  finally:
    for (_, module), previous in zip(modules, before):
      if previous is None:
        if _STATS_ATTRIBUTE in vars(module):
          delattr(module, _STATS_ATTRIBUTE)
      else:
        setattr(module, _STATS_ATTRIBUTE, previous)


class NNXCapture:
  """An NNX model (or bound method) that also returns MAC's statistics.

  Created by :func:`mac_optax.capture`; see there.
  """

  def __init__(self, target, options: rules.Options, allow_empty=False):
    self.target = target
    self.options = options
    self.allow_empty = allow_empty

  @property
  def model(self) -> nnx.Module:
    target = self.target
    return target if isinstance(target, nnx.Module) else target.__self__

  def bound_to(self, model: nnx.Module):
    """The same capture for another instance (e.g. a merged copy)."""
    target = model
    if not isinstance(self.target, nnx.Module):
      target = getattr(model, self.target.__name__)
    return NNXCapture(target, self.options, self.allow_empty)

  def __call__(self, *args, **kwargs):
    outputs, stats = self.run(None, *args, **kwargs)
    if not stats and not self.allow_empty:
      owners = kernel_owners(self.model)
      if owners:
        raise common.no_statistics_error(
            f'capture({type(self.model).__name__}) ran the model',
            [p for p, _ in owners], dict(owners))
    return outputs, stats

  def run(self, survey, *args, **kwargs):
    """Calls the model; ``survey`` (or None) collects layer facts."""
    return capture_call(self.model, lambda: self.target(*args, **kwargs),
                        self.options, survey)

  def trace(self, survey: tracking.Survey, args, kwargs):
    """Traces one call for ``find_layers``, shapes only.

    Returns:
      ``(mac_stats shapes, the model's Param state, [the model])``.
    """
    return eval_shape_with_models(
        lambda model: self.bound_to(model).run(survey, *args, **kwargs)[1],
        (self.model,), survey)


def models_among(args: Sequence[Any]) -> list[nnx.Module]:
  """The distinct NNX models among ``args``, in order."""
  models = []
  for arg in args:
    if isinstance(arg, nnx.Module) and all(arg is not m for m in models):
      models.append(arg)
  return models


def eval_shape_with_models(fn: Callable[..., Any], args: Sequence[Any],
                           survey: tracking.Survey):
  """``fn(*args)`` under ``common.eval_shape``; NNX models travel as state.

  The NNX models among ``args`` are split and merged again inside, so that
  their arrays are traced, not run; everything else is closed over, so no
  FLOPs are spent.

  Returns:
    ``(output shapes, the models' Param state or None, the models)``.
  """
  splits = {i: nnx.split(arg) for i, arg in enumerate(args)
            if isinstance(arg, nnx.Module)}

  def run(states):
    full = list(args)
    for i, (graphdef, _) in splits.items():
      full[i] = nnx.merge(graphdef, states[i])
    return fn(*full)

  outputs = common.eval_shape(
      run, {i: state for i, (_, state) in splits.items()}, survey=survey)
  models = [args[i] for i in splits]
  params = None
  if models:
    params = (nnx.state(models[0], nnx.Param) if len(models) == 1 else
              nnx.merge_state(*(nnx.state(m, nnx.Param) for m in models)))
  return outputs, params, models
