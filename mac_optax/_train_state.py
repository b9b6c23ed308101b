"""Training with ``flax.training.train_state.TrainState``.

Flax's ``TrainState.apply_gradients(*, grads, **kwargs)`` calls
``tx.update(grads, opt_state, params)`` with no further arguments (its keyword
arguments replace fields of the state), so MAC's statistics cannot reach the
optimizer through it. :class:`TrainState` is the same state whose
``apply_gradients`` also takes ``mac_stats=``; :class:`TrainStateMixin` adds
that method to a ``TrainState`` subclass the user already has, and
:func:`apply_gradients` is the same step as a function of any such state.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax.linen import fp8_ops
from flax.training import train_state
import optax

# Flax's fp8 layers keep some variables under this key of the params; the
# optimizer never sees them and their "gradient" is their new value.
_OVERWRITE_WITH_GRADIENT = fp8_ops.OVERWRITE_WITH_GRADIENT
_STEP_FIELDS = ('step', 'params', 'opt_state')


def apply_gradients(
    state: Any,
    *,
    grads: Any,
    mac_stats: Any = None,
    update_args: Mapping[str, Any] | None = None,
    **changes: Any,
) -> Any:
  """One optimizer step of a flax ``TrainState``, with MAC's statistics.

  The same step as flax's ``TrainState.apply_gradients``: ``step`` grows by
  one, ``params`` and ``opt_state`` become those of ``state.tx.update``
  followed by ``optax.apply_updates``, and ``changes`` replace other fields
  (e.g. ``batch_stats``). Parameters kept under flax's fp8
  ``'_overwrite_with_gradient'`` key are set to their gradient and hidden
  from the optimizer, as flax does. The difference: ``mac_stats`` (and any
  ``update_args``) are passed on to ``tx.update`` as keyword arguments.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or any subclass, or any
      dataclass with ``step``, ``params``, ``tx``, ``opt_state`` and
      ``replace``).
    grads: gradients shaped like ``state.params``.
    mac_stats: the statistics returned by :func:`capture` (or
      :func:`recording`, :func:`with_stats`) for this batch. None passes
      nothing, for optimizers without MAC.
    update_args: further keyword arguments of ``tx.update`` (e.g. ``value=``
      for ``optax.contrib.reduce_on_plateau``).
    **changes: other fields of ``state`` to replace, as in flax.

  Returns:
    The updated state.

  Raises:
    TypeError: when ``changes`` name ``step``, ``params`` or ``opt_state``
      (the step sets them), or ``update_args`` holds ``mac_stats``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> layers = mac_optax.find_layers(model.apply, {'params': params}, x)
    >>> state = mac_optax.TrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=mac_optax.mac(0.1, layers=layers))
    >>> def loss_fn(params):
    ...   y, stats = mac_optax.capture(state.apply_fn)({'params': params}, x)
    ...   return jnp.mean(y ** 2), stats
    >>> grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    >>> state = state.apply_gradients(grads=grads, mac_stats=stats)
    >>> int(state.step)
    1
  """
  clashes = sorted(set(changes) & set(_STEP_FIELDS))
  if clashes:
    raise TypeError(
        f'apply_gradients sets {", ".join(clashes)} itself; it cannot also'
        ' replace them (pass only other fields of the state, such as'
        ' batch_stats=).'
    )
  update_kwargs = dict(update_args or {})
  if mac_stats is not None:
    if 'mac_stats' in update_kwargs:
      raise TypeError(
          'apply_gradients got mac_stats both as an argument and in'
          ' update_args; pass it once.'
      )
    update_kwargs['mac_stats'] = mac_stats

  fp8_params = (isinstance(grads, Mapping)
                and _OVERWRITE_WITH_GRADIENT in grads)
  if fp8_params:
    optimized_grads, optimized_params = grads['params'], state.params['params']
  else:
    optimized_grads, optimized_params = grads, state.params
  updates, opt_state = state.tx.update(
      optimized_grads, state.opt_state, optimized_params, **update_kwargs)
  params = optax.apply_updates(optimized_params, updates)
  if fp8_params:
    params = {
        'params': params,
        _OVERWRITE_WITH_GRADIENT: grads[_OVERWRITE_WITH_GRADIENT],
    }
  return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, **changes)


class TrainStateMixin:
  """Gives a flax ``TrainState`` subclass an ``apply_gradients`` taking stats.

  Put it first among the bases of a state class you already have::

    class TrainState(mac_optax.TrainStateMixin, train_state.TrainState):
      batch_stats: Any

  Its ``apply_gradients`` is :func:`apply_gradients`.
  """

  def apply_gradients(self, *, grads, mac_stats=None, update_args=None,
                      **changes):
    """Steps the optimizer; see :func:`mac_optax.apply_gradients`.

    Args:
      grads: gradients shaped like ``params``.
      mac_stats: this batch's statistics, passed to ``tx.update``.
      update_args: further keyword arguments of ``tx.update``.
      **changes: other fields to replace (e.g. ``batch_stats=``).

    Returns:
      The updated state.
    """
    return apply_gradients(self, grads=grads, mac_stats=mac_stats,
                           update_args=update_args, **changes)


class TrainState(TrainStateMixin, train_state.TrainState):
  """Flax's ``TrainState`` whose ``apply_gradients`` takes ``mac_stats=``.

  ``TrainState.create(apply_fn=..., params=..., tx=mac_optax.mac(...))`` as in
  flax, then ``state.apply_gradients(grads=grads, mac_stats=stats)``.
  Everything else, including subclassing it to add fields such as
  ``batch_stats``, is flax's ``TrainState``.
  """
