"""``flax.linen.Module.apply``, routed per thread while a capture needs it.

A function that calls ``model.apply`` somewhere inside (a wrapper, someone
else's training code) is captured through ``nn.Module.apply`` itself: while a
capture runs, the class attribute is a dispatcher that hands each call made in
the capturing thread to that thread's handler, and every other call to the
original. The dispatcher is installed once for all threads and removed when
the last capture ends; flax keeps its interceptors per thread, so captures in
several threads do not meet.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, Iterator

import flax.linen as nn
from flax.core import tracers as flax_tracers

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


def unjit(function):
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
