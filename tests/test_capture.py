"""Statistics captured from Flax linen models against the numpy oracles."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
import oracles

RTOL, ATOL = 2e-5, 2e-6


def _stat(stats, *path):
  node = stats
  for key in path:
    node = node[key]
  return np.asarray(node['mean_input'])


def _run(model, x, *args, capture_kwargs=None, **kwargs):
  variables = model.init(jax.random.key(0), x, *args, **kwargs)
  apply_with_stats = mac_optax.capture(model.apply, **(capture_kwargs or {}))
  outputs, stats = jax.jit(
      lambda v, x, *a: apply_with_stats(v, x, *a, **kwargs)
  )(variables, x, *args)
  _, _, raw = oracles.apply_recording(model, variables, x, *args, **kwargs)
  return variables, outputs, stats, raw


@pytest.mark.parametrize('shape', [(7, 5), (2, 3, 5), (5,)])
@pytest.mark.parametrize('use_bias', [True, False])
def test_dense_mean_input(shape, use_bias):
  x = jax.random.normal(jax.random.key(1), shape)
  _, _, stats, raw = _run(nn.Dense(4, use_bias=use_bias), x)
  expected = oracles.dense_mean(np.asarray(x, np.float64), 1, use_bias)
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)
  del raw


@pytest.mark.parametrize(
    'shape, axis',
    [((4, 6, 3), -1), ((4, 6, 2, 3), (-2, -1)), ((4, 3, 6), 1),
     ((2, 3, 4, 5), (3, 1))],
)
def test_dense_general_flattens_contracted_axes_in_kernel_order(shape, axis):
  x = jax.random.normal(jax.random.key(2), shape)
  model = nn.DenseGeneral((2, 3), axis=axis)
  variables, _, stats, _ = _run(model, x)
  axes = sorted(a % len(shape) for a in np.atleast_1d(axis))
  moved = np.moveaxis(np.asarray(x, np.float64), axes,
                      list(range(-len(axes), 0)))
  expected = oracles.dense_mean(moved, len(axes), True)
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)
  kernel = variables['params']['kernel']
  assert expected.size - 1 == np.prod(kernel.shape[: len(axes)])


CONV_CASES = {
    '3x3-same': dict(features=4, kernel_size=(3, 3)),
    '3x3-same-stride2-nobias': dict(features=4, kernel_size=(3, 3), strides=2,
                                    use_bias=False),
    '2x2-same-even-kernel': dict(features=3, kernel_size=(2, 2)),
    'valid-stride21': dict(features=3, kernel_size=(3, 2), strides=(2, 1),
                           padding='VALID'),
    'explicit-asymmetric': dict(features=3, kernel_size=(3, 3),
                                padding=((1, 2), (0, 1))),
    'int-padding': dict(features=3, kernel_size=(3, 3), padding=1, strides=2),
    'circular': dict(features=3, kernel_size=(3, 3), padding='CIRCULAR'),
    'reflect': dict(features=3, kernel_size=(3, 3), padding='REFLECT'),
    'kernel-dilation': dict(features=3, kernel_size=(3, 3), kernel_dilation=2),
    'input-dilation': dict(features=3, kernel_size=(3, 3), input_dilation=2,
                           padding=((1, 1), (2, 0))),
    'grouped': dict(features=6, kernel_size=(3, 3), feature_group_count=2),
    'depthwise': dict(features=4, kernel_size=(3, 3), feature_group_count=4),
    'depthwise-multiplier': dict(features=8, kernel_size=(3, 3),
                                 feature_group_count=4, strides=2),
    'patch-embed': dict(features=5, kernel_size=(4, 4), strides=4,
                        padding='VALID'),
}


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv_mean_patch_matches_whole_batch_im2col(case):
  config = CONV_CASES[case]
  model = nn.Conv(**config)
  x = jax.random.normal(jax.random.key(3), (3, 9, 8, 4))
  _check_conv(model, x)


@pytest.mark.parametrize(
    'config, shape',
    [
        (dict(features=3, kernel_size=(3,), padding='CAUSAL'), (2, 9, 2)),
        (dict(features=3, kernel_size=(4,), strides=2, kernel_dilation=2),
         (2, 11, 2)),
        (dict(features=2, kernel_size=(2, 3, 2), strides=(1, 2, 1),
              padding='SAME'), (2, 4, 5, 3, 2)),
        (dict(features=3, kernel_size=(3, 3)), (9, 8, 4)),  # unbatched
        (dict(features=3, kernel_size=(3, 3), strides=2), (2, 2, 7, 6, 4)),
    ],
    ids=['1d-causal', '1d-stride-dilation', '3d', 'unbatched', 'two-batch-dims'],
)
def test_conv_other_ranks_and_batch_shapes(config, shape):
  x = jax.random.normal(jax.random.key(4), shape)
  _check_conv(nn.Conv(**config), x)


@pytest.mark.parametrize('shared', [True, False])
def test_depthwise_statistic_shared_or_per_channel(shared):
  model = nn.Conv(4, (3, 3), feature_group_count=4)
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, 4))
  _check_conv(model, x, depthwise_shared=shared)


def _check_conv(model, x, depthwise_shared=True):
  variables, outputs, stats, _ = _run(
      model, x, capture_kwargs=dict(depthwise_shared=depthwise_shared)
  )
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  rank = kernel.ndim - 2
  batched = np.asarray(x, np.float64).reshape((-1,) + x.shape[-rank - 1:])
  padding = model.padding
  if isinstance(padding, int):
    padding = ((padding, padding),) * rank
  broadcast = lambda v: (v,) * rank if isinstance(v, int) else v
  patches = oracles.im2col(
      batched, kernel.shape[:rank], broadcast(model.strides), padding,
      broadcast(model.input_dilation), broadcast(model.kernel_dilation),
  )
  bias = variables['params'].get('bias')
  # The oracle's patches reproduce the model's own convolution output.
  np.testing.assert_allclose(
      oracles.conv_with_patches(patches, kernel, bias,
                                model.feature_group_count),
      np.asarray(outputs, np.float64).reshape(
          (-1,) + outputs.shape[outputs.ndim - rank - 1:]),
      rtol=1e-4, atol=1e-5,
  )
  groups = model.feature_group_count
  expected = oracles.conv_mean(patches, groups, model.use_bias,
                               depthwise_shared)
  expected = oracles.torch_order_to_flax(
      expected, kernel.shape[:rank], x.shape[-1] // groups, model.use_bias)
  if expected.shape[0] == 1:
    expected = expected[0]
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)


class _Block(nn.Module):
  """Self- or cross-attention with a Dense before it, for attention tests."""

  num_heads: int = 2
  attention_fn: callable = nn.dot_product_attention
  normalize_qk: bool = False
  use_bias: bool = True
  sow_weights: bool = False

  @nn.compact
  def __call__(self, x, memory=None, mask=None):
    x = nn.Dense(8)(x)
    attention = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=8,
        attention_fn=self.attention_fn, normalize_qk=self.normalize_qk,
        use_bias=self.use_bias, name='attn')
    return attention(x, memory, mask=mask, sow_weights=self.sow_weights)


def _attention_oracle(raw, mask, per_head, has_bias=True):
  attn = raw['attn']
  query = attn['query']['outputs'][0]
  key = attn['key']['outputs'][0]
  probs = oracles.attention_probs(query, key, mask)
  return oracles.attention_value_mean(
      probs, attn['value']['inputs'][0], has_bias, mask, per_head
  )


def _causal(n):
  return np.tril(np.ones((n, n), bool))[None, None]


def _padding_mask(lengths, n_q, n_k):
  keys = np.arange(n_k)[None] < np.asarray(lengths)[:, None]
  queries = np.arange(n_q)[None] < np.asarray(lengths)[:, None]
  return (queries[:, None, :, None] & keys[:, None, None, :])


@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('mask_kind', ['none', 'causal', 'padding'])
def test_attention_value_statistic(mask_kind, per_head):
  x = jax.random.normal(jax.random.key(6), (3, 5, 4))
  mask = {'none': None, 'causal': _causal(5),
          'padding': _padding_mask([5, 3, 2], 5, 5)}[mask_kind]
  capture_kwargs = dict(value_stat='per_head' if per_head else 'reference')
  _, _, stats, raw = _run(_Block(), x, None, capture_kwargs=capture_kwargs,
                          mask=mask)
  expected = _attention_oracle(raw, mask, per_head)
  np.testing.assert_allclose(_stat(stats, 'attn', 'value'), expected,
                             RTOL, ATOL)
  # Query and key keep the plain mean of their (shared) input.
  plain = oracles.dense_mean(raw['Dense_0']['outputs'][0], 1, True)
  np.testing.assert_allclose(_stat(stats, 'attn', 'query'), plain, RTOL, ATOL)
  np.testing.assert_allclose(_stat(stats, 'attn', 'key'), plain, RTOL, ATOL)
  # The attention weights sum to one over keys: the bias coordinate is 1.
  np.testing.assert_allclose(_stat(stats, 'attn', 'value')[..., -1], 1.0,
                             rtol=1e-6)


def test_cross_attention_uses_value_inputs():
  x = jax.random.normal(jax.random.key(7), (2, 4, 4))
  memory = jax.random.normal(jax.random.key(8), (2, 6, 8)) + 1.0
  key_lengths = np.array([6, 4])
  mask = (np.arange(6)[None] < key_lengths[:, None])[:, None, None, :]
  _, _, stats, raw = _run(_Block(), x, memory, mask=mask)
  np.testing.assert_allclose(
      raw['attn']['value']['inputs'][0], np.asarray(memory, np.float64))
  expected = _attention_oracle(raw, mask, per_head=False)
  np.testing.assert_allclose(_stat(stats, 'attn', 'value'), expected,
                             RTOL, ATOL)


def _fused_attention(query, key, value, mask=None):
  """An attention_fn without a `module` argument: it cannot sow weights."""
  return nn.dot_product_attention(query, key, value, mask=mask)


@pytest.mark.parametrize('normalize_qk', [False, True])
def test_attention_fn_without_module_recomputes_probabilities(normalize_qk):
  x = jax.random.normal(jax.random.key(9), (2, 5, 4))
  mask = _causal(5)
  own = _Block(normalize_qk=normalize_qk)
  custom = _Block(normalize_qk=normalize_qk, attention_fn=_fused_attention)
  variables = own.init(jax.random.key(0), x, mask=mask)
  _, sown = mac_optax.capture(own.apply)(variables, x, mask=mask)
  _, recomputed = mac_optax.capture(custom.apply)(variables, x, mask=mask)
  np.testing.assert_allclose(_stat(recomputed, 'attn', 'value'),
                             _stat(sown, 'attn', 'value'), RTOL, ATOL)
  if not normalize_qk:
    _, _, raw = oracles.apply_recording(own, variables, x, mask=mask)
    np.testing.assert_allclose(_stat(sown, 'attn', 'value'),
                               _attention_oracle(raw, mask, False), RTOL, ATOL)


class _SelfAttentionModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.SelfAttention(num_heads=2, qkv_features=4, name='attn')(x)


def test_self_attention_is_captured_once():
  x = jax.random.normal(jax.random.key(10), (2, 3, 4))
  model = _SelfAttentionModel()
  _, _, stats, raw = _run(model, x)
  expected = _attention_oracle(raw, None, per_head=False)
  np.testing.assert_allclose(_stat(stats, 'attn', 'value'), expected,
                             RTOL, ATOL)


def test_attention_aware_off_gives_plain_value_mean():
  x = jax.random.normal(jax.random.key(11), (2, 5, 4))
  _, _, stats, raw = _run(_Block(), x, capture_kwargs=dict(
      attention_aware=False))
  plain = oracles.dense_mean(raw['Dense_0']['outputs'][0], 1, True)
  np.testing.assert_allclose(_stat(stats, 'attn', 'value'), plain, RTOL, ATOL)


class _Decoder(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.SelfAttention(num_heads=1, decode=True, name='attn')(x)


def test_decode_calls_record_nothing():
  model = _Decoder()
  variables = model.init(jax.random.key(0), jnp.ones((2, 4, 3)))
  (_, state), stats = mac_optax.capture(model.apply)(
      variables, jnp.ones((2, 1, 3)), mutable=['cache'])
  assert stats == {}
  assert int(state['cache']['attn']['cache_index']) == 1


class _Tied(nn.Module):

  @nn.compact
  def __call__(self, a, b):
    dense = nn.Dense(3, name='shared')
    return dense(a).sum() + dense(b).sum()


def test_reused_layer_gets_row_weighted_mean():
  a = jax.random.normal(jax.random.key(12), (2, 4))
  b = jax.random.normal(jax.random.key(13), (6, 4)) + 2.0
  model = _Tied()
  variables = model.init(jax.random.key(0), a, b)
  _, stats = mac_optax.capture(model.apply)(variables, a, b)
  rows = np.concatenate([np.asarray(a), np.asarray(b)]).astype(np.float64)
  np.testing.assert_allclose(_stat(stats, 'shared'),
                             oracles.dense_mean(rows, 1, True), RTOL, ATOL)


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    self.sow('intermediates', 'features', x)
    return nn.Dense(2)(x.mean((1, 2)))


def test_outputs_gradients_and_other_collections_are_unchanged():
  model = _CNN()
  x = jax.random.normal(jax.random.key(14), (4, 6, 6, 3))
  variables = model.init(jax.random.key(0), x)
  apply_with_stats = mac_optax.capture(model.apply)

  def loss(params, apply_fn, wrap):
    result = apply_fn({**variables, 'params': params}, x,
                      mutable=['batch_stats', 'intermediates'])
    (outputs, state), stats = result if wrap else (result, None)
    return jnp.sum(outputs ** 2), (state, stats)

  (value, (state, stats)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2)
  )(variables['params'], apply_with_stats, True)
  (ref_value, (ref_state, _)), ref_grads = jax.value_and_grad(
      loss, has_aux=True)(variables['params'], model.apply, False)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  # Conv bias gradients are ~0 (batch norm follows): compare absolutely.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               (grads, state), (ref_grads, ref_state))
  assert set(state) == {'batch_stats', 'intermediates'}
  assert set(stats) == {'Conv_0', 'Dense_0'}


def test_injected_attention_weights_do_not_leak():
  model = _Block()
  x = jnp.ones((2, 3, 4))
  variables = model.init(jax.random.key(0), x)
  apply_with_stats = mac_optax.capture(model.apply)
  outputs, stats = apply_with_stats(variables, x)
  assert isinstance(outputs, jax.Array)
  assert set(stats) == {'Dense_0', 'attn'}
  (_, state), _ = apply_with_stats(variables, x, mutable=['intermediates'])
  assert state == model.apply(variables, x, mutable=['intermediates'])[1]
  # Weights the model sows itself are kept.
  sowing = _Block(sow_weights=True)
  (_, state), _ = mac_optax.capture(sowing.apply)(
      variables, x, mutable=['intermediates'])
  assert state['intermediates']['attn']['attention_weights'][0].shape == (
      2, 2, 3, 3)


def test_init_records_nothing():
  model = _CNN()
  tracker = mac_optax._capture.tracking.Tracker(
      mac_optax._capture.rules.Options(), mac_optax._capture.linen.sow_entry)
  interceptor = mac_optax._capture.linen.Interceptor(tracker)
  with nn.intercept_methods(interceptor):
    variables = model.init(jax.random.key(0), jnp.ones((2, 5, 5, 3)))
  assert set(variables) == {'params', 'batch_stats'}


def test_capture_is_jit_safe_and_retraces_nothing():
  model = _CNN()
  x = jax.random.normal(jax.random.key(15), (2, 5, 5, 3))
  variables = model.init(jax.random.key(0), x)
  apply_with_stats = mac_optax.capture(model.apply)
  traces = []

  @jax.jit
  def f(variables, x):
    traces.append(1)
    (_, _), stats = apply_with_stats(variables, x, mutable=['batch_stats'])
    return stats

  first = f(variables, x)
  second = f(variables, x + 1.0)
  assert len(traces) == 1
  eager = apply_with_stats(variables, x + 1.0, mutable=['batch_stats'])[1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               second, eager)
  assert not np.allclose(first['Conv_0']['mean_input'],
                         second['Conv_0']['mean_input'])


class _Mixed(nn.Module):
  """Layers MAC leaves alone next to ones it preconditions."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 4, name='embed')(tokens)
    x = nn.ConvTranspose(4, (3,), name='up')(x)
    x = nn.Dense(4, kernel_init=nn.initializers.normal(1.0), name='fc')(x)
    x = nn.DenseGeneral(3, batch_dims=(0,), name='batched')(x)
    return nn.LayerNorm(name='norm')(x)


