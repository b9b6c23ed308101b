"""How MAC reads each kind of layer: a table of rules keyed by module class.

A *layer rule* turns one call of a layer into its MAC statistic: the mean of
the rows the kernel multiplies (input rows for dense layers, im2col patches for
convolutions), laid out like the kernel's input axes. An *attention rule* says
where an attention module's projections and probabilities are, so that its
value projection gets the attention-weighted statistic. The same rules serve
Flax linen and Flax NNX; modules that only pass through (norms, embeddings)
have a rule that names the reason.

Users extend the table with :func:`register_attention` (attention written by
hand) and :func:`register_layer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence, get_args

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum

from mac_optax import _sharding
from mac_optax._capture import conv

Arguments = Mapping[str, Any]


# The kinds of preconditioned layers (LayerCall.kind, LayerSpec.kind).
LayerKind = Literal['dense', 'conv', 'conv_transpose', 'conv_local', 'einsum',
                    'attention_value', 'attention_qkv']


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """What one call says about a preconditioned layer's geometry.

  A rule sees one call, not the parameters, so this is the part of
  :class:`LayerSpec` that the call tells: :func:`find_layers` completes it
  into the layer's ``LayerSpec`` with what only the parameters tell (the
  output axes, the axes stacked by ``nn.scan``) and resolves ``kernel_axes``,
  given here relative to the unstacked kernel, into the full permutation.
  ``output_axes`` is the call's own: attention rules read the projection
  outputs through it.

  Attributes:
    kind: ``'dense'``, ``'conv'``, ``'conv_transpose'``, ``'conv_local'``,
      ``'einsum'``, ``'attention_value'`` or ``'attention_qkv'``.
    module: the module's class name.
    in_shape: the kernel axes contracted with the input.
    blocks: output blocks with a statistic each (groups, heads, q/k/v).
    has_bias: whether the bias is preconditioned jointly.
    kernel_axes: where the kernel stores its contracted input axes and then
      its output axes, when not in that order: positions among the kernel
      axes after its leading stacked axes (negative ones count from the end).
      Listed positions come first, in the order given, and unlisted axes
      follow in stored order; None when the kernel already is ``in + out``.
      A kernel stored ``(out, in)`` gives ``(-1,)``.
    output_axes: the permutation of the module's output that puts the rows
      first and the output features last, in the order of the kernel's
      (canonical) output axes; None when the output already is laid out so.
      Attention rules read query/key/value heads through it.
  """

  kind: LayerKind
  module: str
  in_shape: tuple[int, ...]
  blocks: int
  has_bias: bool
  kernel_axes: tuple[int, ...] | None = None
  output_axes: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Statistic:
  """One call's statistic: ``mean`` is ``(*per_slice, blocks, d_in)`` fp32.

  ``per_slice`` are kernel axes that hold separate weights per slice (the
  batch dims of a ``DenseGeneral``, the positions of a ``ConvLocal``); the
  bias coordinate is not included yet.
  """

  mean: jax.Array
  rows: Any
  call: LayerCall


class LayerRule(Protocol):
  """How MAC reads one layer class: what :func:`register_layer` takes.

  The built-in rules (:class:`DenseRule`, :class:`ConvRule`,
  :class:`ConvTransposeRule`, :class:`ConvLocalRule`, :class:`EinsumRule`)
  follow it, as may any object with this ``read`` method.
  """

  def read(self, module: Any, arguments: Arguments, inputs: jax.Array,
           options: Any) -> Statistic | str:
    """Reads one call of ``module``.

    Args:
      module: the called module (linen: bound, so its fields are set).
      arguments: the call's arguments by parameter name (defaults applied).
      inputs: the call's first positional argument, the layer input.
      options: the capture options (``attention_aware``, ``value_stat``,
        ``depthwise_shared``).

    Returns:
      The call's :class:`Statistic`: the mean of the rows the kernel
      multiplies, ``(*per_slice, blocks, d_in)`` in float32, laid out like
      the kernel's input axes, with the row count and the
      :class:`LayerCall` geometry. Or a string: the reason this call cannot
      be preconditioned (the layer then gets momentum only and
      :func:`summary` shows the reason).
    """
    ...


# The attention value statistic: one head-averaged vector (the authors') or
# one row per head.
ValueStat = Literal['reference', 'per_head']
VALUE_STATS: tuple[str, ...] = get_args(ValueStat)


def check_value_stat(value_stat: str) -> None:
  """Raises unless ``value_stat`` is one of ``VALUE_STATS``."""
  if value_stat not in VALUE_STATS:
    raise ValueError(
        f'value_stat must be one of {VALUE_STATS}, got {value_stat!r}.'
    )


@dataclasses.dataclass(frozen=True)
class Options:
  """Capture options that rules consult, checked once when made.

  Every capture entry point (``capture``, ``recording``, ``with_stats``) makes
  one from its keyword arguments and hands that object down; nothing below
  rebuilds it.
  """

  attention_aware: bool = True
  value_stat: ValueStat = 'reference'
  depthwise_shared: bool = True

  def __post_init__(self):
    check_value_stat(self.value_stat)


def _moved_mean(inputs, contracted, sliced=()):
  """Mean over all axes but ``sliced`` and ``contracted`` (flattened last).

  The mean is taken before anything is reshaped, so that a batch axis that
  is sharded (explicit mesh axes) is reduced, not reshaped; the small mean is
  then replicated, whichever axes of the input were sharded.
  """
  ndim = inputs.ndim
  rest = tuple(a for a in range(ndim)
               if a not in contracted and a not in sliced)
  rows = math.prod(inputs.shape[a] for a in rest)
  mean = jnp.mean(inputs, axis=rest, dtype=jnp.float32)
  mean = _sharding.replicated(mean)
  kept = [a for a in range(ndim) if a not in rest]
  mean = jnp.transpose(
      mean, [kept.index(a) for a in tuple(sliced) + tuple(contracted)])
  slice_shape = tuple(inputs.shape[a] for a in sliced)
  in_shape = tuple(inputs.shape[a] for a in contracted)
  mean = mean.reshape(slice_shape + (math.prod(in_shape),))
  return mean[..., None, :], rows, in_shape


def _normalize_axes(axes, ndim) -> tuple[int, ...]:
  return tuple(sorted(int(a) % ndim for a in np.atleast_1d(axes)))


# How a dense kernel stores its axes: input then output (Flax), or transposed.
KernelLayout = Literal['in_out', 'out_in']
KERNEL_LAYOUTS: tuple[str, ...] = get_args(KernelLayout)
# Output features of a fused query/key/value projection: (3, heads, head_dim)
# or interleaved per head, (heads, 3, head_dim).
QkvLayout = Literal['qkv', 'heads']
QKV_LAYOUTS: tuple[str, ...] = get_args(QkvLayout)


@dataclasses.dataclass(frozen=True)
class DenseRule:
  """Dense layers: mean input row over all non-contracted axes.

  Attributes:
    axes: a callable ``module -> axes``: the module's contracted input axes.
    has_bias: a callable ``module -> bool``: whether the module adds a bias.
    batch_axes: a callable ``module -> axes``: input axes with separate
      weights per index (they lead the kernel), or none.
    kernel_layout: ``'in_out'`` when the kernel is stored ``(*batch, *in,
      *out)`` (Flax's ``Dense``), ``'out_in'`` when it is stored ``(*batch,
      *out, *in)`` (a transposed kernel such as Hugging Face's
      ``FlaxConv1D``, whose kernel is ``(features, in_features)``).

  Examples:
    A dense layer that stores its kernel transposed:

    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> class TransposedDense(nn.Module):
    ...   features: int
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     kernel = self.param('kernel', nn.initializers.lecun_normal(),
    ...                         (self.features, x.shape[-1]))
    ...     return x @ kernel.T
    >>> mac_optax.register_layer(TransposedDense, mac_optax.DenseRule(
    ...     axes=lambda module: -1, has_bias=lambda module: False,
    ...     kernel_layout='out_in'))
    >>> x = jnp.ones((4, 3))
    >>> model = TransposedDense(2)
    >>> variables = model.init(jax.random.key(0), x)
    >>> spec = mac_optax.find_layers(model.apply, variables, x)[()]
    >>> spec.kernel_shape, spec.in_shape, spec.out_shape
    ((2, 3), (3,), (2,))
  """

  axes: Callable[[Any], Any]
  has_bias: Callable[[Any], bool]
  batch_axes: Callable[[Any], Any] = lambda module: ()
  kernel_layout: KernelLayout = 'in_out'

  def __post_init__(self):
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ValueError(
          f'kernel_layout must be one of {KERNEL_LAYOUTS}, got'
          f' {self.kernel_layout!r}.'
      )

  def read(self, module, arguments: Arguments, inputs, options) -> Statistic:
    del arguments, options
    axes = _normalize_axes(self.axes(module), inputs.ndim)
    batch = tuple(self.batch_axes(module))
    batch = _normalize_axes(batch, inputs.ndim) if batch else ()
    mean, rows, in_shape = _moved_mean(inputs, axes, batch)
    # 'out_in': the input axes are the kernel's last ones, in input order.
    kernel_axes = (tuple(range(-len(axes), 0))
                   if self.kernel_layout == 'out_in' else None)
    call = LayerCall('dense', type(module).__name__, in_shape, 1,
                     self.has_bias(module), kernel_axes)
    return Statistic(mean, rows, call)

  def rows(self, module, inputs) -> jax.Array:
    """Every input row, ``(rows, d_in)`` in kernel order (no batch dims)."""
    axes = _normalize_axes(self.axes(module), inputs.ndim)
    rest = tuple(a for a in range(inputs.ndim) if a not in axes)
    width = math.prod(inputs.shape[a] for a in axes)
    return jnp.transpose(inputs, rest + axes).reshape(-1, width)


@dataclasses.dataclass(frozen=True)
class EinsumRule:
  """``Einsum`` layers whose equation is a plain contraction.

  Every kernel axis is either contracted with the input or an output axis,
  in any order: ``'btd,dnh->btnh'``, Gemma's ``'BTD,NDH->BTNH'``, or
  ``'BTD,SNDH->SBTNH'``, whose fused query/key/value axis ``S`` indexes the
  kernel and the output. The statistic is the mean input over the contracted
  axes, flattened in the kernel's own order of those axes. The output
  features keep the kernel's order of its output axes, or the output's
  order when there is a bias, which must cover exactly the output axes in
  the output's order. Kernel axes that also index the input and the output
  (per-expert weights of a mixture of experts) are not a plain contraction
  and pass through.

  Attributes:
    equation: a callable ``(module, arguments) -> str``, the equation of the
      call.
    kernel_shape: a callable ``module -> shape``, the kernel as stored.
    bias_shape: a callable ``(module, kernel_letters, output_letters,
      kernel_shape) -> shape or None`` (None without a bias).
  """

  equation: Callable[[Any, Arguments], str]
  kernel_shape: Callable[[Any], Sequence[int]]
  bias_shape: Callable[[Any, str, str, Sequence[int]], Any]

  def read(self, module, arguments, inputs, options) -> Statistic | str:
    del options
    equation = self.equation(module, arguments).replace(' ', '')
    kernel_shape = tuple(self.kernel_shape(module))
    kernel = jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
    operands, output, _ = opt_einsum.parser.parse_einsum_input(
        (equation, jax.ShapeDtypeStruct(inputs.shape, inputs.dtype), kernel)
    )
    lhs, rhs = operands.split(',')
    shared = [c for c in rhs if c in lhs and c in output]
    if shared:
      return (f'einsum {equation!r}: kernel axes {"".join(shared)} also index'
              ' the input and the output (batched or per-expert weights)')
    if any(c not in lhs and c not in output for c in rhs) or any(
        c not in rhs and c not in output for c in lhs):
      return f'einsum {equation!r} sums an axis of one operand alone'
    contracted = [c for c in rhs if c in lhs]
    bias_shape = self.bias_shape(module, rhs, output, kernel_shape)
    has_bias = bias_shape is not None
    # The bias is laid out like the output, so with one the output features
    # follow the output's order; without, the kernel's (no transpose).
    out_letters = [c for c in (output if has_bias else rhs) if c in output
                   and c in rhs]
    expected_bias = tuple(kernel_shape[rhs.index(c)] for c in out_letters)
    if has_bias and tuple(bias_shape) != expected_bias:
      return (f'einsum {equation!r}: the bias of shape {tuple(bias_shape)}'
              f' does not cover the kernel output axes {"".join(out_letters)}'
              f' in output order (shape {expected_bias})')
    kernel_axes = tuple(rhs.index(c) for c in contracted + out_letters)
    row_letters = [c for c in output if c not in rhs]
    output_axes = tuple(output.index(c) for c in row_letters + out_letters)
    identity = lambda axes: axes == tuple(range(len(axes)))
    axes = [lhs.index(c) for c in contracted]
    mean, rows, in_shape = _moved_mean(inputs, axes)
    call = LayerCall(
        'einsum', type(module).__name__, in_shape, 1, has_bias,
        None if identity(kernel_axes) else kernel_axes,
        None if identity(output_axes) else output_axes,
    )
    return Statistic(mean, rows, call)


@dataclasses.dataclass(frozen=True)
class ConvRule:
  """Convolutions with shared weights: the mean im2col patch."""

  has_bias: Callable[[Any], bool]

  def read(self, module, arguments, inputs, options) -> Statistic | str:
    del arguments
    if module.mask is not None:
      return 'Conv with a kernel mask'
    geometry = conv.geometry_of(module)
    mean, rows = conv.mean_patch(inputs, geometry)
    groups = geometry.feature_group_count
    channels = inputs.shape[-1]
    if options.depthwise_shared and 1 < groups == channels:
      mean = jnp.mean(mean, axis=0, keepdims=True)
    in_shape = geometry.kernel_size + (channels // groups,)
    call = LayerCall('conv', type(module).__name__, in_shape, mean.shape[0],
                     self.has_bias(module))
    return Statistic(mean, rows, call)

  def rows(self, module, inputs) -> jax.Array:
    """Every im2col patch, ``(rows, d_in)`` in kernel order (no groups)."""
    geometry = conv.geometry_of(module)
    if geometry.feature_group_count != 1:
      raise ValueError(
          f'{type(module).__name__} with feature_group_count='
          f'{geometry.feature_group_count}: full input rows are defined for'
          ' ungrouped convolutions only.'
      )
    channels = inputs.shape[-1]
    patches = conv.patches(inputs, geometry)
    patches = patches.reshape((-1, channels) + geometry.kernel_size)
    # Channel-major (C, *kernel_size) patches to the kernel's (*kernel_size, C).
    return jnp.moveaxis(patches, 1, -1).reshape(patches.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class ConvTransposeRule:
  """Transposed convolutions: the mean patch of the equivalent convolution.

  ``lax.conv_transpose`` is a stride-1 convolution of the input dilated by
  the strides, so its statistic is that convolution's mean patch.
  """

  has_bias: Callable[[Any], bool]

  def read(self, module, arguments, inputs, options) -> Statistic | str:
    del arguments, options
    if module.mask is not None:
      return 'ConvTranspose with a kernel mask'
    if module.transpose_kernel:
      return ('ConvTranspose with transpose_kernel=True (its kernel is laid'
              ' out (*kernel_size, out, in))')
    if isinstance(module.padding, str) and module.padding.upper() == 'CIRCULAR':
      return 'ConvTranspose with CIRCULAR padding (outputs are wrapped)'
    geometry = conv.transpose_geometry_of(module)
    mean, rows = conv.mean_patch(inputs, geometry)
    in_shape = geometry.kernel_size + (inputs.shape[-1],)
    call = LayerCall('conv_transpose', type(module).__name__, in_shape, 1,
                     self.has_bias(module))
    return Statistic(mean, rows, call)


@dataclasses.dataclass(frozen=True)
class ConvLocalRule:
  """Unshared convolutions: one mean patch per output position."""

  def read(self, module, arguments, inputs, options) -> Statistic | str:
    del arguments, options
    if module.mask is not None:
      return 'ConvLocal with a kernel mask'
    geometry = conv.geometry_of(module)
    mean, rows = conv.mean_patch_per_position(inputs, geometry)
    call = LayerCall('conv_local', type(module).__name__, (mean.shape[-1],),
                     1, module.use_bias)
    return Statistic(mean[..., None, :], rows, call)


@dataclasses.dataclass(frozen=True)
class PassThrough:
  """A module MAC sees but does not precondition, and why."""

  reason: str


def _for_module(value, module):
  """A rule field given as a value or as a function of the module."""
  return value(module) if callable(value) else value


@dataclasses.dataclass(frozen=True)
class AttentionRule:
  """Where an attention module's projections and probabilities are.

  Attributes:
    query: child name (or tuple path) of the query projection.
    key: child name of the key projection.
    value: child name of the value projection; it gets the attention-weighted
      statistic.
    qkv: child name of a fused projection producing query, key and value
      (instead of ``query``/``key``/``value``).
    qkv_layout: output-feature layout of the fused projection: ``'qkv'`` for
      ``(3, heads, head_dim)`` (timm, nanoGPT, Hugging Face GPT-2, Gemma's
      ``'BTD,SNDH->SBTNH'`` einsum) or ``'heads'`` for ``(heads, 3,
      head_dim)`` (interleaved per head).
    kv: child name of a fused projection producing key and value, output
      features ``(2, kv_heads, head_dim)``: key block, then value block
      (Gemma's ``'BSD,CKDH->CBSKH'`` einsum), with ``query`` apart. A rule
      may name ``qkv`` and ``kv`` (and ``query``) together for a class whose
      instances use either; only the children a call uses count.
    num_heads: heads, or a callable of the module; needed when the
      projections are not head-shaped (plain ``Dense``).
    num_kv_heads: key/value heads (grouped-query attention), or a callable
      of the module; needed only when a fused ``kv`` projection is not
      head-shaped. Each key/value head serves consecutive query heads.
    mask: a callable ``(module, arguments) -> bool mask or None``
      broadcastable to ``(batch, heads, queries, keys)`` (True = attend), or
      the name of the call argument holding it. A named argument of shape
      ``(batch, keys)`` is a key-padding mask (Hugging Face's
      ``attention_mask``: nonzero = token, padding otherwise); of any other
      shape it must broadcast to ``(batch, heads, queries, keys)``.
    causal: a bool, or a callable ``(module, arguments) -> bool``: the module
      also applies a causal mask.
    query_norm: child applied to the query projection before the logits.
    key_norm: child applied to the key projection before the logits.
    probabilities: a callable ``(module, arguments, outputs) -> (batch, heads,
      queries, keys)`` probabilities the module exposes (e.g. read from a sown
      variable); None recomputes ``softmax(q kᵀ · scale)`` under the mask from
      the projections.
    scale: logit scale (a float, or a callable of the module); None for
      ``1/sqrt(head_dim)``.
    skip: a callable ``(module, arguments) -> bool``: calls to ignore (e.g.
      autoregressive decoding).
    rope: for recomputed probabilities, a callable ``(module, arguments,
      x) -> x`` the module applies to its query and key heads ``(batch,
      length, heads, head_dim)`` after any norm and before the logits, such
      as rotary position embeddings.
    logit_soft_cap: for recomputed probabilities, the cap ``c`` of logits
      soft-capped as ``c * tanh(logits / c)`` before the mask (Gemma); a
      float, a callable of the module, or None for none.
  """

  query: Any = 'query'
  key: Any = 'key'
  value: Any = 'value'
  qkv: Any = None
  qkv_layout: QkvLayout = 'qkv'
  num_heads: Any = None
  mask: Any = 'mask'
  causal: Any = False
  query_norm: Any = None
  key_norm: Any = None
  probabilities: Callable[..., Any] | None = None
  scale: Any = None
  skip: Callable[[Any, Arguments], bool] | None = None
  kv: Any = None
  num_kv_heads: Any = None
  rope: Callable[[Any, Arguments, Any], Any] | None = None
  logit_soft_cap: Any = None

  def __post_init__(self):
    if self.qkv_layout not in QKV_LAYOUTS:
      raise ValueError(
          f"qkv_layout must be 'qkv' or 'heads', got {self.qkv_layout!r}."
      )
    if self.qkv is None and self.value is None and self.kv is None:
      raise ValueError('an attention rule needs `value`, `qkv` or `kv`.')

  def role_of(self, relative: tuple[Any, ...]) -> str | None:
    """Which projection a child (path relative to the module) is."""
    for role in ('query', 'key', 'value', 'qkv', 'kv', 'query_norm',
                 'key_norm'):
      name = getattr(self, role)
      if name is not None and as_path(name) == relative:
        return role
    return None

  def heads(self, module) -> int | None:
    heads = _for_module(self.num_heads, module)
    return None if heads is None else int(heads)

  def kv_heads(self, module) -> int | None:
    heads = _for_module(self.num_kv_heads, module)
    return None if heads is None else int(heads)

  def scale_of(self, module) -> float | None:
    return _for_module(self.scale, module)

  def soft_cap_of(self, module) -> float | None:
    return _for_module(self.logit_soft_cap, module)

  def mask_of(self, module, arguments: Arguments):
    if self.mask is None:
      mask = None
    elif callable(self.mask):
      mask = self.mask(module, arguments)
    else:
      mask = arguments.get(self.mask)
      if mask is not None and jnp.ndim(mask) == 2:
        # (batch, keys): a padding mask over the keys, the same for every
        # head and query (as Hugging Face models expand it).
        mask = jnp.asarray(mask)[:, None, None, :] > 0
    causal = self.causal(module, arguments) if callable(self.causal) else (
        self.causal)
    return mask, bool(causal)


def as_path(name) -> tuple[Any, ...]:
  """A child name or tuple of names as a relative module path."""
  return tuple(name) if isinstance(name, (tuple, list)) else (name,)


_LAYER_RULES: dict[type, Any] = {}
_ATTENTION_RULES: dict[type, AttentionRule] = {}


def register_layer(module_class: type, rule: Any) -> None:
  """Registers how MAC reads a layer class (and its subclasses).

  The kernel of such a layer is its ``'kernel'`` parameter (and the bias its
  ``'bias'``). Built-in rules cover most layers: :class:`DenseRule` (with
  ``kernel_layout='out_in'`` for a kernel stored transposed),
  :class:`EinsumRule` (kernel axes in any order), :class:`ConvRule`,
  :class:`ConvTransposeRule`, :class:`ConvLocalRule`; any object with the
  :class:`LayerRule` ``read`` method works too.

  Args:
    module_class: a Flax linen or NNX module class.
    rule: a :class:`LayerRule`, such as a built-in class's
      (``mac_optax.rule_of(nn.Dense)``), or ``PassThrough(reason)``.
  """
  if not isinstance(rule, PassThrough) and not callable(
      getattr(rule, 'read', None)):
    raise TypeError(
        f'register_layer({module_class.__name__}, ...): the rule must have a'
        ' read(module, arguments, inputs, options) method (see'
        f' mac_optax.LayerRule) or be a PassThrough; got'
        f' {type(rule).__name__}.'
    )
  _LAYER_RULES[module_class] = rule


def register_attention(module_class: type, rule: AttentionRule | None = None,
                       **fields) -> AttentionRule:
  r"""Declares an attention module written by hand, once per class.

  Calls of ``module_class`` (and its subclasses) then give their value
  projection MAC's attention-aware statistic, exactly as for Flax's own
  attention: the value rows of the gradient are preconditioned with the
  attention-weighted mean input :math:`v = \sum_j \bar p_j \bar x_j`, under
  the module's mask. The query, key (and output) projections keep their plain
  statistic. Works for linen and NNX modules.

  Args:
    module_class: the attention module class.
    rule: an :class:`AttentionRule`, or None to build one from ``fields``.
    **fields: :class:`AttentionRule` fields.

  Returns:
    The registered rule.

  Examples:
    Hugging Face-style attention: three ``nn.Dense`` projections, heads split
    by reshaping, a padding mask given as ``attention_mask`` (1 = token):

    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> class SelfAttention(nn.Module):
    ...   heads: int = 2
    ...   @nn.compact
    ...   def __call__(self, x, attention_mask):
    ...     split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
    ...     q, k, v = (split(nn.Dense(4, name=n)(x))
    ...                for n in ('query', 'key', 'value'))
    ...     bias = jnp.where(attention_mask[:, None, None, :] > 0, 0., -1e9)
    ...     p = nn.dot_product_attention_weights(q, k, bias=bias)
    ...     return jnp.einsum('bhqk,bkhd->bqhd', p, v).reshape(x.shape)
    >>> _ = mac_optax.register_attention(
    ...     SelfAttention,
    ...     num_heads=lambda module: module.heads,
    ...     mask=lambda module, args: args['attention_mask'][:, None, None] > 0,
    ... )
    >>> x, attention_mask = jnp.ones((2, 3, 4)), jnp.array([[1, 1, 0]] * 2)
    >>> model = SelfAttention()
    >>> variables = model.init(jax.random.key(0), x, attention_mask)
    >>> layers = mac_optax.find_layers(model.apply, variables, x,
    ...                                attention_mask)
    >>> layers['value',].kind
    'attention_value'
  """
  if rule is None:
    rule = AttentionRule(**fields)
  elif fields:
    rule = dataclasses.replace(rule, **fields)
  _ATTENTION_RULES[module_class] = rule
  return rule


# Called before every lookup, so that rules of libraries imported since (the
# Hugging Face transformers families of the transformers module) are in the
# table. The module that knows such a library adds itself here on import,
# which keeps this table free of imports of its users.
_BEFORE_LOOKUP: list[Callable[[], None]] = []


def before_lookup(register: Callable[[], None]) -> None:
  """Runs ``register()`` before every rule lookup (to register lazily)."""
  _BEFORE_LOOKUP.append(register)


def _lookup(table: Mapping[type, Any], cls: type):
  for register in _BEFORE_LOOKUP:
    register()
  for base in cls.__mro__:
    if base in table:
      return table[base]
  return None


def attention_rule_of(module) -> AttentionRule | None:
  return _lookup(_ATTENTION_RULES, type(module))


def rule_of(module_or_class) -> Any:
  """The layer rule for a module (or class), or None if MAC does not know it."""
  cls = (module_or_class if isinstance(module_or_class, type)
         else type(module_or_class))
  return _lookup(_LAYER_RULES, cls)


def rule_classes() -> tuple[type, ...]:
  """Every class with a rule (for NNX, whose calls must be wrapped)."""
  return tuple(_LAYER_RULES) + tuple(_ATTENTION_RULES)


# --------------------------------------------------------------------------
# Built-in rules.


def _linen_bias(module) -> bool:
  return bool(module.use_bias)


def _nnx_bias(module) -> bool:
  return getattr(module, 'bias', None) is not None


def _linen_einsum_bias(module, kernel_letters, output_letters, kernel_shape):
  if not module.use_bias:
    return None
  return tuple(kernel_shape[kernel_letters.index(c)]
               for c in output_letters if c in kernel_letters)


def _decode_call(module, arguments) -> bool:
  decode = arguments.get('decode')
  return bool(module.decode if decode is None else decode)


def _flax_mask(module, arguments):
  # Flax broadcasts its `mask` argument as given, so a 2-D mask is
  # (queries, keys) there, not the key-padding mask of the name form.
  del module
  return arguments.get('mask')


register_layer(nn.Dense, DenseRule(lambda m: -1, _linen_bias))
register_layer(
    nn.DenseGeneral,
    DenseRule(lambda m: m.axis, _linen_bias, lambda m: m.batch_dims),
)
register_layer(nn.Conv, ConvRule(_linen_bias))
register_layer(nn.ConvTranspose, ConvTransposeRule(_linen_bias))
register_layer(nn.ConvLocal, ConvLocalRule())
register_layer(
    nn.Einsum,
    EinsumRule(
        lambda m, args: args.get('einsum_str') or m.einsum_str,
        lambda m: m.shape,
        _linen_einsum_bias,
    ),
)
register_layer(nnx.Linear, DenseRule(lambda m: -1, _nnx_bias))
register_layer(
    nnx.LinearGeneral,
    DenseRule(lambda m: m.axis, _nnx_bias, lambda m: tuple(m.batch_axis)),
)
register_layer(nnx.Conv, ConvRule(_nnx_bias))
register_layer(nnx.ConvTranspose, ConvTransposeRule(_nnx_bias))
register_layer(
    nnx.Einsum,
    EinsumRule(
        lambda m, args: args.get('einsum_str') or m.einsum_str,
        lambda m: m.kernel_shape,
        lambda m, kernel_letters, output_letters, kernel_shape: (
            None if m.bias is None else tuple(m.bias_shape)),
    ),
)
_EMBED = PassThrough(
    'embedding (its input is token ids; the reference passes embeddings'
    ' through)')
register_layer(nn.Embed, _EMBED)
register_layer(nnx.Embed, _EMBED)

register_attention(
    nn.MultiHeadDotProductAttention,
    query_norm='query_ln',
    key_norm='key_ln',
    mask=_flax_mask,
    skip=lambda module, arguments: bool(module.decode),
)
register_attention(
    nnx.MultiHeadAttention,
    query_norm='query_ln',
    key_norm='key_ln',
    mask=_flax_mask,
    causal=lambda module, arguments: bool(arguments.get('is_causal')),
    skip=_decode_call,
)
