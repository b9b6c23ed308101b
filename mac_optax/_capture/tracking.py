"""Turning module calls into MAC statistics, for linen and NNX alike.

A :class:`Tracker` is told about every call of a module that has a rule (by
linen's method interceptor or by NNX's wrapped ``__call__``). A layer call
gives its statistic at once. An attention call opens a frame: while it runs,
the frame keeps the outputs of the query and key projections and defers the
value (or fused query/key/value, or key/value) projection; when it returns,
the value projection gets the attention-weighted statistic, from the module's
own probabilities when the framework or the module
(:func:`provide_attention_probabilities`) hands them over, else recomputed
from the kept projections under the module's mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mac_optax import _sharding
from mac_optax import _stats
from mac_optax._capture import rules

Path = _stats.Path
path_str = _stats.path_str
# A store takes one call's statistics (a mac_stats layer node) and puts them
# where they can leave the traced function: store(module, path, entry).
Store = Callable[[Any, Path, dict], None]


@dataclasses.dataclass
class Survey:
  """What a traced pass saw, for ``find_layers``: geometry, types, reasons."""

  layers: dict[Path, rules.LayerCall] = dataclasses.field(default_factory=dict)
  modules: dict[Path, str] = dataclasses.field(default_factory=dict)
  unsupported: dict[Path, str] = dataclasses.field(default_factory=dict)
  value_sources: dict[Path, str] = dataclasses.field(default_factory=dict)
  # Modules called under an attention rule (summary hints at the others).
  attention: set[Path] = dataclasses.field(default_factory=set)
  # Layers their rule skipped on purpose (decoding, PassThrough).
  skipped: set[Path] = dataclasses.field(default_factory=set)
  # Modules whose class has a layer or attention rule.
  with_rule: set[Path] = dataclasses.field(default_factory=set)

  def clear(self) -> None:
    """Forgets everything (before the pass is traced again)."""
    for field in dataclasses.fields(self):
      setattr(self, field.name, field.default_factory())

  def layer(self, path: Path, call: rules.LayerCall) -> None:
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
  statistic: rules.Statistic
  outputs: Any = None


@dataclasses.dataclass
class _Frame:
  module: Any
  path: Path
  rule: rules.AttentionRule
  projections: dict[str, _Projection] = dataclasses.field(default_factory=dict)
  norm_outputs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  probabilities: jax.Array | None = None


_THREAD = threading.local()


def _open_frames() -> list[_Frame]:
  """This thread's attention calls being captured, innermost last."""
  if not hasattr(_THREAD, 'frames'):
    _THREAD.frames = []
  return _THREAD.frames


def provide_attention_probabilities(module, probabilities):
  r"""Hands an attention module's own probabilities to MAC; returns them.

  Call it inside the ``__call__`` of an attention module declared with
  :func:`register_attention`, on the probabilities it applies to the values,
  laid out ``(batch, heads, queries, keys)``. While MAC captures statistics,
  the value statistic :math:`v = \sum_j \bar p_j \bar x_j` then uses exactly
  these probabilities (with whatever the module did to its logits: rotary
  embeddings, soft-capping, biases) instead of recomputing them; at any other
  time it does nothing. Works for linen and NNX modules, and unlike a sown
  variable needs no collection to be made mutable or captured.

  Args:
    module: the attention module (``self``).
    probabilities: its attention probabilities, ``(batch, heads, queries,
      keys)``.

  Returns:
    ``probabilities``, unchanged.
  """
  for frame in reversed(_open_frames()):
    if frame.module is module:
      frame.probabilities = probabilities
      break
  return probabilities


def _with_bias(stat: jax.Array, has_bias: bool) -> jax.Array:
  # Replicated first: the padding is, and pad needs one sharding.
  stat = _sharding.replicated(stat)
  if not has_bias:
    return stat
  # Padded rather than concatenated with ones: XLA:CPU compiles an unfused
  # concatenate once per layer, equal pad fusions once in all.
  return jnp.pad(stat, [(0, 0)] * (stat.ndim - 1) + [(0, 1)],
                 constant_values=1)


def _squeeze_blocks(stat: jax.Array, blocks: int) -> jax.Array:
  return stat[..., 0, :] if blocks == 1 else stat


def rule_owner(cls: type, rule) -> type:
  """The class in ``cls``'s hierarchy that ``rule`` was registered for.

  The most basic class whose rule is ``rule``: subclasses inherit it, and the
  rule reads the arguments of that class's own ``__call__``.
  """
  owner = cls
  for base in cls.__mro__:
    if rules.rule_of(base) is rule:
      owner = base
  return owner


