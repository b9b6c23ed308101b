"""Flax linen capture of MAC's per-layer statistics.

A ``flax.linen.intercept_methods`` interceptor sees the input of every
``Dense``, ``DenseGeneral`` and ``Conv`` call and sows its mean input row (the
mean im2col patch for convolutions) into the ``'mac_stats'`` collection, at the
layer's own module path, so that the statistics line up with the params tree.
Around ``MultiHeadDotProductAttention`` it also collects the model's attention
probabilities and replaces the ``value`` layer's statistic with the
attention-weighted mean input.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
from flax.core import scope as flax_scope
import jax
import jax.numpy as jnp
import numpy as np

from mac_optax import _conv
from mac_optax import _stats

STATS_COLLECTION = 'mac_stats'
STAT_NAME = _stats.MEAN
_WEIGHTS_COLLECTION = 'intermediates'
_WEIGHTS_NAME = 'attention_weights'
_VALUE_STATS = ('reference', 'per_head')

Path = _stats.Path
path_str = _stats.path_str


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """What one intercepted call says about a preconditioned layer."""

  kind: str
  module: str
  in_shape: tuple[int, ...]
  blocks: int
  has_bias: bool


@dataclasses.dataclass
class Recorder:
  """Collects, at trace time, what the interceptor saw (for ``find_layers``)."""

  layers: dict[Path, LayerCall] = dataclasses.field(default_factory=dict)
  modules: dict[Path, str] = dataclasses.field(default_factory=dict)
  unsupported: dict[Path, str] = dataclasses.field(default_factory=dict)

  def layer(self, path: Path, call: LayerCall) -> None:
    previous = self.layers.setdefault(path, call)
    if previous != call:
      raise ValueError(
          f'layer {path_str(path)} is called with inconsistent geometry:'
          f' {previous} vs {call}.'
      )


@dataclasses.dataclass
class _AttentionFrame:
  module: nn.Module
  path: Path
  outputs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  value_inputs: jax.Array | None = None
  value_module: nn.Module | None = None


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


def _with_bias(stat: jax.Array, has_bias: bool) -> jax.Array:
  if not has_bias:
    return stat
  return jnp.concatenate([stat, jnp.ones(stat.shape[:-1] + (1,), stat.dtype)], -1)


def _dense_stat(inputs: jax.Array, n_axes: int, axes=None):
  """Mean input row over all non-contracted axes, contracted axes flattened."""
  if axes is not None:
    inputs = jnp.moveaxis(inputs, axes, tuple(range(-n_axes, 0)))
  in_shape = inputs.shape[inputs.ndim - n_axes :]
  rows = int(np.prod(inputs.shape[: inputs.ndim - n_axes], dtype=np.int64))
  flat = inputs.reshape((rows, int(np.prod(in_shape, dtype=np.int64))))
  return jnp.mean(flat, axis=0, dtype=jnp.float32)[None], rows, in_shape


class Interceptor:
  """The ``intercept_methods`` interceptor that sows MAC statistics."""

  def __init__(
      self,
      *,
      attention_aware: bool,
      value_stat: str,
      depthwise_shared: bool,
      recorder: Recorder | None = None,
  ):
    self.attention_aware = attention_aware
    self.value_stat = value_stat
    self.depthwise_shared = depthwise_shared
    self.recorder = recorder
    self.injected_weight_paths: list[Path] = []
    self._frames: list[_AttentionFrame] = []
    self._suppressed = 0

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    # Lifted transforms (scan, remat, vmap, jit) add pseudo-calls of subclasses
    # of the wrapped module under a '<lambda>' method: only real calls count.
    if context.method_name != '__call__' or module.is_initializing():
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if self.recorder is not None:
      self.recorder.modules.setdefault(path, type(module).__name__)
    if self._suppressed:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.MultiHeadDotProductAttention):
      if self._frames and self._frames[-1].module is module:
        # SelfAttention.__call__ calls super().__call__ on the same module.
        return next_fun(*args, **kwargs)
      return self._attention(next_fun, args, kwargs, context)
    frame = self._frames[-1] if self._frames else None
    child = (
        path[-1]
        if frame is not None and path[:-1] == frame.path and path
        else None
    )
    stat_fn = self._stat_fn(module, path)
    if stat_fn is None:
      outputs = next_fun(*args, **kwargs)
      if child in ('query_ln', 'key_ln'):
        frame.outputs[child] = outputs
      return outputs
    bound = _bind(context, args, kwargs)
    inputs = list(bound.arguments.values())[1]
    if child == 'value' and self.attention_aware:
      frame.value_inputs = inputs
      frame.value_module = module
      return _call_bound(next_fun, bound)
    stat, rows, call = stat_fn(inputs)
    self._sow(module, path, call, stat, rows)
    outputs = _call_bound(next_fun, bound)
    if child in ('query', 'key'):
      frame.outputs[child] = outputs
    return outputs

  def _sow(self, module, path, call: LayerCall, stat, rows, **extra) -> None:
    stat = _with_bias(stat, call.has_bias)
    if stat.shape[0] == 1:
      stat = stat[0]
    if self.recorder is not None:
      self.recorder.layer(path, call)
    entry = {_stats.MEAN: stat, _stats.ROWS: jnp.asarray(rows, jnp.float32)}
    entry.update(extra)
    module.sow(STATS_COLLECTION, STAT_NAME, jax.lax.stop_gradient(entry))

  def _unsupported(self, path: Path, reason: str) -> None:
    if self.recorder is not None:
      self.recorder.unsupported[path] = reason

  def _stat_fn(self, module, path: Path) -> Callable | None:
    """Returns ``inputs -> (stat, rows, LayerCall)`` for a supported layer."""
    name = type(module).__name__
    if isinstance(module, nn.Dense):

      def dense(inputs):
        stat, rows, in_shape = _dense_stat(inputs, 1)
        return stat, rows, LayerCall('dense', name, in_shape, 1, module.use_bias)

      return dense
    if isinstance(module, nn.DenseGeneral):
      if tuple(np.atleast_1d(module.batch_dims)):
        self._unsupported(path, 'DenseGeneral with batch_dims')
        return None

      def dense_general(inputs):
        axes = tuple(np.atleast_1d(module.axis).tolist())
        axes = tuple(sorted(a % inputs.ndim for a in axes))
        stat, rows, in_shape = _dense_stat(inputs, len(axes), axes)
        return stat, rows, LayerCall('dense', name, in_shape, 1, module.use_bias)

      return dense_general
    if isinstance(module, nn.Conv):
      if module.mask is not None:
        self._unsupported(path, 'Conv with a kernel mask')
        return None

      def conv(inputs):
        geometry = _conv.geometry_of(module)
        stat, rows = _conv.mean_patch(inputs, geometry)
        groups = geometry.feature_group_count
        channels = inputs.shape[-1]
        depthwise = groups > 1 and groups == channels
        if depthwise and self.depthwise_shared:
          stat = jnp.mean(stat, axis=0, keepdims=True)
        in_shape = geometry.kernel_size + (channels // groups,)
        call = LayerCall('conv', name, in_shape, stat.shape[0], module.use_bias)
        return stat, rows, call

      return conv
    return None

  def _attention(self, next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    if module.decode:
      # Autoregressive decoding feeds one query at a time: not a training call.
      self._suppressed += 1
      try:
        return next_fun(*args, **kwargs)
      finally:
        self._suppressed -= 1
    if not self.attention_aware:
      return next_fun(*args, **kwargs)
    bound = _bind(context, args, kwargs)
    arguments = bound.arguments
    use_sown_weights = (
        'sow_weights' in arguments
        and 'module' in _signature(module.attention_fn).parameters
        and module.is_mutable_collection(_WEIGHTS_COLLECTION)
    )
    if use_sown_weights and not arguments['sow_weights']:
      arguments['sow_weights'] = True
      self.injected_weight_paths.append(path)
    frame = _AttentionFrame(module, path)
    self._frames.append(frame)
    try:
      outputs = _call_bound(next_fun, bound)
    finally:
      self._frames.pop()
    if frame.value_module is None:
      return outputs
    value = frame.value_module
    weights = None
    if use_sown_weights:
      sown = module.get_variable(_WEIGHTS_COLLECTION, _WEIGHTS_NAME)
      weights = sown[-1] if sown else None
    mask = arguments.get('mask')
    if weights is None:
      weights = _recompute_weights(frame, mask)
    stat, rows, extra = _value_stat(
        weights, mask, frame.value_inputs, self.value_stat, value.use_bias
    )
    heads = stat.shape[0]
    call = LayerCall(
        'attention_value',
        type(value).__name__,
        (frame.value_inputs.shape[-1],),
        heads,
        value.use_bias,
    )
    self._sow(value, path + ('value',), call, stat, rows, **extra)
    return outputs


def _recompute_weights(frame: _AttentionFrame, mask) -> jax.Array:
  """softmax(q kᵀ/√d) under the mask, for attention_fns that cannot sow."""
  query = frame.outputs.get('query_ln', frame.outputs.get('query'))
  key = frame.outputs.get('key_ln', frame.outputs.get('key'))
  if query is None or key is None:
    raise ValueError(
        f'attention {path_str(frame.path)}: could not see its query/key'
        ' projections, so its attention probabilities are unknown.'
    )
  return nn.dot_product_attention_weights(
      query.astype(jnp.float32),
      key.astype(jnp.float32),
      mask=mask,
      deterministic=True,
  )


def _value_stat(weights, mask, value_inputs, value_stat: str, has_bias: bool):
  """Attention-weighted mean value input, reference or per-head form.

  ``reference``: ``v = Σ_j p̄_j x̄_j`` with ``p̄_j`` the attention key ``j``
  receives averaged over batch, heads and (unmasked) queries and ``x̄_j`` the
  batch-mean value input at position ``j``; both factors are returned too, so
  that statistics of several batches merge exactly. ``per_head``: for each
  head ``h``, the mean over batch and queries of ``Σ_j A[b,h,i,j] x_{b,j}``,
  which is the input the head's value rows actually act on.

  Returns:
    ``(stat, rows, extra_fields)`` with ``stat`` of shape ``(blocks, d_in)``.
  """
  weights = weights.astype(jnp.float32)
  heads, queries, keys = weights.shape[-3:]
  if mask is None:
    valid = jnp.ones(weights.shape[:-1], jnp.float32)
  else:
    valid = jnp.broadcast_to(
        jnp.any(mask, axis=-1), weights.shape[:-1]
    ).astype(jnp.float32)
  weights = weights.reshape((-1, heads, queries, keys))
  valid = valid.reshape((-1, heads, queries))
  inputs = value_inputs.astype(jnp.float32).reshape(
      (-1, keys, value_inputs.shape[-1])
  )
  if inputs.shape[0] != weights.shape[0]:
    inputs = jnp.broadcast_to(inputs, (weights.shape[0],) + inputs.shape[1:])
  key_weight = jnp.einsum('bhqk,bhq->bhk', weights, valid)
  rows = jnp.sum(valid) / heads
  if value_stat == 'per_head':
    counts = jnp.maximum(jnp.sum(valid, axis=(0, 2)), 1.0)
    stat = jnp.einsum('bhk,bkd->hd', key_weight, inputs) / counts[:, None]
    return stat, rows, {}
  count = jnp.maximum(jnp.sum(valid), 1.0)
  key_attention = jnp.sum(key_weight, axis=(0, 1)) / count
  position_mean = jnp.mean(inputs, axis=0)
  extra = {
      _stats.KEY_ATTENTION: key_attention,
      _stats.POSITION_INPUT: _with_bias(position_mean, has_bias),
      _stats.EXAMPLES: jnp.asarray(inputs.shape[0], jnp.float32),
  }
  return (key_attention @ position_mean)[None], rows, extra


def _finalize(collection: Any) -> Any:
  """Merges each layer's per-call statistics (see ``_stats.merge_layer``)."""
  result = {}
  for name, value in collection.items():
    if name == STAT_NAME:
      result.update(_stats.merge_layer(value))
    else:
      result[name] = _finalize(value)
  return result


