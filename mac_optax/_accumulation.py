"""Gradient accumulation that merges MAC's statistics like the gradients."""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mac_optax import _stats

path_str = _stats.path_str


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    mini_step: micro-batches accumulated since the last optimizer step (int32).
    gradient_step: optimizer steps taken, i.e. emitted updates (int32).
    inner_opt_state: the wrapped optimizer's state, advanced once per step.
    acc_grads: running mean of the micro-batch gradients.
    acc_stats: merged statistics of the micro-batches so far (a ``mac_stats``
      tree, fp32 means with their counts).
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  acc_stats: Any


def _zeros_like_stats(stats: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(np.shape(x), x.dtype), stats)


def _cast_like(tree: Any, like: Any) -> Any:
  return jax.tree.map(lambda x, y: jnp.asarray(x, jnp.result_type(y)), tree,
                      like)


def _check_mergeable(stats: Any, what: str) -> None:
  """Every layer needs its row count to be merged with the right weight."""

  def check(path, node):
    if _stats.ROWS not in node:
      raise ValueError(
          f'{what} for layer {path_str(path)} has no {_stats.ROWS!r} count,'
          ' so it cannot be merged with the right weight; pass the'
          ' statistics returned by mac_optax.capture unchanged.'
      )
    return node

  _stats.map_layers(check, stats)


def _check_like(stats: Any, example: Any) -> None:
  """The statistics of every micro-batch must match ``example_stats``."""
  got = dict(jax.tree_util.tree_leaves_with_path(stats))
  want = dict(jax.tree_util.tree_leaves_with_path(example))
  for key in sorted(set(got) | set(want), key=str):
    where = jax.tree_util.keystr(key)
    if key not in got:
      raise ValueError(
          f'mac_stats has no {where}, which example_stats has: every'
          ' micro-batch must produce statistics like example_stats.'
      )
    if key not in want:
      raise ValueError(
          f'mac_stats has {where}, which example_stats lacks: build'
          ' example_stats from a micro-batch of the shape you train on.'
      )
    if np.shape(got[key]) != np.shape(want[key]):
      raise ValueError(
          f'mac_stats{where} has shape {np.shape(got[key])}, example_stats'
          f' has {np.shape(want[key])}: micro-batches must have the shape'
          ' example_stats was built from (e.g. the same sequence length).'
      )


def _merge_into(stats: Any, accumulated: Any, first: jax.Array) -> Any:
  """Statistics of the micro-batches so far, in the accumulator's dtypes.

  The incoming tree goes first: non-mean fields (e.g. which statistic each
  block uses) are taken from it rather than from the zero-initialised carry.
  """
  merged = _stats.merge([stats, accumulated])
  return jax.tree.map(
      lambda new, both, old: jnp.where(first, new, both).astype(old.dtype),
      stats, merged, accumulated,
  )


