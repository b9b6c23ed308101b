"""Mean im2col patch of a convolution, without building the patches.

The mean of the patches over a batch is linear in the input, so it equals the
patches of the batch-mean input averaged over output positions. Along each
spatial axis, the output positions that see input index ``r`` through kernel
offset ``i`` are counted in a small ``(kernel, length)`` matrix; contracting the
batch-mean input with one such matrix per axis gives the mean patch exactly, at
``O(C * prod(spatial) * k)`` cost and ``O(C * prod(k))`` output. Padding
(zeros, 'CIRCULAR', 'REFLECT', 'CAUSAL'), strides, kernel dilation and input
dilation only change which entries of those matrices are counted.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mac_optax import _sharding


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Static description of one convolution, in Flax's conventions."""

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int


def _broadcast(value: None | int | Sequence[int], rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(int(v) for v in value)


def _kernel_size(module) -> tuple[int, ...]:
  kernel_size = module.kernel_size
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size,)
  return tuple(int(k) for k in kernel_size)


def _canonical_padding(padding, rank: int):
  """Flax's padding forms as an upper-case string or per-axis pairs."""
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pairs = tuple(
      (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))
      for p in padding
  )
  if len(pairs) != rank:
    raise ValueError(
        f'padding {padding!r} does not have one entry per spatial'
        f' dimension ({rank}).'
    )
  return pairs


def geometry_of(module) -> ConvGeometry:
  """Reads the geometry of a Flax convolution the way Flax interprets it."""
  kernel_size = _kernel_size(module)
  rank = len(kernel_size)
  return ConvGeometry(
      kernel_size=kernel_size,
      strides=_broadcast(module.strides, rank),
      padding=_canonical_padding(module.padding, rank),
      input_dilation=_broadcast(module.input_dilation, rank),
      kernel_dilation=_broadcast(module.kernel_dilation, rank),
      feature_group_count=int(module.feature_group_count),
  )


def _source_index(extended: int, pre_low: int, length: int, mode: str):
  """Maps an index of the pre-padded axis to the input index it reads."""
  r = extended - pre_low
  if mode == 'wrap':
    return r % length
  if mode == 'reflect':
    period = 2 * (length - 1)
    if period == 0:
      return 0
    r %= period
    return r if r < length else period - r
  return r if 0 <= r < length else None


