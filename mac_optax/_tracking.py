"""Turning module calls into MAC statistics, for linen and NNX alike.

A :class:`Tracker` is told about every call of a module that has a rule (by
linen's method interceptor or by NNX's wrapped ``__call__``). A layer call
gives its statistic at once. An attention call opens a frame: while it runs,
the frame keeps the outputs of the query and key projections and defers the
value (or fused query/key/value) projection; when it returns, the value
projection gets the attention-weighted statistic, from the module's own
probabilities when the framework can hand them over, else recomputed from the
kept projections under the module's mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mac_optax import _rules
from mac_optax import _stats

Path = _stats.Path
path_str = _stats.path_str
VALUE_STATS = ('reference', 'per_head')


@dataclasses.dataclass
class Recorder:
  """What tracing saw: layer geometry, module types, pass-through reasons."""

  layers: dict[Path, _rules.LayerCall] = dataclasses.field(default_factory=dict)
  modules: dict[Path, str] = dataclasses.field(default_factory=dict)
  unsupported: dict[Path, str] = dataclasses.field(default_factory=dict)
  value_sources: dict[Path, str] = dataclasses.field(default_factory=dict)

  def layer(self, path: Path, call: _rules.LayerCall) -> None:
    previous = self.layers.setdefault(path, call)
    if previous != call:
      raise ValueError(
          f'layer {path_str(path)} is called with inconsistent geometry:'
          f' {previous} vs {call}.'
      )


@dataclasses.dataclass
class _Projection:
  module: Any
  path: Path
  inputs: jax.Array
  statistic: _rules.Statistic
  outputs: Any = None


@dataclasses.dataclass
class _Frame:
  module: Any
  path: Path
  rule: _rules.AttentionRule
  projections: dict[str, _Projection] = dataclasses.field(default_factory=dict)
  norm_outputs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  probabilities: jax.Array | None = None


def _with_bias(stat: jax.Array, has_bias: bool) -> jax.Array:
  if not has_bias:
    return stat
  ones = jnp.ones(stat.shape[:-1] + (1,), stat.dtype)
  return jnp.concatenate([stat, ones], axis=-1)


def _squeeze_blocks(stat: jax.Array, blocks: int) -> jax.Array:
  return stat[..., 0, :] if blocks == 1 else stat


class Tracker:
  """Framework-independent bookkeeping of one traced forward pass.

  Args:
    options: the capture options.
    record: ``record(module, path, entry)`` stores one call's statistics
      (a ``mac_stats`` layer node) for a layer.
    recorder: collects geometry for :func:`find_layers`, or None.
  """

  def __init__(self, options: _rules.Options,
               record: Callable[[Any, Path, dict], None],
               recorder: Recorder | None = None):
    if options.value_stat not in VALUE_STATS:
      raise ValueError(
          f'value_stat must be one of {VALUE_STATS}, got'
          f' {options.value_stat!r}.'
      )
    self.options = options
    self._records = [record]
    self.recorder = recorder
    self._frames: list[_Frame] = []
    self._active: list[Any] = []
    self._suppressed = 0

  # ------------------------------------------------------------------------
  # Entry points for the framework adapters.

  def is_active(self, module) -> bool:
    """Whether ``module`` is already being handled (``super().__call__``)."""
    return any(m is module for m in self._active)

  def seen(self, path: Path, module) -> None:
    if self.recorder is not None:
      self.recorder.modules.setdefault(path, type(module).__name__)

  def layer_call(self, module, path: Path, rule, arguments, inputs,
                 run: Callable[[], Any]):
    """A call of a module with a layer rule; ``run()`` executes it."""
    self.seen(path, module)
    if self._suppressed:
      return run()
    if isinstance(rule, _rules.PassThrough):
      self._unsupported(path, rule.reason)
      return run()
    statistic = rule.read(module, arguments, inputs, self.options)
    if isinstance(statistic, str):
      self._unsupported(path, statistic)
      return run()
    frame, role = self._role(path)
    self._active.append(module)
    try:
      if role in ('value', 'qkv'):
        projection = _Projection(module, path, inputs, statistic)
        frame.projections[role] = projection
        projection.outputs = run()
        return projection.outputs
      self._store(module, path, statistic)
      outputs = run()
    finally:
      self._active.pop()
    if role in ('query', 'key'):
      frame.projections[role] = _Projection(module, path, inputs, statistic,
                                            outputs)
    return outputs

  def other_call(self, module, path: Path, run: Callable[[], Any]):
    """A call of a module without a rule (it may be a query/key norm)."""
    self.seen(path, module)
    outputs = run()
    frame, role = self._role(path)
    if role in ('query_norm', 'key_norm'):
      frame.norm_outputs[role] = outputs
    return outputs

  @contextlib.contextmanager
  def attention_call(self, module, path: Path, rule: _rules.AttentionRule,
                     arguments):
    """Wraps the run of an attention module call.

    Yields the frame (or None when the call records nothing attention-aware);
    adapters may set ``frame.probabilities`` while the call runs. After the
    call, :meth:`finish_attention` must be given its outputs.
    """
    self.seen(path, module)
    if rule.skip is not None and rule.skip(module, arguments):
      self._suppressed += 1
      try:
        yield None
      finally:
        self._suppressed -= 1
      return
    if not self.options.attention_aware or self._suppressed:
      yield None
      return
    frame = _Frame(module, path, rule)
    self._frames.append(frame)
    self._active.append(module)
    try:
      yield frame
    finally:
      self._active.pop()
      self._frames.pop()

  def finish_attention(self, frame: _Frame | None, arguments, outputs) -> None:
    """Records the value statistic of a finished attention call."""
    if frame is None:
      return
    value = frame.projections.get('value') or frame.projections.get('qkv')
    if value is None:
      return
    rule = frame.rule
    mask = _combined_mask(*rule.mask_of(frame.module, arguments))
    probabilities = frame.probabilities
    source = 'model probabilities'
    if probabilities is None and rule.probabilities is not None:
      probabilities = rule.probabilities(frame.module, arguments, outputs)
    if probabilities is None:
      probabilities = self._recompute(frame, mask)
      source = 'recomputed probabilities'
    if self.recorder is not None:
      self.recorder.value_sources[value.path] = (
          f'{self.options.value_stat} value statistic from {source} of'
          f' {path_str(frame.path)}')
    entry = _value_entry(
        probabilities, mask, value, self.options.value_stat,
        fused=value is frame.projections.get('qkv'), rule=rule,
        module=frame.module)
    self._emit(value.module, value.path, entry[0], entry[1])

  @contextlib.contextmanager
  def recording_to(self, record: Callable[[Any, Path, dict], None]):
    """Sends what is recorded meanwhile to ``record`` instead."""
    self._records.append(record)
    try:
      yield
    finally:
      self._records.pop()

  # ------------------------------------------------------------------------

  def _role(self, path: Path):
    if not self._frames:
      return None, None
    frame = self._frames[-1]
    base = frame.path
    if len(path) <= len(base) or tuple(path[: len(base)]) != tuple(base):
      return None, None
    role = frame.rule.role_of(tuple(path[len(base):]))
    if role in ('value', 'qkv') and not self.options.attention_aware:
      role = None
    return frame, role

  def _unsupported(self, path: Path, reason: str) -> None:
    if self.recorder is not None:
      self.recorder.unsupported[path] = reason

  def _store(self, module, path: Path, statistic: _rules.Statistic) -> None:
    call = statistic.call
    mean = _with_bias(statistic.mean, call.has_bias)
    entry = {
        _stats.MEAN: _squeeze_blocks(mean, call.blocks),
        _stats.ROWS: jnp.asarray(statistic.rows, jnp.float32),
    }
    self._emit(module, path, call, entry)

  def _emit(self, module, path: Path, call: _rules.LayerCall, entry) -> None:
    if self.recorder is not None:
      self.recorder.layer(path, call)
    self._records[-1](module, path, jax.lax.stop_gradient(entry))

  def _recompute(self, frame: _Frame, mask) -> jax.Array:
    """softmax(q kᵀ · scale) under the mask, from the kept projections."""
    rule = frame.rule
    heads = rule.heads(frame.module)
    if 'qkv' in frame.projections:
      qkv = frame.projections['qkv']
      if heads is None:
        raise ValueError(
            f'attention {path_str(frame.path)}: a fused qkv projection needs'
            ' num_heads in its attention rule.'
        )
      query, key, _ = _split_qkv(_flat_outputs(qkv), heads, rule.qkv_layout)
    else:
      missing = [r for r in ('query', 'key') if r not in frame.projections]
      if missing:
        raise ValueError(
            f'attention {path_str(frame.path)}: its {" and ".join(missing)}'
            ' projection was not seen, so its attention probabilities can'
            ' neither be read nor recomputed. Check the names in its'
            ' attention rule.'
        )
      query = _heads(frame.projections['query'], heads)
      key = _heads(frame.projections['key'], heads)
    if 'query_norm' in frame.norm_outputs:
      query = frame.norm_outputs['query_norm'].reshape(query.shape)
    if 'key_norm' in frame.norm_outputs:
      key = frame.norm_outputs['key_norm'].reshape(key.shape)
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
    if key.shape[-2] != query.shape[-2]:
      # Grouped query attention: each key head serves consecutive query heads.
      key = jnp.repeat(key, query.shape[-2] // key.shape[-2], axis=-2)
    scale = rule.scale
    if scale is None:
      scale = 1.0 / np.sqrt(query.shape[-1])
    logits = jnp.einsum('...qhd,...khd->...hqk', query * scale, key)
    mask = _resolve(mask, query.shape[-3], key.shape[-3])
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def _combined_mask(mask, causal: bool):
  return _CausalMask(mask) if causal else mask


@dataclasses.dataclass(frozen=True)
class _CausalMask:
  """A causal mask (and-ed with ``mask``), sized once the logits are known."""

  mask: Any = None

  def resolve(self, queries: int, keys: int) -> jax.Array:
    causal = jnp.tril(jnp.ones((queries, keys), bool))
    if self.mask is None:
      return causal
    return jnp.logical_and(jnp.asarray(self.mask, bool), causal)


def _resolve(mask, queries: int, keys: int):
  return mask.resolve(queries, keys) if isinstance(mask, _CausalMask) else mask


def _flat_outputs(projection: _Projection) -> jax.Array:
  """Projection outputs as ``(*rows, features)``, its output axes flattened."""
  lead = projection.inputs.ndim - len(projection.statistic.call.in_shape)
  outputs = projection.outputs
  return outputs.reshape(outputs.shape[:lead] + (-1,))


def _heads(projection: _Projection, heads: int | None) -> jax.Array:
  """Query/key outputs as ``(..., length, heads, head_dim)``."""
  lead = projection.inputs.ndim - len(projection.statistic.call.in_shape)
  outputs = projection.outputs
  if heads is None:
    if outputs.ndim != lead + 2:
      raise ValueError(
          f'projection {path_str(projection.path)} has outputs of shape'
          f' {outputs.shape}, not (..., heads, head_dim): give num_heads in'
          ' its attention rule.'
      )
    return outputs
  flat = _flat_outputs(projection)
  return flat.reshape(flat.shape[:-1] + (heads, -1))


def _split_qkv(flat: jax.Array, heads: int, layout: str):
  if layout == 'qkv':
    parts = flat.reshape(flat.shape[:-1] + (3, heads, -1))
    return parts[..., 0, :, :], parts[..., 1, :, :], parts[..., 2, :, :]
  parts = flat.reshape(flat.shape[:-1] + (heads, 3, -1))
  return parts[..., 0, :], parts[..., 1, :], parts[..., 2, :]


def _value_entry(probabilities, mask, value: _Projection, value_stat: str, *,
                 fused: bool, rule: _rules.AttentionRule, module):
  """The ``mac_stats`` node of a value (or fused qkv) projection."""
  probabilities = probabilities.astype(jnp.float32)
  heads, queries, keys = probabilities.shape[-3:]
  mask = _resolve(mask, queries, keys)
  if mask is None:
    valid = jnp.ones(probabilities.shape[:-1], jnp.float32)
  else:
    valid = jnp.broadcast_to(
        jnp.any(jnp.asarray(mask, bool), axis=-1), probabilities.shape[:-1]
    ).astype(jnp.float32)
  probabilities = probabilities.reshape((-1, heads, queries, keys))
  valid = valid.reshape((-1, heads, queries))
  inputs = value.inputs.astype(jnp.float32)
  inputs = inputs.reshape((-1, keys, inputs.shape[-1]))
  if inputs.shape[0] != probabilities.shape[0]:
    inputs = jnp.broadcast_to(
        inputs, (probabilities.shape[0],) + inputs.shape[1:])
  call = value.statistic.call
  has_bias = call.has_bias
  key_weight = jnp.einsum('bhqk,bhq->bhk', probabilities, valid)
  query_rows = jnp.sum(valid) / heads
  out_features = _out_features(value)
  if fused:
    value_heads = rule.heads(module) or heads
  else:
    value_heads = _value_heads(value, heads)
  entry = {}
  if value_stat == 'per_head':
    groups = heads // value_heads
    grouped = key_weight.reshape(key_weight.shape[0], value_heads, groups,
                                 keys).sum(axis=2)
    counts = valid.reshape(valid.shape[0], value_heads, groups,
                           queries).sum(axis=(0, 2, 3))
    per_head = jnp.einsum('bgk,bkd->gd', grouped, inputs)
    per_head = per_head / jnp.maximum(counts, 1.0)[:, None]
    value_stat_rows = _with_bias(per_head, has_bias)
    head_index = np.arange(value_heads)
  else:
    count = jnp.maximum(jnp.sum(valid), 1.0)
    key_attention = jnp.sum(key_weight, axis=(0, 1)) / count
    position_input = _with_bias(jnp.mean(inputs, axis=0), has_bias)
    entry.update({
        _stats.KEY_ATTENTION: key_attention,
        _stats.POSITION_INPUT: position_input,
        _stats.EXAMPLES: jnp.asarray(inputs.shape[0], jnp.float32),
        _stats.QUERY_ROWS: query_rows,
    })
    value_stat_rows = _stats.value_mean(key_attention, position_input)[None]
    head_index = np.zeros(value_heads, np.int64)
  if not fused:
    blocks = value_stat_rows.shape[0]
    if out_features % blocks:
      raise ValueError(
          f'value projection {path_str(value.path)}: {out_features} output'
          f' features do not split into {blocks} heads.'
      )
    entry[_stats.MEAN] = _squeeze_blocks(value_stat_rows, blocks)
    entry[_stats.ROWS] = query_rows
    call = dataclasses.replace(call, kind='attention_value', blocks=blocks)
    return call, entry
  # Fused projection: query and key blocks keep the plain statistic.
  plain = value.statistic
  block_source = _fused_block_source(head_index, value_heads, rule.qkv_layout)
  entry.update({
      _stats.PLAIN: _with_bias(plain.mean[..., 0, :], has_bias),
      _stats.ROWS: jnp.asarray(plain.rows, jnp.float32),
      _stats.QUERY_ROWS: query_rows,
      _stats.VALUE: value_stat_rows,
      _stats.BLOCK_SOURCE: jnp.asarray(block_source, jnp.int32),
  })
  blocks = len(block_source)
  if out_features % blocks:
    raise ValueError(
        f'fused projection {path_str(value.path)}: {out_features} output'
        f' features do not split into {blocks} blocks.'
    )
  call = dataclasses.replace(call, kind='attention_qkv', blocks=blocks)
  return call, _stats.rebuild(entry)


def _fused_block_source(head_index, heads: int, layout: str):
  """Per output block: -1 for query/key (plain), else a value_input row."""
  distinct = len(set(head_index.tolist())) > 1
  if layout == 'qkv':
    if not distinct:
      return np.array([-1, -1, 0])
    plain = -np.ones(heads, np.int64)
    return np.concatenate([plain, plain, head_index])
  per_head = [(-1, -1, h) for h in head_index]
  return np.array(per_head).reshape(-1)


def _out_features(projection: _Projection) -> int:
  lead = projection.inputs.ndim - len(projection.statistic.call.in_shape)
  return int(np.prod(projection.outputs.shape[lead:]))


def _value_heads(value: _Projection, heads: int) -> int:
  """Heads of the value projection (fewer than query heads under GQA)."""
  lead = value.inputs.ndim - len(value.statistic.call.in_shape)
  out_shape = value.outputs.shape[lead:]
  if len(out_shape) == 2 and heads % out_shape[0] == 0:
    return int(out_shape[0])
  return heads

