"""MAC's preconditioner as an optax gradient transformation."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mac_optax import _batching
from mac_optax import _ema
from mac_optax import _geometry
from mac_optax import _hyperparameters
from mac_optax import _preconditioner
from mac_optax import _sharding
from mac_optax import _stats

Path = _geometry.Path
path_str = _geometry.path_str
MAX_STATISTIC = _ema.MAX_STATISTIC
MIN_DAMPING = _hyperparameters.MIN_DAMPING


class ScaleByMacState(NamedTuple):
  """State of :func:`scale_by_mac`.

  The per-layer fields are dicts nested by module path, like the params
  (``state.mean_input['block0']['fc1']``); a model that is a single layer has
  the array itself.

  Attributes:
    count: steps taken, ``t`` (int32).
    stat_count: capture steps so far, ``k`` (int32); bias correction divides
      by ``1 - stat_decay**k`` (less a layer's skipped captures).
    mean_input_ema: per layer, the EMA of the mean input, shaped like its
      statistic (fp32).
    mean_input: per layer, the bias-corrected EMA as of the last refresh,
      the ``â`` the preconditioner uses (fp32).
    skipped_captures: per layer, how many capture steps were skipped because
      that layer's statistic was not usable (int32).
  """

  count: jax.Array
  stat_count: jax.Array
  mean_input_ema: Any
  mean_input: Any
  skipped_captures: Any


def _reject_optax_multisteps() -> None:
  """Raises when an ``optax.MultiSteps`` is calling this update.

  MultiSteps runs the inner update on every micro-batch but keeps the inner
  state only on the last one, so MAC would see only the last micro-batch's
  statistics. It calls the inner update from its own methods, so one of the
  calling frames has the MultiSteps instance as ``self``.
  """
  # The frames are the only signal: MultiSteps passes the extra arguments
  # through unchanged and hands the inner update nothing that names its
  # caller. Under jax.jit this Python runs once per trace, not per step.
  frame = inspect.currentframe()
  try:
    while frame is not None:
      if isinstance(frame.f_locals.get('self'), optax.MultiSteps):
        raise ValueError(
            'scale_by_mac is being run by optax.MultiSteps, which keeps only'
            ' the last micro-batch\'s statistics and would silently'
            ' precondition with them. Use mac_optax.multi_steps(tx, k,'
            ' example_stats=...) instead: it merges every micro-batch\'s'
            ' statistics, weighted by rows, and steps MAC once per k'
            ' micro-batches.'
        )
      frame = frame.f_back
  finally:
    del frame


def _layer_state(layers: _geometry.Layers,
                 state: ScaleByMacState) -> dict[Path, _ema.LayerEma]:
  """Each layer's part of ``state``, checked against ``layers``."""
  another = (': the state was built (or restored) for another model, or'
             ' `layers` for another one.')
  fields = {name: dict(_geometry.leaf_paths(getattr(state, name)))
            for name in ('mean_input_ema', 'mean_input', 'skipped_captures')}
  emas = fields['mean_input_ema']
  for name, flat in fields.items():
    for path, value in flat.items():
      if path not in layers:
        raise ValueError(
            f'the optimizer state has a {name} for {path_str(path)}, which is'
            f' not a layer of `layers` (known: {layers.known()}){another}')
      spec = layers[path]
      expected = () if name == 'skipped_captures' else spec.stat_shape
      if tuple(np.shape(value)) != expected:
        raise ValueError(
            f'the optimizer state\'s {name} for layer {path_str(path)}'
            f' ({spec.module}) has shape {tuple(np.shape(value))}, but'
            f' `layers` gives the layer a statistic of shape {expected}'
            f'{another}')
    if set(flat) != set(emas):
      odd = sorted(map(path_str, set(flat) ^ set(emas)))
      raise ValueError(
          f'the optimizer state\'s {name} and mean_input_ema differ in the'
          f' layers {", ".join(odd)}; the state is not one scale_by_mac built.')
  return {path: _ema.LayerEma(emas[path], fields['mean_input'][path],
                              fields['skipped_captures'][path])
          for path in emas}


def _checked_statistics(layers: _geometry.Layers, mac_stats: Any,
                        paths) -> dict[Path, jax.Array]:
  """The mean inputs of ``mac_stats``; every layer of ``paths`` must have one.

  Statistics of layers that another transform preconditions
  (``layers.handled_elsewhere``) are left out.
  """
  stats = {path: stat for path, stat in _stats.mean_inputs(mac_stats).items()
           if path not in layers.handled_elsewhere}
  for path, stat in stats.items():
    spec = layers.require(path, 'mac_stats has a statistic')
    dtype = jnp.result_type(stat)
    if not jnp.issubdtype(dtype, jnp.floating):
      # An integer mean would be truncated, a complex one is meaningless.
      raise ValueError(
          f'mac_stats for layer {path_str(path)} ({spec.module}) has dtype'
          f' {jnp.dtype(dtype).name}; statistics are float means, as'
          ' mac_optax.capture returns them.'
      )
  for path in paths:
    spec = layers[path]
    if path not in stats:
      raise ValueError(
          f'mac_stats has no statistic for layer {path_str(path)}'
          f' ({spec.module}); expected mean_input of shape'
          f' {spec.stat_shape}.'
      )
    if tuple(np.shape(stats[path])) != spec.stat_shape:
      raise ValueError(
          f'mac_stats for layer {path_str(path)} ({spec.module}) has shape'
          f' {tuple(np.shape(stats[path]))}, expected {spec.stat_shape}.'
      )
  return stats


def _check_unlisted_kernels(layers: _geometry.Layers, params: Any) -> None:
  """Every kernel in ``params`` belongs to a module ``find_layers`` saw.

  A kernel under a module path that the traced forward pass never reached
  means ``layers`` was found on another model (a shallower one with the same
  path names would leave the extra layers unpreconditioned without a word).
  ``Layers`` built without module records (by hand) are not checked.
  """
  if not layers.modules:
    return
  for path, leaf in _geometry.leaf_paths(params):
    if not path or path[-1] != 'kernel' or isinstance(leaf, optax.MaskedNode):
      continue
    module_path = path[:-1]
    if module_path in layers or module_path in layers.modules:
      continue
    raise ValueError(
        f'params has a kernel at {path_str(path)}, but the forward pass that'
        f' find_layers traced never reached a module {path_str(module_path)}:'
        ' `layers` was found on another model (or with arguments that skip'
        ' this module). Call find_layers on the model you train, with the'
        ' arguments of a training step; a module that training deliberately'
        ' never calls can be left out of MAC with optax.masked or'
        ' optax.partition.'
    )


def _step_layers(layers, gradients, stats, counts, previous, clock, decay,
                 damping, scale):
  """Every layer's EMA step and preconditioned gradient.

  Returns:
    ``({path: LayerEma}, {path: (kernel, bias)})``.
  """
  def layer_step(inputs):
    stat, layer_counts, old, grad, bias_grad = inputs
    new = _ema.layer_step(stat, layer_counts, old, clock, decay)
    a = new.mean_input.reshape(grad.shape[0], grad.shape[2], -1)
    return new, _preconditioner.rank_one_update(grad, bias_grad, a, damping,
                                                scale)

  inputs, explicit = {}, []
  for path, (kernel, bias) in gradients.items():
    # Replicated like the EMA: statistics made outside capture may be
    # sharded over Explicit mesh axes, and where() needs one sharding.
    stat = _sharding.replicated(stats[path]).astype(jnp.float32)
    layer_counts = list(counts.get(path, ()))
    if _sharding.is_explicit(kernel, bias):
      explicit.append(path)
      inputs[path] = (stat, layer_counts, previous[path])
    else:
      inputs[path] = (stat, layer_counts, previous[path],
                      *_preconditioner.to_blocks(kernel, bias, layers[path]))
  # Explicitly sharded gradients (FSDP, tensor parallelism) cannot be stacked
  # with others of another sharding: they go one by one.
  new = {path: _ema.layer_step(*inputs.pop(path), clock, decay)
         for path in explicit}
  preconditioned = {
      path: _preconditioner.precondition(
          *gradients[path], new[path].mean_input, layers[path], damping, scale)
      for path in explicit}
  for path, (state, blocks) in _batching.map_groups(layer_step,
                                                    inputs).items():
    new[path] = state
    preconditioned[path] = _preconditioner.from_blocks(
        *blocks, *gradients[path], layers[path])
  return new, preconditioned


def _clock(state: ScaleByMacState, t_cov, t_inv) -> _ema.Clock:
  capture_now = state.count % _hyperparameters.guarded_period(t_cov) == 0
  return _ema.Clock(
      capture_now=capture_now,
      refresh_now=state.count % _hyperparameters.guarded_period(t_inv) == 0,
      stat_count=state.stat_count + capture_now.astype(jnp.int32))


def scale_by_mac(
    layers: _geometry.Layers,
    damping: jax.typing.ArrayLike = 1.0,
    stat_decay: jax.typing.ArrayLike = 0.95,
    t_cov: jax.typing.ArrayLike = 5,
    t_inv: jax.typing.ArrayLike = 50,
    *,
    scale: _preconditioner.Scale = 'damping',
    allow_missing_stats: bool = False,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each layer's gradient with its mean input activation.

  For every layer in ``layers`` (kernel and bias jointly, the bias as the last
  input coordinate) the gradient becomes

  .. math::
    \hat G \leftarrow \hat G - \frac{\hat a\,(\hat a^\top \hat G)}
      {\lambda + \|\hat a\|^2},

  the damped rank-one inverse :math:`\lambda(\hat a \hat a^\top +
  \lambda I)^{-1}` of the authors' code, applied matrix-free in ``O(d m)``.
  Other parameters pass through unchanged.

  The timeline follows the reference exactly. At step :math:`t` (counting from
  0): if :math:`t \bmod T_{cov} = 0` the EMA
  :math:`m \leftarrow \beta m + (1-\beta) \bar a` takes this step's statistic
  and :math:`k \leftarrow k + 1`; if :math:`t \bmod T_{inv} = 0` the
  preconditioner is refreshed to :math:`\hat a = m / (1 - \beta^k)`, and it is
  used unchanged until the next refresh. Both happen at :math:`t = 0`, where
  :math:`\hat a` is exactly the first batch's statistic.

  A layer whose statistic is not finite (NaN or Inf), has an entry beyond
  ``MAX_STATISTIC`` (1e24) in magnitude, or saw no rows (an empty batch,
  attention with every query masked) on a capture step skips that capture:
  its EMA keeps its previous value and the capture is not counted in its bias
  correction (``skipped_captures`` in the state), so one bad batch cannot
  poison the EMA for the rest of training. The preconditioner's arithmetic
  is finite for any finite statistic (it rescales :math:`\hat a` by a power
  of two before squaring, which changes no rounding).

  Layers that :func:`scale_by_second_moments` preconditions instead (the
  reference's first-layer factor; :func:`mac` chains the two) are taken out
  with ``layers.without(paths)``; their statistics are then ignored.

  Statistics are the ``mac_stats`` extra argument of ``update``, as returned by
  :func:`capture`. Pass them on every step; steps that are not capture steps
  ignore them.

  Args:
    layers: the preconditioned layers, from :func:`find_layers`. Empty
      ``layers`` are refused (nothing would be preconditioned) unless found
      with ``allow_empty=True``. ``init`` checks them against the params both
      ways: every layer's kernel is there, and every kernel belongs to a
      module the traced forward pass reached. Parameters may be boxed
      (``nn.with_logical_partitioning``, NNX ``Variable``\ s): updates keep
      their boxes.
    damping: :math:`\lambda > 0`, a scalar. Checked when concrete; an
      injected (traced) value below ``MIN_DAMPING`` (1e-20), or NaN, acts as
      ``MIN_DAMPING``.
    stat_decay: :math:`\beta \in [0, 1)`. Checked when concrete; an
      injected value is clamped into :math:`[0, 1 - 2^{-24}]` (NaN acts as
      0).
    t_cov: statistics period :math:`T_{cov}`, a positive integer (an
      injected value below 1 acts as 1).
    t_inv: preconditioner refresh period :math:`T_{inv}` (likewise).
    scale: ``'damping'`` (the authors' :math:`\lambda`-scaled inverse, whose
      eigenvalues lie in :math:`(0, 1]`) or ``'unit'`` (the damped inverse
      :math:`(\hat a \hat a^\top + \lambda I)^{-1}`, i.e. divided by
      :math:`\lambda`). The earlier names ``'reference'`` and ``'exact'`` are
      still accepted.
    allow_missing_stats: if True, ``update`` without ``mac_stats`` passes the
      gradient through unchanged (only for generic optax test batteries). By
      default it raises.
    axis_name: under ``shard_map`` or ``pmap``, the data-parallel axis name
      (or tuple of names): the incoming statistics are merged over it (each
      mean weighted by its row count, see :func:`all_reduce_stats`) before use,
      so that every replica preconditions with the global-batch statistic.
      Leave it None under ``jax.jit`` with sharded inputs, where the
      statistics already are global.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    ``update`` takes ``mac_stats=`` as a keyword argument.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> layers = mac_optax.find_layers(model.apply, {'params': params}, x)
    >>> tx = mac_optax.scale_by_mac(layers, damping=1.0)
    >>> state = tx.init(params)
    >>> y, stats = mac_optax.capture(model.apply)({'params': params}, x)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, mac_stats=stats)
    >>> # â = [2, 3, 1]: 1 - (2 + 3 + 1) / (1 + 2**2 + 3**2 + 1**2) = 0.6
    >>> bool(jnp.allclose(updates['bias'], 0.6))
    True

  References:
    Seung, Lee and Ko, `MAC: An Efficient Gradient Preconditioning using Mean
    Activation Approximated Curvature <https://arxiv.org/abs/2506.08464>`_,
    ICDM 2025.
  """
  if not isinstance(layers, Mapping):
    raise TypeError(
        'layers must come from mac_optax.find_layers(model.apply, variables,'
        f' *example_inputs), got {type(layers).__name__}.'
    )
  if not layers and not getattr(layers, 'allow_empty', False):
    raise ValueError(
        '`layers` is empty: find_layers found no layer that MAC can'
        ' precondition, so this optimizer would train as plain SGD with'
        ' momentum. mac_optax.summary(layers, params) says why each'
        ' parameter is left out; custom layers need'
        ' mac_optax.register_layer / register_attention. To train without'
        ' preconditioning anyway, call find_layers(..., allow_empty=True).'
    )
  scale = _preconditioner.check_scale('scale', scale)
  _hyperparameters.check(damping, stat_decay, t_cov, t_inv)

  def init_fn(params):
    if not isinstance(params, Mapping):
      placeholder = _geometry.PerLayerFields()
      return ScaleByMacState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                             placeholder, placeholder, placeholder)
    active = _geometry.active_layers(layers, params)
    _check_unlisted_kernels(layers, params)

    def per_layer(make):
      return _geometry.nest_per_layer(
          {path: make(spec) for path, spec in active.items()})

    return ScaleByMacState(
        count=jnp.zeros([], jnp.int32),
        stat_count=jnp.zeros([], jnp.int32),
        mean_input_ema=per_layer(
            lambda spec: jnp.zeros(spec.stat_shape, jnp.float32)),
        mean_input=per_layer(
            lambda spec: jnp.zeros(spec.stat_shape, jnp.float32)),
        skipped_captures=per_layer(lambda _: jnp.zeros([], jnp.int32)),
    )

  def reduce_stats(mac_stats):
    try:
      return _stats.all_reduce(mac_stats, axis_name)
    except NameError as error:
      raise ValueError(
          f'scale_by_mac(axis_name={axis_name!r}) merges the statistics over'
          ' that axis, so its update must run inside shard_map or pmap with'
          ' that axis name. Under jax.jit with sharded inputs the statistics'
          ' already are global: leave axis_name=None.'
      ) from error

  def update_fn(updates, state, params=None, *, mac_stats=None, **extra_args):
    del params, extra_args
    _reject_optax_multisteps()
    if mac_stats is None:
      if allow_missing_stats:
        return updates, state._replace(count=optax.safe_increment(state.count))
      raise ValueError(
          'scale_by_mac needs the layer statistics: call'
          ' tx.update(grads, state, params, mac_stats=stats) with the stats'
          ' returned by mac_optax.capture(model.apply). With flax\'s'
          ' TrainState, use mac_optax.TrainState (or TrainStateMixin) and'
          ' state.apply_gradients(grads=grads, mac_stats=stats).'
      )
    previous = _layer_state(layers, state)
    stats = _checked_statistics(layers, mac_stats, previous)
    if axis_name is not None:
      mac_stats = reduce_stats(mac_stats)
      stats = _stats.mean_inputs(mac_stats)
    clock = _clock(state, t_cov, t_inv)
    new, preconditioned = _step_layers(
        layers, _geometry.layer_gradients(updates, previous, layers), stats,
        _stats.row_counts(mac_stats), previous, clock,
        _hyperparameters.guarded_decay(stat_decay),
        _hyperparameters.guarded_damping(damping), scale)
    new_state = ScaleByMacState(
        count=optax.safe_increment(state.count),
        stat_count=clock.stat_count,
        **{name: _geometry.nest_per_layer(
            {path: layer[i] for path, layer in new.items()})
           for i, name in enumerate(('mean_input_ema', 'mean_input',
                                     'skipped_captures'))})
    return _geometry.replace_layer_gradients(updates, preconditioned), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
