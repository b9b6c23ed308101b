"""Dense numpy formulations of the reference MAC maths, used as test oracles.

Everything here is float64 numpy written from the authors' PyTorch code as
described in the spec, and deliberately shares no code with mac_optax:
convolution statistics materialise the im2col patches of the whole batch in
PyTorch's (channel, kh, kw) order, attention is recomputed from the query/key
projections with the mask, and the preconditioner is the explicit d x d matrix
``I - â âᵀ / (λ + ‖â‖²)`` applied to the gradient in PyTorch's (out, in)
layout.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np


# --------------------------------------------------------------------------
# Layer inputs, recorded by a deliberately simple interceptor.

RAW = 'raw_inputs'


def record_raw(next_fun, args, kwargs, context):
  """Sows the full input of every Dense/DenseGeneral/Conv, q/k outputs, masks."""
  module = context.module
  if context.method_name != '__call__' or module.is_initializing():
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.MultiHeadDotProductAttention):
    mask = kwargs.get('mask')
    if mask is not None:
      module.sow(RAW, 'mask', mask)
    return next_fun(*args, **kwargs)
  outputs = next_fun(*args, **kwargs)
  if isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)):
    module.sow(RAW, 'inputs', args[0] if args else kwargs['inputs'])
    module.sow(RAW, 'outputs', outputs)
  return outputs


def apply_recording(model, variables, *args, **kwargs):
  """model.apply that also returns the raw layer inputs as numpy float64."""
  mutable = list(kwargs.pop('mutable', None) or []) + [RAW]
  with nn.intercept_methods(record_raw):
    outputs, state = model.apply(variables, *args, mutable=mutable, **kwargs)
  raw = jax.tree.map(lambda a: np.asarray(a, np.float64), state.pop(RAW))
  return outputs, state, raw


# --------------------------------------------------------------------------
# Statistics.


def augment(rows: np.ndarray, has_bias: bool) -> np.ndarray:
  if not has_bias:
    return rows
  return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def dense_mean(inputs: np.ndarray, n_axes: int, has_bias: bool) -> np.ndarray:
  rows = inputs.reshape(-1, int(np.prod(inputs.shape[-n_axes:])))
  return augment(rows, has_bias).mean(axis=0)


def _same_pads(length, span, stride):
  out = -(-length // stride)
  total = max((out - 1) * stride + span - length, 0)
  return total // 2, total - total // 2


def im2col(x, kernel_size, strides=None, padding='SAME', input_dilation=None,
           kernel_dilation=None):
  """All patches of a channels-last batch, shape (B, *out, C, *kernel).

  The trailing layout (C, *kernel) is PyTorch's ``weight.view(m, -1)`` order.
  """
  rank = len(kernel_size)
  strides = strides or (1,) * rank
  input_dilation = input_dilation or (1,) * rank
  kernel_dilation = kernel_dilation or (1,) * rank
  spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  x = np.asarray(x, np.float64)
  batch = x.shape[0]
  if padding in ('CIRCULAR', 'REFLECT', 'CAUSAL'):
    if padding == 'CAUSAL':
      pre = [(spans[0] - 1, 0)]
      mode = 'constant'
    else:
      pre = [((s - 1) // 2, s // 2) for s in spans]
      mode = 'wrap' if padding == 'CIRCULAR' else 'reflect'
    x = np.pad(x, [(0, 0)] + pre + [(0, 0)], mode=mode)
    padding = 'VALID'
  for axis, factor in enumerate(input_dilation):
    if factor > 1:
      n = x.shape[1 + axis]
      shape = list(x.shape)
      shape[1 + axis] = (n - 1) * factor + 1
      dilated = np.zeros(shape)
      index = [slice(None)] * x.ndim
      index[1 + axis] = slice(None, None, factor)
      dilated[tuple(index)] = x
      x = dilated
  if padding == 'SAME':
    pads = [_same_pads(x.shape[1 + a], spans[a], strides[a]) for a in range(rank)]
  elif padding == 'VALID':
    pads = [(0, 0)] * rank
  else:
    pads = [tuple(p) for p in padding]
  x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
  out = [(x.shape[1 + a] - spans[a]) // strides[a] + 1 for a in range(rank)]
  channels = x.shape[-1]
  patches = np.zeros([batch] + out + [channels] + list(kernel_size))
  for position in np.ndindex(*out):
    for offset in np.ndindex(*kernel_size):
      index = tuple(
          position[a] * strides[a] + offset[a] * kernel_dilation[a]
          for a in range(rank)
      )
      patches[(slice(None),) + position + (slice(None),) + offset] = x[
          (slice(None),) + index + (slice(None),)
      ]
  return patches


def _channels(patches, start, stop):
  """patches[:, *out, start:stop, *kernel] for (B, *out, C, *kernel) patches."""
  rank = (patches.ndim - 2) // 2
  return patches[(slice(None),) * (1 + rank) + (slice(start, stop),)]


def torch_kernel(kernel: np.ndarray) -> np.ndarray:
  """Flax (*k, C/g, F) kernel as PyTorch's weight.view(F, -1): (F, C/g * k)."""
  rank = kernel.ndim - 2
  weight = np.moveaxis(kernel, (rank, rank + 1), (1, 0))  # (F, C/g, *k)
  return weight.reshape(weight.shape[0], -1)


