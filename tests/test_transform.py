"""scale_by_mac against the dense reference preconditioner and timeline."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import oracles


class _Layers(nn.Module):
  """One of each layer type, including blocked (grouped, per-head) layers."""

  @nn.compact
  def __call__(self, image, tokens):
    a = nn.Conv(6, (3, 3), feature_group_count=2, name='grouped')(image)
    b = nn.Conv(3, (2, 2), strides=2, use_bias=False, name='conv')(image)
    c = nn.Conv(8, (3, 3), feature_group_count=4, name='depthwise')(image)
    h = nn.Dense(6, name='dense')(tokens)
    h = nn.DenseGeneral((2, 3), name='heads')(h)
    h = nn.DenseGeneral(4, axis=(-2, -1), name='merge')(h)
    h = nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(h)
    return a.sum() + b.sum() + c.sum() + h.sum()


@pytest.fixture(scope='module')
def setup():
  model = _Layers()
  image = jax.random.normal(jax.random.key(0), (2, 6, 6, 4)) + 0.5
  tokens = jax.random.normal(jax.random.key(1), (2, 5, 4)) + 0.5
  variables = model.init(jax.random.key(2), image, tokens)
  capture = mac_optax.capture(model.apply, value_stat='per_head',
                              depthwise_shared=False)
  layers = mac_optax.find_layers(capture, variables, image, tokens)
  _, stats = capture(variables, image, tokens)
  return model, variables['params'], layers, stats


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _flax_to_torch_order(mean, spec):
  """A Flax-order conv statistic (*k, C/g [,1]) in PyTorch's (C/g, *k [,1])."""
  kernel_size, channels = spec.in_shape[:-1], spec.in_shape[-1]
  body = mean[..., : channels * int(np.prod(kernel_size))]
  body = body.reshape(mean.shape[:-1] + tuple(kernel_size) + (channels,))
  body = np.moveaxis(body, -1, -1 - len(kernel_size))
  body = body.reshape(mean.shape[:-1] + (-1,))
  if spec.has_bias:
    body = np.concatenate([body, mean[..., -1:]], axis=-1)
  return body


@pytest.mark.parametrize('scale', ['damping', 'unit'])
def test_first_step_matches_dense_reference_preconditioner(setup, scale):
  _, params, layers, stats = setup
  damping = 0.7
  grads = _random_like(params, 3)
  tx = mac_optax.scale_by_mac(layers, damping=damping, scale=scale)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params,
                                  mac_stats=stats)
  assert {spec.kind for spec in layers.values()} == {
      'conv', 'dense', 'attention_value'}
  assert layers[('grouped',)].blocks == 2
  assert layers[('depthwise',)].blocks == 4
  assert layers[('attn', 'value')].blocks == 2
  factor = damping if scale == 'unit' else 1.0
  for path, spec in layers.items():
    grad, update = _get(grads, path), _get(updates, path)
    mean = np.asarray(_get(stats, path)['mean_input'], np.float64)
    if spec.kind == 'conv':
      mean = _flax_to_torch_order(mean, spec)
    kernel, bias = oracles.precondition_layer(
        grad['kernel'], grad.get('bias'), mean, damping, spec.kind,
        len(spec.in_shape))
    np.testing.assert_allclose(update['kernel'], kernel / factor,
                               rtol=2e-5, atol=2e-6, err_msg=str(path))
    if bias is not None:
      np.testing.assert_allclose(update['bias'], bias / factor,
                                 rtol=2e-5, atol=2e-6, err_msg=str(path))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_dense_identity_of_rank_one_form():
  """P = λ (ââᵀ + λI)⁻¹ with eigenvalues 1 and λ/(λ+‖â‖²) (spec §4.2)."""
  rng = np.random.default_rng(0)
  mean, damping = rng.normal(size=7), 0.3
  inverse = np.linalg.inv(np.outer(mean, mean) + damping * np.eye(7))
  p = oracles.preconditioner_matrix(mean, damping)
  np.testing.assert_allclose(p, damping * inverse, rtol=1e-10, atol=1e-12)
  # With the identity as the gradient (6 kernel rows, the bias as the 7th)
  # MAC's first update is its preconditioner matrix itself.
  params, layers = _dense_setup(features_in=6, features_out=7)
  identity = np.eye(7, dtype=np.float32)
  grads = {'kernel': jnp.asarray(identity[:6]),
           'bias': jnp.asarray(identity[6])}
  stats = {'mean_input': jnp.asarray(mean, jnp.float32)}
  # 'reference' and 'exact' are the earlier names of the two scales.
  for scale, expected in (('damping', p), ('unit', inverse),
                          ('reference', p), ('exact', inverse)):
    tx = mac_optax.scale_by_mac(layers, damping=damping, scale=scale)
    updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
    matrix = np.concatenate([updates['kernel'], updates['bias'][None]], axis=0)
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-6)
  eigenvalues = np.sort(np.linalg.eigvalsh(p))
  np.testing.assert_allclose(eigenvalues[0], damping / (damping + mean @ mean))
  np.testing.assert_allclose(eigenvalues[1:], 1.0)