def test_unsupported_layers_pass_through_and_are_listed():
  model = _Mixed()
  tokens = jnp.arange(12).reshape(2, 6) % 11
  variables = model.init(jax.random.key(0), tokens)
  layers = mac_optax.find_layers(model.apply, variables, tokens)
  assert set(layers) == {('up',), ('fc',), ('batched',)}
  table = mac_optax.summary(layers, variables['params'])
  lines = {line.split()[0]: line for line in table.splitlines()[1:]}
  assert 'not preconditioned: embedding (its input is token ids' in lines[
      'embed/embedding']
  assert 'preconditioned: conv_transpose (ConvTranspose)' in lines['up/kernel']
  assert 'preconditioned: dense (DenseGeneral)' in lines['batched/kernel']
  assert lines['norm/scale'].endswith('not preconditioned: LayerNorm')
  assert 'preconditioned: dense (Dense), d=5' in lines['fc/kernel']
  params = variables['params']
  _, stats = mac_optax.capture(model.apply)(variables, tokens)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = mac_optax.scale_by_mac(layers)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  for name in ('embed', 'norm'):
    jax.tree.map(np.testing.assert_array_equal, updates[name], grads[name])
  for name in ('up', 'fc', 'batched'):
    assert not np.allclose(updates[name]['kernel'], 1.0)