def multi_steps(
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    *,
    example_stats: Any,
    accumulator_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates ``k`` micro-batches per step of a MAC optimizer.

  Like :class:`optax.MultiSteps`, each ``update`` takes one micro-batch's
  gradients and returns zeros until the ``k``-th, which returns the wrapped
  optimizer's update for the mean gradient. Unlike it, the micro-batches'
  ``mac_stats`` are merged too, exactly, each layer weighted by its row counts
  (:func:`merge_stats`), and the wrapped optimizer runs once per ``k``
  micro-batches, so MAC's step and EMA counters advance once per optimizer
  step. ``k`` micro-batches of ``B`` rows thus give the statistics, gradient
  and update of one batch of ``k B`` rows.

  Gradients are averaged with equal weight per micro-batch, as
  :class:`optax.MultiSteps` does (exact when each micro-batch loss is a mean
  over equally many examples). ``optax.MultiSteps`` itself cannot run MAC
  correctly (it keeps the inner state only on the last micro-batch, hence only
  its statistics), and :func:`scale_by_mac` raises when run by it.

  Args:
    opt: the optimizer to step, e.g. :func:`mac`; its ``update`` receives the
      merged ``mac_stats`` and any other extra arguments of the last
      micro-batch.
    every_k_schedule: ``k``, or a function of the optimizer step count
      returning it.
    example_stats: the statistics of one micro-batch, or their shapes, e.g.
      ``jax.eval_shape(apply_with_stats, variables, x)[1]``: the structure of
      the accumulator.
    accumulator_dtype: dtype of the gradient accumulator.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    ``update`` takes each micro-batch's ``mac_stats=``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> layers = mac_optax.find_layers(model.apply, {'params': params}, x)
    >>> apply_with_stats = mac_optax.capture(model.apply)
    >>> tx = mac_optax.multi_steps(
    ...     mac_optax.mac(0.1, layers=layers), 2,
    ...     example_stats=jax.eval_shape(apply_with_stats, {'params': params},
    ...                                  x[:2])[1])
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for half in (x[:2], x[2:]):
    ...   _, stats = apply_with_stats({'params': params}, half)
    ...   updates, state = tx.update(grads, state, params, mac_stats=stats)
    >>> # The statistic of all four rows: [3, 4] and the bias's 1.
    >>> print(state.inner_opt_state[0].mean_input.round(5))
    [3. 4. 1.]
  """
  opt = optax.with_extra_args_support(opt)
  if isinstance(every_k_schedule, (int, np.integer)):
    if every_k_schedule < 1:
      raise ValueError(
          f'every_k_schedule must be >= 1, got {every_k_schedule}.'
      )
    k_value = int(every_k_schedule)
    every_k = lambda _: k_value
  elif callable(every_k_schedule):
    every_k = every_k_schedule
  else:
    raise TypeError(
        'every_k_schedule must be an int or a function of the step count, got'
        f' {type(every_k_schedule).__name__}.'
    )
  _check_mergeable(example_stats, 'example_stats')
  zero_stats = _zeros_like_stats(example_stats)
  accumulator_dtype = jnp.dtype(accumulator_dtype)

  def _zeros_like_param(param):
    if not hasattr(param, 'shape') and not isinstance(param, numbers.Number):
      # optax.tree.map_params' placeholder for the params: kept, so that
      # state_sharding shards the accumulator like the params.
      return param
    return jnp.zeros(np.shape(param), accumulator_dtype)

  def init_fn(params):
    return MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=jnp.zeros([], jnp.int32),
        inner_opt_state=opt.init(params),
        acc_grads=jax.tree.map(_zeros_like_param, params),
        acc_stats=zero_stats,
    )

  def update_fn(updates, state, params=None, *, mac_stats=None, **extra_args):
    if mac_stats is None:
      raise ValueError(
          'multi_steps needs each micro-batch\'s statistics: call'
          ' tx.update(grads, state, params, mac_stats=stats).'
      )
    _check_like(mac_stats, example_stats)
    k = every_k(state.gradient_step)
    first = state.mini_step == 0
    emit = state.mini_step == k - 1
    # Running mean, as optax.MultiSteps: stable for long accumulations.
    acc_grads = jax.tree.map(
        lambda g, acc: acc + (g.astype(acc.dtype) - acc) / (state.mini_step + 1),
        updates, state.acc_grads,
    )
    acc_stats = _merge_into(mac_stats, state.acc_stats, first)

    def step(inner_state):
      new_updates, new_state = opt.update(
          _cast_like(acc_grads, updates), inner_state, params,
          mac_stats=acc_stats, **extra_args,
      )
      return _cast_like(new_updates, updates), _cast_like(new_state,
                                                          inner_state)

    def wait(inner_state):
      return jax.tree.map(jnp.zeros_like, updates), inner_state

    # Only the emitting micro-batch runs the optimizer (and MAC's refresh).
    new_updates, inner_state = jax.lax.cond(
        emit, step, wait, state.inner_opt_state
    )
    new_state = MultiStepsState(
        mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
        gradient_step=state.gradient_step + emit.astype(jnp.int32),
        inner_opt_state=inner_state,
        acc_grads=jax.tree.map(
            lambda acc: jnp.where(emit, jnp.zeros_like(acc), acc), acc_grads
        ),
        acc_stats=jax.tree.map(
            lambda acc: jnp.where(emit, jnp.zeros_like(acc), acc), acc_stats
        ),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stats_accumulator():
  """An ``optax.microbatching`` accumulator that merges ``mac_stats`` exactly.

  ``optax.microbatching.microbatch`` evaluates a function on micro-batches in
  a loop inside one step. Its ``MEAN`` accumulator averages every leaf with
  equal weight, which is wrong for statistics that are not plain means of
  equally many rows (the reference attention value statistic is a product of
  two means). This accumulator merges them like :func:`merge_stats`.

  Returns:
    An ``optax.microbatching.Accumulator``; use it for the statistics part of
    the accumulator tree, e.g. ``accumulator=((MEAN, stats_accumulator()),
    MEAN)`` for ``value_and_grad(loss_fn, has_aux=True)`` returning
    ``((loss, stats), grads)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = model.init(jax.random.key(0), x)
    >>> apply_with_stats = mac_optax.capture(model.apply)
    >>> stats_of = optax.microbatching.microbatch(
    ...     lambda x: apply_with_stats(variables, x)[1], argnums=0,
    ...     microbatch_size=2, accumulator=mac_optax.stats_accumulator())
    >>> stats_of(x)['mean_input']
    Array([3., 4., 1.], dtype=float32)
  """
  microbatching = getattr(optax, 'microbatching', None)
  if microbatching is None:
    raise ImportError(
        'stats_accumulator needs optax.microbatching (optax >= 0.2.6).'
    )

  def update(carry, value, index):
    return _merge_into(value, carry, jnp.asarray(index) == 0)

  def aggregate(values):
    def body(carry, indexed):
      index, value = indexed
      return update(carry, value, index), None

    first = jax.tree.map(lambda x: x[0], values)
    count = jax.tree.leaves(values)[0].shape[0]
    carry, _ = jax.lax.scan(
        body, _zeros_like_stats(first), (jnp.arange(count), values)
    )
    return carry

  return microbatching.Accumulator(
      init=_zeros_like_stats,
      update=update,
      finalize=lambda carry: carry,
      aggregate=aggregate,
  )
