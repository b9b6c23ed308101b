"""Layers beyond Dense/Conv: ConvTranspose, ConvLocal, batched DenseGeneral, Einsum.

Each statistic is checked against a whole-batch numpy oracle whose rows also
reproduce the layer's own outputs (so the oracle's geometry is the layer's),
and each preconditioned gradient against the dense d x d reference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
import oracles

RTOL, ATOL = 2e-5, 2e-6


def _capture(model, x):
  variables = model.init(jax.random.key(0), x)
  apply_with_stats = mac_optax.capture(model.apply)
  outputs, stats = jax.jit(apply_with_stats)(variables, x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  return variables['params'], outputs, stats, layers


def _check_preconditioned(params, stats, layers, torch_weight, torch_mean,
                          to_flax, torch_bias=lambda b: b):
  """One scale_by_mac step against the dense reference on each slice.

  ``torch_weight`` turns the kernel gradient into PyTorch's ``(..., out,
  in)`` layout with one leading index per slice, ``torch_bias`` the bias
  gradient into ``(..., out)``, and ``to_flax`` the result back.
  """
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  tx = mac_optax.scale_by_mac(layers, damping=0.4)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  weight = torch_weight(np.asarray(grads['kernel'], np.float64))
  bias = torch_bias(np.asarray(grads['bias'], np.float64))
  expected_w, expected_b = [], []
  for index in np.ndindex(weight.shape[:-2]):
    b = None if bias is None else bias[index]
    w, b = oracles.precondition_torch(weight[index], b, torch_mean[index], 0.4)
    expected_w.append(w)
    expected_b.append(b)
  shape = weight.shape[:-2]
  expected_w = np.stack(expected_w).reshape(shape + weight.shape[-2:])
  np.testing.assert_allclose(updates['kernel'], to_flax(expected_w),
                             RTOL, ATOL)
  if bias is not None:
    expected_b = np.stack(expected_b).reshape(params['bias'].shape)
    np.testing.assert_allclose(updates['bias'], expected_b, RTOL, ATOL)


def _transpose_pads(kernel, stride, dilation, padding):
  """lax.conv_transpose's padding of the stride-dilated input, per axis."""
  span = (kernel - 1) * dilation + 1
  if padding == 'SAME':
    total = span + stride - 2
    before = span - 1 if stride > span - 1 else int(np.ceil(total / 2))
  else:
    total = span + stride - 2 + max(span - stride, 0)
    before = span - 1
  return before, total - before


@pytest.mark.parametrize(
    'kernel_size, strides, padding, dilation',
    [((3, 3), (2, 2), 'SAME', (1, 1)),
     ((2, 3), (2, 1), 'VALID', (1, 1)),
     ((3, 3), (3, 2), 'SAME', (2, 1)),
     ((3,), (2,), ((1, 2),), (1,))],
    ids=['same-s2', 'valid-even', 'same-dilated', 'explicit-1d'],
)
def test_conv_transpose_mean_patch(kernel_size, strides, padding, dilation):
  rank = len(kernel_size)
  shape = (3,) + (5, 4)[:rank] + (2,)
  x = jax.random.normal(jax.random.key(1), shape) + 0.5
  model = nn.ConvTranspose(3, kernel_size, strides=strides, padding=padding,
                           kernel_dilation=dilation)
  params, outputs, stats, layers = _capture(model, x)
  if isinstance(padding, str):
    pads = [_transpose_pads(k, s, d, padding)
            for k, s, d in zip(kernel_size, strides, dilation)]
  else:
    pads = [tuple(p) for p in padding]
  patches = oracles.im2col(x, kernel_size, None, pads, strides, dilation)
  np.testing.assert_allclose(
      oracles.conv_with_patches(patches, np.asarray(params['kernel']),
                                np.asarray(params['bias']), 1),
      outputs, rtol=1e-4, atol=1e-5)
  torch_mean = oracles.conv_mean(patches, 1, True)
  spec = layers[()]
  assert spec.kind == 'conv_transpose'
  expected = oracles.torch_order_to_flax(torch_mean, kernel_size, 2, True)[0]
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)
  _check_preconditioned(
      params, stats, layers, lambda k: oracles.torch_kernel(k)[None],
      torch_mean,
      lambda w: oracles._torch_to_flax(w[0], 'conv', params['kernel'].shape),  # pylint: disable=protected-access
      lambda b: b[None])


