"""MAC's rank-one preconditioner, applied to a layer or to many at once."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mac_optax import _geometry
from mac_optax import _sharding

# How the damped inverse is scaled: 'damping' multiplies it by λ (the
# reference's rank-one form, eigenvalues in (0, 1]); 'unit' leaves it as it is.
Scale = Literal['damping', 'unit']
SCALES = ('damping', 'unit')
# Earlier names, still accepted: scale='reference' | 'exact' and
# second_moment_scale='unscaled' | 'damping'.
_FORMER_SCALES = {'reference': 'damping', 'exact': 'unit', 'unscaled': 'unit'}


def check_scale(name: str, value: str) -> Scale:
  """``value`` as one of ``SCALES`` (earlier names mapped), or raises."""
  value = _FORMER_SCALES.get(value, value)
  if value not in SCALES:
    raise ValueError(
        f'{name} must be one of {SCALES} (the damped inverse times the'
        f' damping, or the damped inverse itself), got {value!r}.')
  return value


def _inverse_power_of_two_scale(a: jax.Array) -> jax.Array:
  """``2**-e`` per row of ``a``, with ``2**e`` within a factor 2 of max|a|.

  1 for a zero row. The exponent is clipped so that both ``2**e`` and
  ``2**-e`` are normal float32 numbers.
  """
  _, exponent = jnp.frexp(jnp.max(jnp.abs(a), axis=-1))
  exponent = jnp.clip(exponent, -125, 125)
  return jnp.ldexp(jnp.ones(exponent.shape, a.dtype), -exponent)


def rank_one_update(grad, bias_grad, a, damping, scale: Scale):
  """``Ĝ - â (âᵀ Ĝ) / (λ + ‖â‖²)`` on canonical blocks, in float32.

  Args:
    grad: kernel gradients ``(s, d_in, blocks, out)``: ``s`` counts the
      stacked copies of one layer, or of several layers of one shape.
    bias_grad: ``(s, blocks, out)`` or None.
    a: mean inputs ``(s, blocks, d)``, ``d = d_in`` plus one with a bias.
    damping: ``λ``.
    scale: see :data:`Scale`.

  Returns:
    The preconditioned ``(grad, bias_grad)``.
  """
  d_in = grad.shape[1]
  # ‖â‖² overflows float32 once |â| ≳ 1.8e19. With â = s b for a power of
  # two s near max|â|, the update G - b (bᵀG) / (λ/s² + ‖b‖²) is the same,
  # and so is its float arithmetic (powers of two scale without rounding),
  # but it stays finite for any finite â.
  inverse_scale = _inverse_power_of_two_scale(a)
  a = a * inverse_scale[..., None]
  denominator = (damping * inverse_scale * inverse_scale
                 + jnp.sum(jnp.square(a), axis=-1))
  # The bias is the last input coordinate: kept apart to avoid concatenating.
  projection = jnp.einsum('snd,sdno->sno', a[..., :d_in], grad)
  if bias_grad is not None:
    projection = projection + a[..., d_in, None] * bias_grad
  projection = projection / denominator[..., None]
  grad = grad - jnp.einsum('snd,sno->sdno', a[..., :d_in], projection)
  if bias_grad is not None:
    bias_grad = bias_grad - a[..., d_in, None] * projection
  if scale == 'unit':
    grad = grad / damping
    bias_grad = None if bias_grad is None else bias_grad / damping
  return grad, bias_grad


def _block_shape(spec: _geometry.LayerSpec) -> tuple[int, int, int, int]:
  """``(stacks, d_in, blocks, out per block)`` of a layer."""
  stacks = int(np.prod(spec.stack_shape, dtype=np.int64))
  d_in = spec.dim - int(spec.has_bias)
  out = int(np.prod(spec.out_shape, dtype=np.int64)) // spec.blocks
  return stacks, d_in, spec.blocks, out


def to_blocks(kernel, bias, spec):
  """A layer's kernel and bias gradients in the canonical float32 blocks."""
  stacks, d_in, blocks, out = _block_shape(spec)
  grad = spec.to_canonical(kernel).astype(jnp.float32).reshape(
      stacks, d_in, blocks, out)
  bias_grad = (bias.astype(jnp.float32).reshape(stacks, blocks, out)
               if spec.has_bias else None)
  return grad, bias_grad


def from_blocks(grad, bias_grad, kernel, bias, spec):
  """Inverse of :func:`to_blocks`, in the gradients' own dtypes."""
  new_kernel = spec.from_canonical(
      grad.reshape(spec.canonical_kernel_shape).astype(kernel.dtype))
  if not spec.has_bias:
    return new_kernel, None
  return new_kernel, bias_grad.reshape(bias.shape).astype(bias.dtype)


def precondition(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean_input: jax.Array,
    spec: _geometry.LayerSpec,
    damping: jax.Array,
    scale: Scale = 'damping',
) -> tuple[jax.Array, jax.Array | None]:
  r"""Applies MAC's rank-one preconditioner to one layer's gradient.

  With :math:`\hat G` the kernel gradient flattened to ``(d_in, out)`` with the
  bias gradient appended as the last row, and :math:`\hat a` the mean input,

  .. math::
    \hat G \leftarrow \hat G - \frac{\hat a (\hat a^\top \hat G)}
      {\lambda + \|\hat a\|^2}
    = \lambda (\hat a \hat a^\top + \lambda I)^{-1} \hat G,

  never forming a ``d x d`` matrix. ``scale='unit'`` divides by
  :math:`\lambda`, giving the damped inverse itself.

  Args:
    kernel: kernel gradient, shape ``spec.kernel_shape`` (as stored; it is
      transposed to canonical order and back when ``spec.kernel_axes`` says
      so).
    bias: bias gradient, shape ``spec.bias_shape``, or None without bias.
    mean_input: :math:`\hat a`, shape ``spec.stat_shape``.
    spec: the layer geometry.
    damping: :math:`\lambda`.
    scale: ``'damping'`` (the reference's :math:`\lambda`-scaled inverse) or
      ``'unit'``.

  Returns:
    The preconditioned ``(kernel, bias)`` gradients, in their own dtypes.
  """
  scale = check_scale('scale', scale)
  if _sharding.is_explicit(kernel, bias):
    # Gradients sharded over Explicit mesh axes (FSDP, tensor parallelism):
    # the reshapes below would need their output shardings spelled out.
    return _sharding.with_auto_axes(
        lambda kernel, bias, mean_input, damping: precondition(
            kernel, bias, mean_input, spec, damping, scale), (kernel, bias),
        kernel, bias, mean_input, jnp.asarray(damping, jnp.float32))
  damping = jnp.asarray(damping, jnp.float32)
  grad, bias_grad = to_blocks(kernel, bias, spec)
  a = mean_input.astype(jnp.float32).reshape(grad.shape[0], grad.shape[2], -1)
  grad, bias_grad = rank_one_update(grad, bias_grad, a, damping, scale)
  return from_blocks(grad, bias_grad, kernel, bias, spec)
