"""Flax NNX: statistics against the numpy oracles, training against linen twins.

Layer statistics are checked against whole-batch float64 oracles whose rows
reproduce the layers' own outputs. Whole models are trained with
``nnx.Optimizer(model, mac(...), wrt=nnx.Param)`` inside ``nnx.jit`` and must
match, step for step, the same network written in linen (whose training is
checked against the numpy reference elsewhere) and its ``nnx.bridge`` linen
twin.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import oracles
from test_capture import CONV_CASES

RTOL, ATOL = 2e-5, 2e-6


def _stats(module, *args, **capture_kwargs):
  return nnx.jit(
      lambda m, *a: mac_optax.capture(m, **capture_kwargs)(*a))(module, *args)


@pytest.mark.parametrize('shape', [(7, 5), (2, 3, 5), (5,)])
@pytest.mark.parametrize('use_bias', [True, False])
def test_linear(shape, use_bias):
  x = jax.random.normal(jax.random.key(1), shape)
  layer = nnx.Linear(5, 3, use_bias=use_bias, rngs=nnx.Rngs(0))
  _, stats = _stats(layer, x)
  np.testing.assert_allclose(
      stats['mean_input'],
      oracles.dense_mean(np.asarray(x, np.float64), 1, use_bias), RTOL, ATOL)


@pytest.mark.parametrize(
    'shape, axis, in_features, batch_axis',
    [((4, 6, 3), -1, 3, {}), ((4, 6, 2, 3), (-2, -1), (2, 3), {}),
     ((3, 4, 6, 5), -1, 5, {0: 3})],
    ids=['last', 'two-axes', 'batch-axis'],
)
def test_linear_general(shape, axis, in_features, batch_axis):
  x = jax.random.normal(jax.random.key(2), shape) + 0.5
  layer = nnx.LinearGeneral(in_features, (2, 3), axis=axis,
                            batch_axis=batch_axis, rngs=nnx.Rngs(0))
  _, stats = _stats(layer, x)
  x64 = np.asarray(x, np.float64)
  n_in = len(np.atleast_1d(axis))
  if batch_axis:
    expected = np.stack([oracles.dense_mean(x64[i], n_in, True)
                         for i in range(shape[0])])
  else:
    expected = oracles.dense_mean(x64, n_in, True)
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)
  layers = mac_optax.find_layers(layer, x)
  assert layers[()].stack_shape == tuple(batch_axis.values())


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv(case):
  config = dict(CONV_CASES[case])
  x = jax.random.normal(jax.random.key(3), (3, 9, 8, 4))
  features = config.pop('features')
  layer = nnx.Conv(4, features, rngs=nnx.Rngs(0), **config)
  outputs, stats = _stats(layer, x)
  kernel = np.asarray(layer.kernel[...], np.float64)
  rank = 2
  broadcast = lambda v: (v,) * rank if isinstance(v, int) else v
  padding = layer.padding
  if isinstance(padding, int):
    padding = ((padding, padding),) * rank
  patches = oracles.im2col(
      x, kernel.shape[:rank], broadcast(layer.strides), padding,
      broadcast(layer.input_dilation), broadcast(layer.kernel_dilation))
  bias = None if layer.bias is None else np.asarray(layer.bias[...])
  groups = layer.feature_group_count
  np.testing.assert_allclose(
      oracles.conv_with_patches(patches, kernel, bias, groups), outputs,
      rtol=1e-4, atol=1e-5)
  expected = oracles.torch_order_to_flax(
      oracles.conv_mean(patches, groups, bias is not None),
      kernel.shape[:rank], 4 // groups, bias is not None)
  np.testing.assert_allclose(stats['mean_input'],
                             expected[0] if len(expected) == 1 else expected,
                             RTOL, ATOL)


def test_einsum_and_conv_transpose():
  x = jax.random.normal(jax.random.key(4), (2, 5, 4)) + 0.5
  einsum = nnx.Einsum('btd,dhk->bthk', (4, 2, 3), (2, 3), rngs=nnx.Rngs(0))
  _, stats = _stats(einsum, x)
  np.testing.assert_allclose(
      stats['mean_input'], oracles.dense_mean(np.asarray(x, np.float64), 1,
                                              True), RTOL, ATOL)
  transpose = nnx.ConvTranspose(4, 3, (3,), strides=(2,), padding='VALID',
                                rngs=nnx.Rngs(0))
  outputs, stats = _stats(transpose, x)
  patches = oracles.im2col(x, (3,), None, [(2, 2)], (2,))
  np.testing.assert_allclose(
      oracles.conv_with_patches(patches, np.asarray(transpose.kernel[...]),
                                np.asarray(transpose.bias[...]), 1),
      outputs, rtol=1e-4, atol=1e-5)
  expected = oracles.torch_order_to_flax(
      oracles.conv_mean(patches, 1, True), (3,), 4, True)[0]
  np.testing.assert_allclose(stats['mean_input'], expected, RTOL, ATOL)


def _padding_mask(lengths, n):
  valid = np.arange(n)[None] < np.asarray(lengths)[:, None]
  return valid[:, None, :, None] & valid[:, None, None, :]


@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize(
    'mask_kind, dropout',
    [('none', 0.0), ('causal', 0.1), ('padding', 0.0), ('padding', 0.1),
     ('is_causal', 0.0)])
def test_multi_head_attention_value_statistic(mask_kind, dropout, per_head):
  x = jax.random.normal(jax.random.key(5), (3, 5, 4)) + 0.3
  mha = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=8,
                               decode=False, normalize_qk=True,
                               dropout_rate=dropout, deterministic=True,
                               rngs=nnx.Rngs(0))
  mask = {'none': None, 'is_causal': None,
          'causal': np.tril(np.ones((5, 5), bool))[None, None],
          'padding': _padding_mask([5, 3, 2], 5)}[mask_kind]
  kwargs = dict(mask=mask, is_causal=mask_kind == 'is_causal')
  value_stat = 'per_head' if per_head else 'reference'
  _, stats = nnx.jit(lambda m, x: mac_optax.capture(
      m, value_stat=value_stat)(x, **kwargs))(mha, x)
  query = np.asarray(mha.query_ln(mha.query(x)), np.float64)
  key = np.asarray(mha.key_ln(mha.key(x)), np.float64)
  oracle_mask = mask
  if mask_kind == 'is_causal':
    oracle_mask = np.tril(np.ones((5, 5), bool))[None, None]
  probs = oracles.attention_probs(query, key, oracle_mask)
  expected = oracles.attention_value_mean(
      probs, np.asarray(x, np.float64), True, oracle_mask, per_head)
  np.testing.assert_allclose(stats['value']['mean_input'], expected,
                             RTOL, ATOL)
  np.testing.assert_allclose(
      stats['query']['mean_input'],
      oracles.dense_mean(np.asarray(x, np.float64), 1, True), RTOL, ATOL)
  layers = mac_optax.find_layers(mha, x, **kwargs)
  # The fused attention path (no dropout) forms no probabilities to read.
  source = 'model' if dropout else 'recomputed'
  assert f'{source} probabilities' in layers.value_sources[('value',)]


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_grouped_query_attention_per_value_head(dropout):
  x = jax.random.normal(jax.random.key(6), (2, 5, 8)) + 0.3
  mha = nnx.MultiHeadAttention(num_heads=4, in_features=8, qkv_features=8,
                               decode=False, dropout_rate=dropout,
                               deterministic=True, rngs=nnx.Rngs(0))
  mha.key = nnx.LinearGeneral(8, (2, 2), rngs=nnx.Rngs(1))
  mha.value = nnx.LinearGeneral(8, (2, 2), rngs=nnx.Rngs(2))
  _, stats = nnx.jit(lambda m, x: mac_optax.capture(
      m, value_stat='per_head')(x))(mha, x)
  query = np.asarray(mha.query(x), np.float64)
  key = np.repeat(np.asarray(mha.key(x), np.float64), 2, axis=-2)
  probs = oracles.attention_probs(query, key)
  per_query_head = oracles.attention_value_mean(
      probs, np.asarray(x, np.float64), True, per_head=True)
  expected = per_query_head.reshape(2, 2, -1).mean(axis=1)
  np.testing.assert_allclose(stats['value']['mean_input'], expected,
                             RTOL, ATOL)


# --------------------------------------------------------------------------
# Whole models: NNX vs linen.

WIDTH, HEADS, CLASSES = 8, 2, 5


class NNXViT(nnx.Module):
  """Patch embedding, one attention block, mean-pooled head."""

  def __init__(self, rngs):
    self.embed = nnx.Conv(1, WIDTH, (2, 2), strides=2, padding='VALID',
                          rngs=rngs)
    self.ln1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.fc1 = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.fc2 = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, images):
    x = self.embed(images)
    x = x.reshape(x.shape[0], -1, WIDTH)
    x = x + self.attn(self.ln1(x))
    x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
    return self.head(x.mean(axis=1))


class LinenViT(nn.Module):
  """The same network in linen, with the same parameter names."""

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(WIDTH, (2, 2), strides=2, padding='VALID', name='embed')(
        images)
    x = x.reshape(x.shape[0], -1, WIDTH)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name='attn')(
        nn.LayerNorm(name='ln1')(x))
    y = nn.Dense(2 * WIDTH, name='fc1')(nn.LayerNorm(name='ln2')(x))
    x = x + nn.Dense(WIDTH, name='fc2')(nn.gelu(y))
    return nn.Dense(CLASSES, name='head')(x.mean(axis=1))


HYPER = dict(damping=0.5, t_cov=1, t_inv=2, weight_decay=1e-3)


def _batches(steps=3):
  keys = jax.random.split(jax.random.key(7), steps)
  return [(jax.random.normal(k, (6, 6, 6, 1)) + 0.2,
           jax.random.randint(jax.random.fold_in(k, 1), (6,), 0, CLASSES))
          for k in keys]


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train_nnx(model, batches):
  layers = mac_optax.find_layers(model, batches[0][0])
  optimizer = nnx.Optimizer(model, mac_optax.mac(0.05, layers=layers,
                                                 **HYPER), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits, stats = mac_optax.capture(model)(x)
      return _xent(logits, y), stats

    (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, mac_stats=stats)
    return stats

  stats = [step(model, optimizer, x, y) for x, y in batches]
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), stats, layers


def _train_linen(model, params, batches):
  layers = mac_optax.find_layers(model.apply, {'params': params},
                                 batches[0][0])
  tx = mac_optax.mac(0.05, layers=layers, **HYPER)
  apply_with_stats = mac_optax.capture(model.apply)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(params):
      logits, stats = apply_with_stats({'params': params}, x)
      return _xent(logits, y), stats

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, stats

  opt_state = tx.init(params)
  all_stats = []
  for x, y in batches:
    params, opt_state, stats = step(params, opt_state, x, y)
    all_stats.append(stats)
  return params, all_stats, layers


def _assert_trees_close(a, b):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
      a, b)


@pytest.mark.parametrize('twin', ['linen', 'bridge'])
def test_nnx_optimizer_matches_linen_twin(twin):
  batches = _batches()
  model = NNXViT(nnx.Rngs(0))
  initial = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if twin == 'linen':
    linen_model = LinenViT()
  else:
    linen_model = nnx.bridge.to_linen(NNXViT)
    variables = linen_model.init(jax.random.key(0), batches[0][0])
    assert (jax.tree.structure(nn.unbox(variables['params']))
            == jax.tree.structure(initial))
  linen_params, linen_stats, linen_layers = _train_linen(
      linen_model, initial, batches)
  nnx_params, nnx_stats, nnx_layers = _train_nnx(model, batches)
  assert set(nnx_layers) == set(linen_layers)
  for path, spec in nnx_layers.items():
    other = linen_layers[path]
    assert (spec.kind, spec.dim, spec.blocks, spec.kernel_shape) == (
        other.kind, other.dim, other.blocks, other.kernel_shape), path
  for mine, theirs in zip(nnx_stats, linen_stats):
    _assert_trees_close(mine, theirs)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), nnx_params,
                       initial)
  assert min(jax.tree.leaves(moved)) > 1e-5
  _assert_trees_close(nnx_params, linen_params)


class ScannedNNX(nnx.Module):
  """Blocks created with nnx.vmap and applied with nnx.scan + nnx.remat."""

  def __init__(self, rngs, depth=3):

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    self.inp = nnx.Linear(3, WIDTH, rngs=rngs)
    self.blocks = make(rngs)

  def __call__(self, x):
    x = self.inp(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(x, block):
      return jnp.tanh(block(x)) + x

    return body(x, self.blocks)


def test_nnx_scan_statistics_are_stacked_per_layer():
  model = ScannedNNX(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(8), (4, 3)) + 0.5
  _, stats = nnx.jit(lambda m, x: mac_optax.capture(m)(x))(model, x)
  layers = mac_optax.find_layers(model, x)
  assert layers[('blocks',)].stack_shape == (3,)
  kernels = np.asarray(model.blocks.kernel[...], np.float64)
  biases = np.asarray(model.blocks.bias[...], np.float64)
  h = np.asarray(model.inp(x), np.float64)
  for i in range(3):
    np.testing.assert_allclose(stats['blocks']['mean_input'][i],
                               oracles.dense_mean(h, 1, True), RTOL, ATOL)
    h = np.tanh(h @ kernels[i] + biases[i]) + h


def test_foreign_nnx_layer_is_an_error():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  stranger = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

  class Calls(nnx.Module):

    def __init__(self):
      self.model = model

    def __call__(self, x):
      return stranger(self.model(x))

  with pytest.raises(ValueError, match='not part of a captured model'):
    mac_optax.capture(Calls())(jnp.ones((2, 3)))