class Tracker:
  """Framework-independent bookkeeping of one traced forward pass.

  Args:
    options: the capture options.
    store: ``store(module, path, entry)`` keeps one call's statistics (a
      ``mac_stats`` layer node) for a layer: the framework adapter's way out
      of the traced function.
    survey: collects geometry for :func:`find_layers`, or None.
  """

  def __init__(self, options: rules.Options, store: Store,
               survey: Survey | None = None):
    self.options = options
    self._stores = [store]
    self.survey = survey
    self._frames: list[_Frame] = []
    self._active: list[Any] = []
    self._suppressed = 0
    # Every module seen, by type name, for error messages.
    self.module_types: dict[Path, str] = {}
    # Layers deliberately not recorded (decoding, PassThrough rules).
    self.skipped: set[Path] = (set() if survey is None
                               else survey.skipped)
    # Subclass calls waiting for their layer class's own __call__: [module,
    # whether it was reached].
    self._awaiting: list[list[Any]] = []

  # ------------------------------------------------------------------------
  # Entry points for the framework adapters.

  def is_active(self, module) -> bool:
    """Whether ``module`` is already being handled (``super().__call__``)."""
    return any(m is module for m in self._active)

  def seen(self, path: Path, module) -> None:
    self.module_types.setdefault(path, type(module).__name__)
    if self.survey is not None:
      self.survey.modules.setdefault(path, type(module).__name__)
      if (rules.rule_of(module) is not None
          or rules.attention_rule_of(module) is not None):
        self.survey.with_rule.add(path)

  def layer_call(self, module, path: Path, rule, arguments, inputs,
                 run: Callable[[], Any]):
    """A call of a module with a layer rule; ``run()`` executes it."""
    self.seen(path, module)
    for waiting in self._awaiting:
      if waiting[0] is module:
        waiting[1] = True
    if self._suppressed:
      self.skipped.add(path)
      return run()
    if isinstance(rule, rules.PassThrough):
      self.skipped.add(path)
      self._unsupported(path, rule.reason)
      return run()
    statistic = rule.read(module, arguments, inputs, self.options)
    if isinstance(statistic, str):
      self._unsupported(path, statistic)
      return run()
    frame, role = self._role(path)
    self._active.append(module)
    try:
      if role in ('value', 'qkv', 'kv'):
        projection = _Projection(module, path, inputs, statistic)
        frame.projections[role] = projection
        projection.outputs = run()
        return projection.outputs
      self._emit_statistic(module, path, statistic)
      outputs = run()
    finally:
      self._active.pop()
    if role in ('query', 'key'):
      frame.projections[role] = _Projection(module, path, inputs, statistic,
                                            outputs)
    return outputs

  def override_call(self, module, path: Path, rule, arguments, inputs,
                    run: Callable[[], Any]):
    """A call of a layer subclass's own ``__call__`` (it overrides its rule's).

    The statistic belongs to what the kernel multiplies, which is what the
    layer class's own ``__call__`` receives when the override calls it
    (``super().__call__(2 * x)``): that inner call records it, through
    :meth:`layer_call`. An override that never reaches it is recorded from
    its own arguments, as a layer of its rule.
    """
    self.seen(path, module)
    waiting = [module, False]
    self._awaiting.append(waiting)
    try:
      outputs = run()
    finally:
      self._awaiting.pop()
    if waiting[1]:
      return outputs
    return self.layer_call(module, path, rule, arguments, inputs,
                           lambda: outputs)

  def other_call(self, module, path: Path, run: Callable[[], Any]):
    """A call of a module without a rule (it may be a query/key norm)."""
    self.seen(path, module)
    outputs = run()
    frame, role = self._role(path)
    if role in ('query_norm', 'key_norm'):
      frame.norm_outputs[role] = outputs
    return outputs

  @contextlib.contextmanager
  def attention_call(self, module, path: Path, rule: rules.AttentionRule,
                     arguments):
    """Wraps the run of an attention module call.

    Yields the frame (or None when the call records nothing attention-aware);
    adapters may set ``frame.probabilities`` while the call runs. After the
    call, :meth:`finish_attention` must be given its outputs.
    """
    self.seen(path, module)
    if self.survey is not None:
      self.survey.attention.add(path)
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
    _open_frames().append(frame)
    try:
      yield frame
    finally:
      _open_frames().pop()
      self._active.pop()
      self._frames.pop()

  def finish_attention(self, frame: _Frame | None, arguments, outputs) -> None:
    """Records the value statistic of a finished attention call."""
    if frame is None:
      return
    fused = next((role for role in ('qkv', 'kv')
                  if role in frame.projections), None)
    value = frame.projections.get('value') or frame.projections.get(fused)
    if value is None:
      return
    if value is frame.projections.get('value'):
      fused = None
    rule = frame.rule
    mask = _combined_mask(*rule.mask_of(frame.module, arguments))
    probabilities = frame.probabilities
    source = 'model probabilities'
    if probabilities is None and rule.probabilities is not None:
      probabilities = rule.probabilities(frame.module, arguments, outputs)
    if probabilities is None:
      probabilities = self._recompute(frame, mask, arguments)
      source = 'recomputed probabilities'
    if self.survey is not None:
      self.survey.value_sources[value.path] = (
          f'{self.options.value_stat} value statistic from {source} of'
          f' {path_str(frame.path)}')
    mask = _resolve(mask, probabilities.shape, frame)
    entry = _value_entry(
        probabilities, mask, value, self.options.value_stat,
        fused=fused, rule=rule,
        module=frame.module)
    self._emit(value.module, value.path, entry[0], entry[1])

  @contextlib.contextmanager
  def storing_to(self, store: Store):
    """Sends the statistics made meanwhile to ``store`` instead."""
    self._stores.append(store)
    try:
      yield
    finally:
      self._stores.pop()

  # ------------------------------------------------------------------------

  def _role(self, path: Path):
    if not self._frames:
      return None, None
    frame = self._frames[-1]
    base = frame.path
    if len(path) <= len(base) or tuple(path[: len(base)]) != tuple(base):
      return None, None
    role = frame.rule.role_of(tuple(path[len(base):]))
    if role in ('value', 'qkv', 'kv') and not self.options.attention_aware:
      role = None
    return frame, role

  def _unsupported(self, path: Path, reason: str) -> None:
    if self.survey is not None:
      self.survey.unsupported[path] = reason

  def _emit_statistic(self, module, path: Path,
                      statistic: rules.Statistic) -> None:
    call = statistic.call
    mean = _with_bias(statistic.mean, call.has_bias)
    entry = {
        _stats.MEAN: _squeeze_blocks(mean, call.blocks),
        _stats.ROWS: jnp.asarray(statistic.rows, jnp.float32),
    }
    self._emit(module, path, call, entry)

  def _emit(self, module, path: Path, call: rules.LayerCall, entry) -> None:
    if self.survey is not None:
      self.survey.layer(path, call)
    # Statistics are replicated whatever rule made them (layer rules that
    # users register, too), as the optimizer state that takes them is.
    entry = jax.tree.map(_sharding.replicated, entry)
    self._stores[-1](module, path, jax.lax.stop_gradient(entry))

  def _recompute(self, frame: _Frame, mask, arguments) -> jax.Array:
    """softmax(q kᵀ · scale) under the mask, from the kept projections.

    With the rule's ``rope`` applied to the (normed) query and key heads and
    its ``logit_soft_cap`` to the logits, as the module does.
    """
    rule = frame.rule
    heads = rule.heads(frame.module)
    if 'qkv' in frame.projections:
      query, key, _ = _split_fused(frame.projections['qkv'], 3, heads,
                                   rule.qkv_layout, frame)
    elif 'kv' in frame.projections:
      if 'query' not in frame.projections:
        raise ValueError(
            f'attention {path_str(frame.path)}: its query projection was not'
            ' seen, so its attention probabilities can neither be read nor'
            ' recomputed. Check the names in its attention rule.'
        )
      query = _heads(frame.projections['query'], heads)
      key, _ = _split_fused(frame.projections['kv'], 2,
                            rule.kv_heads(frame.module), 'qkv', frame)
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
    if rule.rope is not None:
      query = rule.rope(frame.module, arguments, query)
      key = rule.rope(frame.module, arguments, key)
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
    if key.shape[-2] != query.shape[-2]:
      # Grouped query attention: each key head serves consecutive query heads.
      key = jnp.repeat(key, query.shape[-2] // key.shape[-2], axis=-2)
    scale = rule.scale_of(frame.module)
    if scale is None:
      scale = 1.0 / np.sqrt(query.shape[-1])
    logits = jnp.einsum('...qhd,...khd->...hqk', query * scale, key)
    cap = rule.soft_cap_of(frame.module)
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    mask = _resolve(mask, logits.shape, frame)
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


def _resolve(mask, shape: tuple[int, ...], frame: _Frame):
  """The bool mask (or None) for logits of ``shape``, causal part included.

  Raises, naming the attention module of ``frame``, when the mask does not
  broadcast to ``shape`` ``(..., heads, queries, keys)``: the statistic would
  otherwise be computed under a mask the module does not apply.
  """
  given = mask.mask if isinstance(mask, _CausalMask) else mask
  if given is not None:
    given_shape = tuple(np.shape(given))
    try:
      fits = np.broadcast_shapes(given_shape, tuple(shape)) == tuple(shape)
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
          f'attention {path_str(frame.path)} ({type(frame.module).__name__}):'
          f' its mask has shape {given_shape}, which does not broadcast to'
          f' (batch, heads, queries, keys) = {tuple(shape)}. Give a mask'
          ' argument by name as (batch, keys) (a key-padding mask) or'
          ' broadcastable to (batch, heads, queries, keys), or a callable'
          ' returning such a mask.'
      )
  if isinstance(mask, _CausalMask):
    return mask.resolve(shape[-2], shape[-1])
  return mask