def _axis_counts(
    length: int,
    kernel: int,
    stride: int,
    kernel_dilation: int,
    input_dilation: int,
    pre_pad: tuple[int, int],
    pre_mode: str,
    pad: tuple[int, int],
) -> tuple[np.ndarray, int]:
  """Counts, for one axis, how often offset ``i`` reads input index ``r``.

  Mirrors Flax's order of operations: the optional pre-padding ('CIRCULAR',
  'REFLECT', 'CAUSAL'), then input dilation, then lax's zero padding.
  """
  extended = length + pre_pad[0] + pre_pad[1]
  dilated = (extended - 1) * input_dilation + 1
  padded = dilated + pad[0] + pad[1]
  span = (kernel - 1) * kernel_dilation + 1
  if padded < span:
    raise ValueError(
        f'the kernel (extent {span}) does not fit the padded input (length'
        f' {padded}).'
    )
  positions = (padded - span) // stride + 1
  counts = np.zeros((kernel, length), np.float32)
  for i in range(kernel):
    for p in range(positions):
      q = p * stride + i * kernel_dilation - pad[0]
      if q < 0 or q >= dilated or q % input_dilation:
        continue
      source = _source_index(q // input_dilation, pre_pad[0], length, pre_mode)
      if source is not None:
        counts[i, source] += 1.0
  return counts, positions


def _axis_plans(spatial_shape, geometry: ConvGeometry):
  """Per-axis (pre-pad, pre-pad mode, lax padding), following Flax ``_Conv``."""
  rank = len(geometry.kernel_size)
  spans = [
      (k - 1) * d + 1
      for k, d in zip(geometry.kernel_size, geometry.kernel_dilation)
  ]
  padding = geometry.padding
  no_pad = ((0, 0),) * rank
  if padding in ('CIRCULAR', 'REFLECT'):
    pre = tuple(((s - 1) // 2, s // 2) for s in spans)
    mode = 'wrap' if padding == 'CIRCULAR' else 'reflect'
    return pre, mode, no_pad
  if padding == 'CAUSAL':
    if rank != 1:
      raise ValueError('CAUSAL padding is only defined for 1-D convolutions.')
    return ((spans[0] - 1, 0),), 'zeros', no_pad
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(
        tuple(spatial_shape), spans, geometry.strides, padding
    )
    return no_pad, 'zeros', tuple(tuple(int(v) for v in p) for p in pads)
  return no_pad, 'zeros', padding


def mean_patch(
    inputs: jax.Array, geometry: ConvGeometry
) -> tuple[jax.Array, int]:
  """Mean im2col patch of a Flax convolution input.

  Args:
    inputs: the convolution's input, ``(*batch, *spatial, channels)`` with any
      number of batch dimensions (including none).
    geometry: the convolution's geometry.

  Returns:
    ``(patch, rows)``: the fp32 mean patch of shape
    ``(groups, prod(kernel_size) * channels // groups)``, laid out like the
    Flax kernel ``(*kernel_size, channels // groups)`` flattened, and the number
    of patches it averages over.
  """
  rank = len(geometry.kernel_size)
  if inputs.ndim < rank + 1:
    raise ValueError(
        f'a {rank}-D convolution needs inputs of rank >= {rank + 1}, got shape'
        f' {inputs.shape}.'
    )
  batch_dims = inputs.ndim - rank - 1
  batch_size = int(np.prod(inputs.shape[:batch_dims], dtype=np.int64))
  # One example's worth of values, replicated (see _sharding.replicated).
  mean_input = _sharding.replicated(jnp.mean(
      inputs, axis=tuple(range(batch_dims)), dtype=jnp.float32
  ))
  spatial_shape = mean_input.shape[:-1]
  channels = mean_input.shape[-1]
  pre_pads, pre_mode, pads = _axis_plans(spatial_shape, geometry)
  counts, positions = [], 1
  for axis in range(rank):
    axis_counts, axis_positions = _axis_counts(
        spatial_shape[axis],
        geometry.kernel_size[axis],
        geometry.strides[axis],
        geometry.kernel_dilation[axis],
        geometry.input_dilation[axis],
        pre_pads[axis],
        pre_mode,
        pads[axis],
    )
    counts.append(jnp.asarray(axis_counts))
    positions *= axis_positions
  letters = string.ascii_letters
  kernel_axes = letters[:rank]
  input_axes = letters[rank : 2 * rank]
  spec = ','.join(k + r for k, r in zip(kernel_axes, input_axes))
  spec += f',{input_axes}z->{kernel_axes}z'
  patch = jnp.einsum(spec, *counts, mean_input) / positions
  groups = geometry.feature_group_count
  if channels % groups:
    raise ValueError(
        f'{channels} input channels are not divisible by'
        f' feature_group_count={groups}.'
    )
  patch = patch.reshape(geometry.kernel_size + (groups, channels // groups))
  patch = jnp.moveaxis(patch, rank, 0).reshape(groups, -1)
  return patch, batch_size * positions


def transpose_geometry_of(module) -> ConvGeometry:
  """The stride-1 convolution that ``lax.conv_transpose`` computes.

  ``conv_transpose`` dilates its input by the strides and pads it (for
  'SAME'/'VALID', the padding of the forward convolution it transposes), then
  convolves with stride 1; with ``transpose_kernel=False`` the kernel is used
  as is.
  """
  kernel_size = _kernel_size(module)
  rank = len(kernel_size)
  strides = _broadcast(module.strides, rank)
  kernel_dilation = _broadcast(module.kernel_dilation, rank)
  pads = _canonical_padding(module.padding, rank)
  if pads in ('SAME', 'VALID'):
    spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = tuple(
        _transpose_padding(span, stride, pads)
        for span, stride in zip(spans, strides)
    )
  return ConvGeometry(
      kernel_size=kernel_size,
      strides=(1,) * rank,
      padding=pads,
      input_dilation=strides,
      kernel_dilation=kernel_dilation,
      feature_group_count=1,
  )


def _transpose_padding(span: int, stride: int, padding: str):
  """Padding of the dilated input for a transposed 'SAME'/'VALID' conv."""
  if padding == 'SAME':
    total = span + stride - 2
    before = span - 1 if stride > span - 1 else -(-total // 2)
  else:
    total = span + stride - 2 + max(span - stride, 0)
    before = span - 1
  return before, total - before


def patches(inputs: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """Every im2col patch of a Flax convolution's input.

  Padding follows Flax: 'CIRCULAR', 'REFLECT' and 'CAUSAL' pre-pad the
  input, other paddings go to the convolution as they are.

  Args:
    inputs: ``(*batch, *spatial, channels)`` with any number of batch
      dimensions (including none).
    geometry: the convolution's geometry (feature groups are ignored).

  Returns:
    ``(*batch, *output_spatial, channels * prod(kernel_size))`` in
    ``lax.conv_general_dilated_patches``' channel-major ``(C, *kernel)``
    order, the order of a ``ConvLocal`` kernel.
  """
  rank = len(geometry.kernel_size)
  if not 1 <= rank <= 3:
    raise ValueError('only 1-, 2- and 3-D convolutions are supported here.')
  batch_shape = inputs.shape[: inputs.ndim - rank - 1]
  x = inputs.reshape((-1,) + inputs.shape[inputs.ndim - rank - 1:])
  pre_pads, pre_mode, pads = _axis_plans(x.shape[1:-1], geometry)
  mode = {'zeros': 'constant', 'wrap': 'wrap', 'reflect': 'reflect'}[pre_mode]
  x = jnp.pad(x, ((0, 0),) + tuple(pre_pads) + ((0, 0),), mode=mode)
  spatial = 'DHW'[-rank:]
  result = jax.lax.conv_general_dilated_patches(
      x,
      filter_shape=geometry.kernel_size,
      window_strides=geometry.strides,
      padding=pads,
      lhs_dilation=geometry.input_dilation,
      rhs_dilation=geometry.kernel_dilation,
      dimension_numbers=('N' + spatial + 'C', spatial + 'IO',
                         'N' + spatial + 'C'),
      precision=jax.lax.Precision.HIGHEST,
  )
  return result.reshape(batch_shape + result.shape[1:])


def mean_patch_per_position(
    inputs: jax.Array, geometry: ConvGeometry
) -> tuple[jax.Array, int]:
  """Mean im2col patch at every output position (for unshared convolutions).

  Patches are linear in the input, so the patches of the batch-mean input are
  the batch means of the patches; only one example's patches are built.

  Returns:
    ``(patches, rows)``: shape ``(*output_spatial, channels * prod(kernel))``
    in the channel-major order of :func:`patches`, and the batch size.
  """
  rank = len(geometry.kernel_size)
  batch_dims = inputs.ndim - rank - 1
  batch_size = int(np.prod(inputs.shape[:batch_dims], dtype=np.int64))
  # One example's worth of values, replicated (see _sharding.replicated).
  mean_input = _sharding.replicated(jnp.mean(
      inputs, axis=tuple(range(batch_dims)), dtype=jnp.float32
  ))
  return patches(mean_input, geometry), batch_size