def conv_with_patches(patches, kernel, bias, groups):
  """Convolution output from whole-batch patches (validates the oracle)."""
  rank = kernel.ndim - 2
  batch_out = patches.shape[: 1 + rank]
  channels = patches.shape[1 + rank]
  weight = torch_kernel(kernel)
  features = weight.shape[0]
  per_group = channels // groups
  outputs = []
  for g in range(groups):
    rows = _channels(patches, g * per_group, (g + 1) * per_group)
    rows = rows.reshape(int(np.prod(batch_out)), -1)
    block = weight[g * features // groups:(g + 1) * features // groups]
    outputs.append(rows @ block.T)
  result = np.concatenate(outputs, axis=-1).reshape(batch_out + (features,))
  return result if bias is None else result + bias


def conv_mean(patches, groups, has_bias, depthwise_shared=True):
  """Mean patch per group in PyTorch layout, (groups, C/g * k [+1])."""
  rank = (patches.ndim - 2) // 2
  per_group = patches.shape[1 + rank] // groups
  means = []
  for g in range(groups):
    rows = _channels(patches, g * per_group, (g + 1) * per_group)
    rows = rows.reshape(-1, int(np.prod(rows.shape[1 + rank:])))
    means.append(augment(rows, has_bias).mean(axis=0))
  means = np.stack(means)
  if depthwise_shared and groups > 1 and per_group == 1:
    # The reference's depthwise branch: rows over batch, channels, positions.
    means = means.mean(axis=0, keepdims=True)
  return means


def torch_order_to_flax(mean, kernel_size, per_group, has_bias):
  """Reorders a (C/g, *k [,1]) mean to Flax's (*k, C/g [,1]) kernel order."""
  body = mean[..., : per_group * int(np.prod(kernel_size))]
  body = body.reshape(mean.shape[:-1] + (per_group,) + tuple(kernel_size))
  body = np.moveaxis(body, -len(kernel_size) - 1, -1)
  body = body.reshape(mean.shape[:-1] + (-1,))
  if has_bias:
    body = np.concatenate([body, mean[..., -1:]], axis=-1)
  return body


def softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def attention_probs(query, key, mask=None):
  """softmax(q kᵀ/√d) of [B, N, H, hd] projections, masked: [B, H, Nq, Nk]."""
  logits = np.einsum('bqhd,bkhd->bhqk', query, key) / math.sqrt(query.shape[-1])
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -1e30)
  return softmax(logits)


def attention_value_mean(probs, value_inputs, has_bias, mask=None,
                         per_head=False):
  """Reference v = Σ_j p̄_j x̄_j (or per head), padded query rows excluded."""
  batch, heads, queries, keys = probs.shape
  valid = np.ones((batch, heads, queries))
  if mask is not None:
    valid = np.broadcast_to(np.asarray(mask).any(-1), valid.shape).astype(float)
  x = augment(value_inputs, has_bias)  # [B, Nk, d]
  if per_head:
    result = []
    for h in range(heads):
      total = np.zeros(x.shape[-1])
      for b in range(batch):
        for i in range(queries):
          if valid[b, h, i]:
            total += probs[b, h, i] @ x[b]
      result.append(total / valid[:, h].sum())
    return np.stack(result)
  p_bar = np.einsum('bhqk,bhq->k', probs, valid) / valid.sum()
  return p_bar @ x.mean(axis=0)


# --------------------------------------------------------------------------
# Preconditioner and optimizer.


def preconditioner_matrix(mean, damping):
  """The reference's dense P = I - â âᵀ / (λ + ‖â‖²)."""
  mean = np.asarray(mean, np.float64)
  return np.eye(mean.size) - np.outer(mean, mean) / (damping + mean @ mean)