def test_bf16_model_gives_fp32_statistics():
  model = _Block()
  x = jax.random.normal(jax.random.key(16), (2, 5, 4))
  variables = model.init(jax.random.key(0), x)
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), variables)
  _, stats = mac_optax.capture(model.apply)(bf16, x.astype(jnp.bfloat16))
  _, reference = mac_optax.capture(model.apply)(variables, x)
  for leaf in jax.tree.leaves(stats):
    assert leaf.dtype == jnp.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-2,
                                                       atol=5e-2),
               stats, reference)


class _MaskedViT(nn.Module):
  """Conv stem, padded self-attention and a head: one of each statistic."""

  @nn.compact
  def __call__(self, x, mask):
    x = nn.Conv(8, (3, 3), strides=2, name='stem')(x)
    x = x.reshape(x.shape[0], -1, 8)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(
        x, mask=mask)
    return nn.Dense(3, name='head')(x)


@pytest.mark.parametrize('value_stat', ['reference', 'per_head'])
def test_statistics_of_split_batches_merge_to_the_full_batch(value_stat):
  x = jax.random.normal(jax.random.key(14), (6, 4, 4, 2)) + 0.5
  mask = _padding_mask([4, 1, 3, 2, 4, 3], 4, 4)
  model = _MaskedViT()
  variables = model.init(jax.random.key(0), x, mask)
  apply_with_stats = jax.jit(mac_optax.capture(model.apply,
                                               value_stat=value_stat))
  _, full = apply_with_stats(variables, x, mask)
  # Uneven parts with different numbers of unmasked queries.
  parts = [apply_with_stats(variables, x[s], mask[s])[1]
           for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
  merged = mac_optax.merge_stats(parts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, RTOL, ATOL),
               merged, full)
  # The reference value statistic is a product of means: the plain
  # row-weighted mean of the parts' statistics is measurably different.
  if value_stat == 'reference':
    naive = sum(float(p['attn']['value']['rows']) *
                np.asarray(p['attn']['value']['mean_input']) for p in parts)
    naive /= float(full['attn']['value']['rows'])
    assert np.abs(naive - full['attn']['value']['mean_input']).max() > 1e-3