def _copy_dicts(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _drop_path(tree: dict, path: Path, name: str) -> None:
  """Deletes tree[path...][name] if present and prunes emptied dicts."""
  node, parents = tree, []
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return
    parents.append((node, key))
    node = node[key]
  if isinstance(node, dict):
    node.pop(name, None)
  for parent, key in reversed(parents):
    if parent[key]:
      break
    del parent[key]


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
  ):
    if value_stat not in _VALUE_STATS:
      raise ValueError(
          f'value_stat must be one of {_VALUE_STATS}, got {value_stat!r}.'
      )
    self.apply_fn = apply_fn
    self.options = dict(
        attention_aware=attention_aware,
        value_stat=value_stat,
        depthwise_shared=depthwise_shared,
    )
    functools.update_wrapper(self, apply_fn, updated=())

  def __call__(self, variables, *args, mutable=False, **kwargs):
    return self.apply_with_recorder(None, variables, *args, mutable=mutable,
                                    **kwargs)

  def apply_with_recorder(
      self, recorder, variables, *args, mutable=False, **kwargs
  ):
    """Runs the wrapped apply; ``recorder`` (or None) collects layer facts."""
    interceptor = Interceptor(recorder=recorder, **self.options)
    ours = [STATS_COLLECTION]
    if self.options['attention_aware']:
      ours.append(_WEIGHTS_COLLECTION)
    # The interceptor is entered here, inside whatever function the caller
    # traces, because intercept_methods is not part of jax.jit's cache key.
    with nn.intercept_methods(interceptor):
      outputs, state = self.apply_fn(
          variables,
          *args,
          mutable=flax_scope.union_filters(mutable, ours),
          **kwargs,
      )
    state = dict(state)
    stats = _finalize(state.pop(STATS_COLLECTION, {}))
    kept_weights = kwargs.get('capture_intermediates') or flax_scope.in_filter(
        mutable, _WEIGHTS_COLLECTION
    )
    if _WEIGHTS_COLLECTION in state:
      if kept_weights:
        weights = _copy_dicts(state[_WEIGHTS_COLLECTION])
        for path in interceptor.injected_weight_paths:
          _drop_path(weights, path, _WEIGHTS_NAME)
        state[_WEIGHTS_COLLECTION] = weights
      if not kept_weights or not state[_WEIGHTS_COLLECTION]:
        del state[_WEIGHTS_COLLECTION]
    # Same rule as flax.core.apply: any mutable other than False returns state.
    if mutable is not False or kwargs.get('capture_intermediates'):
      return (outputs, state), stats
    return outputs, stats