def precondition_torch(weight_grad, bias_grad, mean, damping):
  """Ĝ ← Ĝ P with Ĝ = [∇W (m x n) | ∇b] in PyTorch layout."""
  grad = weight_grad
  if bias_grad is not None:
    grad = np.concatenate([weight_grad, bias_grad[:, None]], axis=1)
  grad = grad @ preconditioner_matrix(mean, damping)
  if bias_grad is None:
    return grad, None
  return grad[:, :-1], grad[:, -1]


def _flax_to_torch(kernel, kind, n_in_axes):
  kernel = np.asarray(kernel, np.float64)
  if kind == 'conv':
    return torch_kernel(kernel)
  return kernel.reshape(int(np.prod(kernel.shape[:n_in_axes])), -1).T


def _torch_to_flax(weight, kind, shape):
  if kind == 'conv':
    rank = len(shape) - 2
    w = weight.reshape((shape[-1], shape[-2]) + tuple(shape[:rank]))
    return np.moveaxis(w, (0, 1), (rank + 1, rank))
  return weight.T.reshape(shape)


def precondition_layer(kernel, bias, means, damping, kind, n_in_axes=1):
  """Preconditions a Flax layer's gradient the reference way.

  The kernel gradient is turned into PyTorch's (out, in) weight layout
  (``weight.view(m, -1)`` for convolutions), each block of output rows (one
  per row of ``means``: convolution groups or heads) is multiplied by its
  dense P, and the result is turned back into the Flax layout.

  Args:
    kernel: Flax kernel gradient.
    bias: bias gradient or None.
    means: (blocks, d) mean inputs in PyTorch's input order.
    damping: λ.
    kind: 'conv' or anything else for dense layers.
    n_in_axes: leading kernel axes contracted with the input (dense layers).
  """
  weight = _flax_to_torch(kernel, kind, n_in_axes)
  means = np.asarray(means, np.float64).reshape(-1, np.shape(means)[-1])
  flat_bias = None if bias is None else np.asarray(bias, np.float64).ravel()
  rows = weight.shape[0] // means.shape[0]
  new_w, new_b = [], []
  for block, mean in enumerate(means):
    part = slice(block * rows, (block + 1) * rows)
    w, b = precondition_torch(
        weight[part], None if bias is None else flat_bias[part], mean, damping)
    new_w.append(w)
    new_b.append(b)
  new_kernel = _torch_to_flax(np.concatenate(new_w), kind, np.shape(kernel))
  if bias is None:
    return new_kernel, None
  return new_kernel, np.concatenate(new_b).reshape(np.shape(bias))


class ReferenceMAC:
  """The reference optimizer's timeline and update, one layer set at a time.

  ``step(params, grads, stats)`` takes PyTorch-layout gradient blocks per layer
  (a dict of name -> list of (weight_grad, bias_grad, mean) row blocks) and the
  remaining parameters' raw gradients; it mirrors ``MAC.step`` with decoupled
  weight decay (ImageNet/DeiT variants).
  """

  def __init__(self, lr, momentum, weight_decay, damping, stat_decay, t_cov,
               t_inv):
    self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
    self.damping, self.stat_decay = damping, stat_decay
    self.t_cov, self.t_inv = t_cov, t_inv
    self.t = 0
    self.k = 0
    self.ema = {}
    self.mean = {}
    self.buffers = {}

  def capture(self, name, stat):
    """Forward-hook part: runs when t % Tcov == 0."""
    if self.t % self.t_cov == 0:
      old = self.ema.get(name, np.zeros_like(stat))
      self.ema[name] = self.stat_decay * old + (1 - self.stat_decay) * stat

  def refresh(self):
    """Start of step(): counter and (maybe) preconditioner refresh."""
    if self.t % self.t_cov == 0:
      self.k += 1
    if self.t % self.t_inv == 0:
      for name, ema in self.ema.items():
        self.mean[name] = ema / (1 - self.stat_decay ** self.k)

  def momentum_step(self, name, param, grad, decay=True):
    """Decoupled weight decay heavy ball, as in the ImageNet/DeiT code."""
    buffer = self.buffers.get(name)
    buffer = grad.copy() if buffer is None else self.momentum * buffer + grad
    self.buffers[name] = buffer
    weight_decay = self.weight_decay if decay else 0.0
    return (1 - self.lr * weight_decay) * param - self.lr * buffer

  def finish(self):
    self.t += 1