def _lead(projection: _Projection) -> int:
  """How many leading (row) axes the projection's outputs have."""
  return projection.inputs.ndim - len(projection.statistic.call.in_shape)


def _canonical_outputs(projection: _Projection) -> jax.Array:
  """Projection outputs as ``(*rows, *output features)``.

  Most layers already lay their outputs out so; an einsum such as Gemma's
  ``'BTD,SNDH->SBTNH'`` puts its fused axis ``S`` first, and its rule says how
  to move it after the rows (``LayerCall.output_axes``).
  """
  axes = projection.statistic.call.output_axes
  outputs = projection.outputs
  return outputs if axes is None else jnp.transpose(outputs, axes)


def _flat_outputs(projection: _Projection) -> jax.Array:
  """Projection outputs as ``(*rows, features)``, its output axes flattened."""
  outputs = _canonical_outputs(projection)
  return outputs.reshape(outputs.shape[:_lead(projection)] + (-1,))


def _heads(projection: _Projection, heads: int | None) -> jax.Array:
  """Query/key outputs as ``(..., length, heads, head_dim)``."""
  lead = _lead(projection)
  outputs = _canonical_outputs(projection)
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


def _fused_heads(projection: _Projection, parts: int, heads: int | None,
                 layout: str, attention: Path) -> int:
  """Heads of a fused projection: from head-shaped outputs, else ``heads``.

  Head-shaped outputs are ``(parts, heads, head_dim)`` in the ``'qkv'``
  layout (an einsum ``'BTD,SNDH->SBTNH'``), ``(heads, parts, head_dim)`` in
  the ``'heads'`` layout; flat ones need the rule's head count.
  """
  features = _canonical_outputs(projection).shape[_lead(projection):]
  if len(features) == 3:
    part_axis, head_axis = (0, 1) if layout == 'qkv' else (1, 0)
    if features[part_axis] != parts:
      raise ValueError(
          f'attention {path_str(attention)}: the fused projection'
          f' {path_str(projection.path)} has output features {features}, not'
          f' {parts} parts along axis {part_axis} ({layout!r} layout).'
      )
    return int(features[head_axis])
  if heads is None:
    raise ValueError(
        f'attention {path_str(attention)}: the fused projection'
        f' {path_str(projection.path)} has flat outputs; give num_heads'
        f'{" (num_kv_heads for kv)" if parts == 2 else ""} in its attention'
        ' rule.'
    )
  return heads