def capture(
    apply_fn: Callable[..., Any],
    *,
    attention_aware: bool = True,
    value_stat: str = 'reference',
    depthwise_shared: bool = True,
) -> Capture:
  r"""Wraps a linen ``apply`` so that it also returns MAC's statistics.

  ``capture(model.apply)`` takes the same arguments as ``model.apply`` and
  returns ``(outputs, mac_stats)``; when ``mutable`` (or
  ``capture_intermediates``) makes ``apply`` return ``(outputs, state)``, it
  returns ``((outputs, state), mac_stats)``. The model's outputs, its other
  collections and its gradients are unchanged.

  ``mac_stats`` is a nested dict keyed by module path, like the params tree,
  with one fp32 ``{'mean_input': a}`` per preconditioned layer:

  * ``Dense`` / ``DenseGeneral``: the mean of the input rows over batch and
    positions, contracted axes flattened in kernel order, with a trailing 1
    when the layer has a bias. Shape ``(d,)``.
  * ``Conv``: the mean im2col patch in the kernel's ``(*kernel_size,
    in_features // groups)`` layout (plus 1 for the bias), computed from the
    batch-mean input without building patches. Grouped convolutions get one
    row per group, shape ``(groups, d)``; depthwise convolutions share one
    patch over channels (as the reference does) unless
    ``depthwise_shared=False``.
  * The ``value`` projection of ``MultiHeadDotProductAttention`` /
    ``SelfAttention``: the attention-weighted mean input
    :math:`v = \sum_j \bar p_j \bar x_j`, with :math:`\bar p_j` the attention
    that key :math:`j` receives, averaged over batch, heads and unmasked query
    rows, taken from the model's own probabilities under its mask, and
    :math:`\bar x_j` the batch-mean value input at key position :math:`j`.
    ``value_stat='per_head'`` gives one row per head instead, the mean over
    batch and queries of :math:`\sum_j A_{bhij} x_{bj}`.

  A layer called several times in one apply gets the row-weighted mean over its
  calls. Statistics are ``stop_gradient``-ed and cost no backward work.

  The interceptor is installed inside the call, so call the wrapped function
  inside your traced (jitted, differentiated) loss function. Calls during
  ``model.init`` and ``decode=True`` attention calls record nothing.

  Attention probabilities come from the model itself: ``sow_weights=True`` is
  passed to each attention call, and the sown weights are removed from the
  returned ``intermediates`` again. An ``attention_fn`` that takes no
  ``module`` argument cannot sow; its probabilities are then recomputed as
  ``softmax(q kᵀ / √d)`` under the call's mask from the intercepted (and
  ``normalize_qk``-normalised) projections.

  Args:
    apply_fn: a linen ``Module.apply`` (bound method or any function with its
      signature).
    attention_aware: give attention ``value`` layers the attention-weighted
      statistic; ``False`` treats them as plain ``DenseGeneral`` layers.
    value_stat: ``'reference'`` (one head-averaged vector, the authors'
      statistic) or ``'per_head'``.
    depthwise_shared: share one mean patch over the channels of a depthwise
      convolution, as the reference does.

  Returns:
    A callable with ``apply_fn``'s signature returning ``(result, mac_stats)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, stats = mac_optax.capture(model.apply)(variables, x)
    >>> stats['mean_input']
    Array([1., 1., 1.], dtype=float32)
  """
  return Capture(
      apply_fn,
      attention_aware=attention_aware,
      value_stat=value_stat,
      depthwise_shared=depthwise_shared,
  )