@pytest.mark.parametrize('padding', ['SAME', 'VALID', 'CIRCULAR'])
def test_conv_local_mean_patch_per_position(padding):
  x = jax.random.normal(jax.random.key(2), (4, 5, 4, 2)) + 0.3
  model = nn.ConvLocal(3, (3, 2), strides=(2, 1), padding=padding)
  params, outputs, stats, layers = _capture(model, x)
  pad_mode = padding
  source = np.asarray(x, np.float64)
  if padding == 'CIRCULAR':
    source = np.pad(source, [(0, 0), (1, 1), (0, 1), (0, 0)], mode='wrap')
    pad_mode = 'VALID'
  patches = oracles.im2col(source, (3, 2), (2, 1), pad_mode)
  rows = patches.reshape(patches.shape[:3] + (-1,))  # (B, oh, ow, C*kh*kw)
  kernel = np.asarray(params['kernel'], np.float64)
  np.testing.assert_allclose(
      np.einsum('bhwi,hwif->bhwf', rows, kernel) + np.asarray(params['bias']),
      outputs, rtol=1e-4, atol=1e-5)
  mean = oracles.augment(rows.mean(axis=0), True)
  spec = layers[()]
  assert (spec.kind, spec.stack_shape) == ('conv_local', rows.shape[1:3])
  np.testing.assert_allclose(stats['mean_input'], mean, RTOL, ATOL)
  _check_preconditioned(
      params, stats, layers, lambda k: np.swapaxes(k, -1, -2), mean,
      lambda w: np.swapaxes(w, -1, -2))


def test_dense_general_with_batch_dims_per_index():
  x = jax.random.normal(jax.random.key(3), (3, 4, 6, 5)) + 1.0
  model = nn.DenseGeneral(4, axis=-1, batch_dims=(0,))
  params, outputs, stats, layers = _capture(model, x)
  assert layers[()].stack_shape == (3,)
  x64 = np.asarray(x, np.float64)
  expected = np.stack(
      [oracles.dense_mean(x64[i], 1, True) for i in range(3)])
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)
  _check_preconditioned(params, stats, layers,
                        lambda k: np.swapaxes(k, -1, -2), expected,
                        lambda w: np.swapaxes(w, -1, -2))
  del outputs


@pytest.mark.parametrize(
    'equation, kernel_shape, x_shape, contracted',
    [('btd,dhk->bthk', (5, 2, 3), (2, 4, 5), (2,)),
     ('...hd,hdk->...k', (2, 3, 4), (2, 4, 2, 3), (-2, -1))],
    ids=['heads-out', 'ellipsis-merge-heads'],
)
def test_einsum_plain_contraction(equation, kernel_shape, x_shape, contracted):
  x = jax.random.normal(jax.random.key(4), x_shape) + 0.5
  model = nn.Einsum(kernel_shape, equation)
  params, outputs, stats, layers = _capture(model, x)
  x64 = np.asarray(x, np.float64)
  n_in = len(contracted)
  expected = oracles.dense_mean(x64, n_in, True)
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)
  spec = layers[()]
  assert spec.kind == 'einsum' and spec.in_shape == kernel_shape[:n_in]
  flat = lambda k: k.reshape(int(np.prod(kernel_shape[:n_in])), -1).T[None]
  _check_preconditioned(
      params, stats, layers, flat, expected[None],
      lambda w: w[0].T.reshape(kernel_shape), lambda b: b.reshape(1, -1))
  del outputs


class _PassThrough(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 4, name='embed')(tokens)  # (b, t, 4)
    experts = x[None].repeat(2, 0)  # (e, b, t, 4)
    x = nn.Einsum((2, 4, 3), 'ebtd,edf->ebtf', name='moe')(experts).sum(0)
    x = nn.ConvTranspose(2, (2,), transpose_kernel=True, name='flipped')(x)
    return nn.Dense(2, name='head')(x)


def test_pass_through_layers_are_listed_with_their_reason():
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  model = _PassThrough()
  variables = model.init(jax.random.key(0), tokens)
  layers = mac_optax.find_layers(model.apply, variables, tokens)
  assert set(layers) == {('head',)}
  table = mac_optax.summary(layers, variables['params'])
  rows = {line.split()[0]: line for line in table.splitlines()[1:]}
  assert 'token ids' in rows['embed/embedding']
  assert 'per-expert' in rows['moe/kernel']
  assert 'transpose_kernel=True' in rows['flipped/kernel']
  assert 'preconditioned: dense' in rows['head/kernel']