def _dense_setup(features_in=3, features_out=2, use_bias=True):
  model = nn.Dense(features_out, use_bias=use_bias)
  x = jnp.ones((4, features_in))
  variables = model.init(jax.random.key(0), x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  return variables['params'], layers


@pytest.mark.parametrize('t_cov, t_inv', [(5, 50), (3, 4), (1, 1), (2, 7)])
def test_timeline_matches_reference_counters(t_cov, t_inv):
  params, layers = _dense_setup()
  beta, damping = 0.9, 0.5
  tx = mac_optax.scale_by_mac(layers, damping=damping, stat_decay=beta,
                              t_cov=t_cov, t_inv=t_inv)
  state = tx.init(params)
  update = jax.jit(tx.update)
  reference = oracles.ReferenceMAC(0.1, 0.0, 0.0, damping, beta, t_cov, t_inv)
  rng = np.random.default_rng(1)
  for t in range(57):
    stat = np.concatenate([rng.normal(size=3), [1.0]])
    grads = _random_like(params, 100 + t)
    reference.capture('dense', stat)
    reference.refresh()
    updates, state = update(grads, state, params,
                            mac_stats={'mean_input': jnp.asarray(stat)})
    assert int(state.count) == t + 1
    assert int(state.stat_count) == reference.k
    np.testing.assert_allclose(state.mean_input,
                               reference.mean['dense'], rtol=1e-5, atol=1e-6)
    weight, bias = oracles.precondition_torch(
        np.asarray(grads['kernel'], np.float64).T,
        np.asarray(grads['bias'], np.float64), reference.mean['dense'],
        damping)
    np.testing.assert_allclose(updates['kernel'], weight.T, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(updates['bias'], bias, rtol=1e-5, atol=1e-6)
    if (t_cov, t_inv) == (5, 50) and t == 50:
      assert reference.k == 11
    reference.finish()


def test_preconditioner_frozen_between_refreshes():
  params, layers = _dense_setup()
  tx = mac_optax.scale_by_mac(layers, t_cov=1, t_inv=10)
  state = tx.init(params)
  first = {'mean_input': jnp.array([1.0, 2.0, 3.0, 1.0])}
  _, state = tx.update(params, state, mac_stats=first)
  refreshed = state.mean_input
  np.testing.assert_allclose(refreshed, first['mean_input'], rtol=1e-6)
  for t in range(1, 10):
    stats = {'mean_input': jnp.array([t, -t, 0.5 * t, 1.0])}
    _, state = tx.update(params, state, mac_stats=stats)
    np.testing.assert_array_equal(state.mean_input, refreshed)
  _, state = tx.update(params, state, mac_stats=first)
  assert not np.allclose(state.mean_input, refreshed)


def test_zero_activation_stays_finite():
  params, layers = _dense_setup(use_bias=False)
  grads = _random_like(params, 5)
  for damping in (1.0, 1e-30):
    tx = mac_optax.scale_by_mac(layers, damping=damping, scale='exact')
    updates, _ = tx.update(grads, tx.init(params), params,
                           mac_stats={'mean_input': jnp.zeros(3)})
    np.testing.assert_allclose(updates['kernel'], grads['kernel'] / damping,
                               rtol=1e-6)


def test_bf16_params_keep_dtype_and_fp32_state():
  params, layers = _dense_setup(features_in=4, features_out=3)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  grads = _random_like(params, 6)
  stats = {'mean_input': jnp.array([0.5, -1.0, 2.0, 0.25, 1.0],
                                   jnp.bfloat16)}
  tx = mac_optax.mac(0.1, layers=layers)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params,
                                          mac_stats=stats)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  mac_state = new_state[0]
  assert mac_state.mean_input_ema.dtype == jnp.float32
  chex.assert_trees_all_equal_dtypes(new_state, state)
  grads32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  weight, bias = oracles.precondition_torch(
      np.asarray(grads32['kernel'], np.float64).T,
      np.asarray(grads32['bias'], np.float64),
      np.asarray(stats['mean_input'], np.float64), 1.0)
  np.testing.assert_allclose(np.asarray(updates['kernel'], np.float32),
                             -0.1 * (weight.T + 5e-4 * np.asarray(
                                 params['kernel'], np.float32)),
                             rtol=2e-2, atol=1e-3)
  # No weight-decay mask: the bias decays too.
  np.testing.assert_allclose(np.asarray(updates['bias'], np.float32),
                             -0.1 * (bias + 5e-4 * np.asarray(
                                 params['bias'], np.float32)),
                             rtol=2e-2, atol=1e-3)


# --------------------------------------------------------------------------
# Bad input.


def test_missing_stats_raise_unless_opted_in():
  params, layers = _dense_setup()
  tx = mac_optax.scale_by_mac(layers)
  with pytest.raises(ValueError, match='mac_stats=stats'):
    tx.update(params, tx.init(params), params)
  lenient = mac_optax.scale_by_mac(layers, allow_missing_stats=True)
  updates, state = lenient.update(params, lenient.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, updates, params)
  assert int(state.count) == 1


def _mlp_setup():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = jnp.ones((3, 5))
  variables = model.init(jax.random.key(0), x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  _, stats = mac_optax.capture(model.apply)(variables, x)
  return variables['params'], layers, stats


@pytest.mark.parametrize(
    'corrupt, message',
    [(lambda s: s.pop('layers_2'),
      r'no statistic for layer layers_2 \(Dense\).*shape \(5,\)'),
     (lambda s: s['layers_0'].update(mean_input=jnp.ones(5)),
      r'layers_0 \(Dense\) has shape \(5,\), expected \(6,\)'),
     (lambda s: s.update(head={'mean_input': jnp.ones(3)}),
      'statistic for head, which is not a preconditioned layer'),
     (lambda s: s.update(layers_0=jnp.ones(6)),
      "layers_0 is not a 'mean_input' statistic")],
    ids=['missing', 'wrong-shape', 'layer-without-params', 'malformed-tree'],
)
def test_bad_stats_name_the_layer(corrupt, message):
  params, layers, stats = _mlp_setup()
  tx = mac_optax.scale_by_mac(layers)
  corrupt(stats)
  with pytest.raises(ValueError, match=message):
    tx.update(params, tx.init(params), params, mac_stats=stats)


def test_layers_of_another_model_are_rejected_at_init():
  params, layers, _ = _mlp_setup()
  other, _ = _dense_setup()
  tx = mac_optax.scale_by_mac(layers)
  with pytest.raises(ValueError, match='layers_0.*has no "kernel"'):
    tx.init(other)
  wrong = jax.tree.map(lambda p: jnp.ones(p.shape + (1,)), params)
  with pytest.raises(ValueError, match=r'layers_0 \(Dense\): kernel shape'):
    tx.init(wrong)


def test_updates_with_another_structure_are_rejected():
  params, layers, stats = _mlp_setup()
  tx = mac_optax.scale_by_mac(layers)
  state = tx.init(params)
  grads = {'layers_0': params['layers_0']}
  with pytest.raises(ValueError, match='layers_2 .*updates have no kernel'):
    tx.update(grads, state, params, mac_stats=stats)


@pytest.mark.parametrize(
    'kwargs, message',
    [(dict(damping=0.0), 'damping must be > 0'),
     (dict(damping=-1.0), 'damping must be > 0'),
     (dict(stat_decay=1.0), r'stat_decay must be in \[0, 1\)'),
     (dict(stat_decay=-0.1), r'stat_decay must be in \[0, 1\)'),
     (dict(t_cov=0), 't_cov must be a positive integer'),
     (dict(t_inv=2.5), 't_inv must be a positive integer'),
     (dict(scale='inverse'), 'scale must be one of')],
)
def test_bad_hyperparameters(kwargs, message):
  _, layers = _dense_setup()
  with pytest.raises(ValueError, match=message):
    mac_optax.scale_by_mac(layers, **kwargs)


def test_layers_argument_must_come_from_find_layers():
  with pytest.raises(TypeError, match='find_layers'):
    mac_optax.scale_by_mac(None)


def test_bad_capture_option():
  with pytest.raises(ValueError, match='value_stat'):
    mac_optax.capture(nn.Dense(2).apply, value_stat='heads')


def test_masked_kernel_with_unmasked_bias_is_rejected():
  params, layers, _ = _mlp_setup()
  tx = optax.masked(mac_optax.scale_by_mac(layers), {
      'layers_0': {'kernel': True, 'bias': False},
      'layers_2': {'kernel': True, 'bias': True}})
  with pytest.raises(ValueError, match='layers_0.*masked .*together'):
    tx.init(params)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(4, name='fc')(x)) + x, None


def _scanned(variable_axes):
  class Stack(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.remat(nn.Dense)(4, name='inp')(x)
      scan = nn.scan(_Block, variable_axes=variable_axes,
                     split_rngs={'params': True}, length=3)
      return scan(name='layers')(x, None)[0]

  return Stack()


def test_scanned_layers_are_preconditioned_per_layer():
  model = _scanned({'params': 0, 'mac_stats': 0, oracles.RAW: 0})
  x = jax.random.normal(jax.random.key(0), (5, 3)) + 1.0
  variables = model.init(jax.random.key(1), x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  assert layers[('layers', 'fc')].stack_shape == (3,)
  _, stats = mac_optax.capture(model.apply)(variables, x)
  _, _, raw = oracles.apply_recording(model, variables, x)
  inputs = raw['layers']['fc']['inputs'][0]  # stacked by scan: (3, 5, 4)
  for layer in range(3):
    np.testing.assert_allclose(
        stats['layers']['fc']['mean_input'][layer],
        oracles.dense_mean(inputs[layer], 1, True), rtol=2e-5, atol=2e-6)
  params = variables['params']
  grads = _random_like(params, 7)
  tx = mac_optax.scale_by_mac(layers, damping=0.3)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  for layer in range(3):
    kernel, bias = oracles.precondition_layer(
        grads['layers']['fc']['kernel'][layer],
        grads['layers']['fc']['bias'][layer],
        np.asarray(stats['layers']['fc']['mean_input'][layer])[None], 0.3,
        'dense')
    np.testing.assert_allclose(updates['layers']['fc']['kernel'][layer],
                               kernel, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(updates['layers']['fc']['bias'][layer], bias,
                               rtol=2e-5, atol=2e-6)


def test_scan_listing_only_params_gives_the_same_statistics():
  x = jax.random.normal(jax.random.key(0), (5, 3)) + 1.0
  listed = _scanned({'params': 0, 'mac_stats': 0})
  unlisted = _scanned({'params': 0})
  variables = listed.init(jax.random.key(1), x)
  _, expected = mac_optax.capture(listed.apply)(variables, x)
  _, stats = mac_optax.capture(unlisted.apply)(variables, x)
  jax.tree.map(np.testing.assert_array_equal, stats, expected)
  layers = mac_optax.find_layers(unlisted.apply, variables, x)
  assert layers[('layers', 'fc')].stack_shape == (3,)