def _split_fused(projection: _Projection, parts: int, heads: int | None,
                 layout: str, frame: _Frame) -> list[jax.Array]:
  """A fused projection's q/k/v (or k/v) as ``(..., length, heads, dim)``."""
  heads = _fused_heads(projection, parts, heads, layout, frame.path)
  flat = _flat_outputs(projection)
  if layout == 'qkv':
    pieces = flat.reshape(flat.shape[:-1] + (parts, heads, -1))
    return [pieces[..., i, :, :] for i in range(parts)]
  pieces = flat.reshape(flat.shape[:-1] + (heads, parts, -1))
  return [pieces[..., i, :] for i in range(parts)]


def _value_entry(probabilities, mask, value: _Projection, value_stat: str, *,
                 fused: str | None, rule: rules.AttentionRule, module):
  """The ``mac_stats`` node of a value (or fused qkv / kv) projection.

  ``fused`` is None for a value projection of its own, else the fused
  projection's role, ``'qkv'`` or ``'kv'``.

  The value rows of the gradient are ``Σ_q A_qk x_k`` (the output at query
  ``q`` mixes the value inputs ``x_k`` of all keys), so the statistic weighs
  each key position's input by the attention it receives: per head, the
  mean over batch and query rows of ``Σ_k A_bhqk x_bk``; in the reference
  form one vector ``v = Σ_k p̄_k x̄_k`` for all heads, kept as its factors.
  """
  probabilities = probabilities.astype(jnp.float32)
  heads, queries, keys = probabilities.shape[-3:]
  # A query row counts when it may attend somewhere: rows the mask blocks
  # entirely (padding queries) would otherwise dilute the means.
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
  # The attention each key receives, summed over the counted query rows (a
  # sum of products rather than einsum: see _stats.value_mean).
  key_weight = jnp.sum(probabilities * valid[..., None], axis=2)
  # Query rows per head: the weight of this statistic when calls merge.
  query_rows = jnp.sum(valid) / heads
  out_features = _out_features(value)
  # Heads of the value projection itself: the key/value heads under
  # grouped-query attention, fewer than the query heads of `probabilities`.
  if fused == 'kv':
    value_heads = _fused_heads(value, 2, rule.kv_heads(module), 'qkv',
                               value.path)
  elif fused:
    value_heads = _fused_heads(value, 3, rule.heads(module) or heads,
                               rule.qkv_layout, value.path)
  else:
    value_heads = _value_heads(value, heads)
  entry = {}
  if value_stat == 'per_head':
    # Grouped-query attention: each value head serves `groups` consecutive
    # query heads, so its row sums their attention and counts their rows.
    groups = heads // value_heads
    grouped = key_weight.reshape(key_weight.shape[0], value_heads, groups,
                                 keys).sum(axis=2)
    counts = valid.reshape(valid.shape[0], value_heads, groups,
                           queries).sum(axis=(0, 2, 3))
    per_head = jnp.einsum('bgk,bkd->gd', grouped, inputs)
    per_head = per_head / jnp.maximum(counts, 1.0)[:, None]
    value_stat_rows = _with_bias(per_head, has_bias)
    # Value head h uses row h.
    head_index = np.arange(value_heads)
  else:
    # The reference statistic is a product of two means, p̄ (attention per
    # key, over batch, heads and counted query rows) and x̄ (value input per
    # key position, over the batch). Both factors are stored with their
    # counts, so that merged calls recompute v = Σ_k p̄_k x̄_k exactly.
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
    # One row serves every value head.
    head_index = np.zeros(value_heads, np.int64)
  if not fused:
    # A value projection of its own: its output features split into one
    # block per row (per head, or a single block for the reference form).
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
  # Fused projection: query and key blocks keep the plain statistic (the
  # mean input row, as for any dense layer); value blocks take a row of the
  # value statistic. block_source says which, block by block, and _stats
  # assembles mean_input from it after every merge.
  plain = value.statistic
  layout = 'kv' if fused == 'kv' else rule.qkv_layout
  block_source = _fused_block_source(head_index, value_heads, layout)
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
  """Per output block: -1 for query/key (plain), else a value_input row.

  Blocks follow the fused output features: ``'qkv'`` is ``(3, heads,
  head_dim)``, ``'heads'`` is ``(heads, 3, head_dim)`` and ``'kv'`` is ``(2,
  heads, head_dim)`` (key, then value). One value row serves all value heads
  (the reference statistic) unless ``head_index`` numbers them (per head).
  """
  distinct = len(set(head_index.tolist())) > 1
  # With one value row for all heads, a part-major layout needs one block per
  # part (the key part, then the value part); per head, one block per head
  # in each part. The 'heads' layout interleaves the parts within each head,
  # so it always has a (query, key, value) triple of blocks per head.
  if layout == 'kv':
    if not distinct:
      return np.array([-1, 0])
    return np.concatenate([-np.ones(heads, np.int64), head_index])
  if layout == 'qkv':
    if not distinct:
      return np.array([-1, -1, 0])
    plain = -np.ones(heads, np.int64)
    return np.concatenate([plain, plain, head_index])
  per_head = [(-1, -1, h) for h in head_index]
  return np.array(per_head).reshape(-1)


def _out_features(projection: _Projection) -> int:
  return int(np.prod(_canonical_outputs(projection).shape[_lead(projection):]))


def _value_heads(value: _Projection, heads: int) -> int:
  """Heads of the value projection (fewer than query heads under GQA)."""
  # Head-shaped outputs (heads, head_dim) tell the value heads; flat outputs
  # cannot, and are taken to have as many heads as the probabilities.
  out_shape = _canonical_outputs(value).shape[_lead(value):]
  if len(out_shape) == 2 and heads % out_shape[0] == 0:
    return int(out_shape[0])
  return heads

