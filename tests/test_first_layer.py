"""The first-layer factor against the authors' formula (spec §6).

Oracle: per batch, the im2col patches of the whole batch in PyTorch's
(C, *kernel) order (tests/oracles.py), a ones column for the bias, the
uncentred second moment S_b = XᵀX / R_b, averaged over batches with equal
weight; then (Σ + λI)⁻¹ by numpy's float64 inverse, applied to the gradient.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import oracles
import small_vit

DAMPING = 0.7
BATCH_SIZES = (3, 3, 2)  # the smaller last batch tells the weightings apart


class _ConvFirst(nn.Module):
  conv: dict

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(name='stem', **self.conv)(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


class _DenseFirst(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.DenseGeneral(4, axis=(-2, -1), name='stem')(x))
    return nn.Dense(3, name='head')(x)


CONVS = {
    'same-stride2': dict(features=4, kernel_size=(3, 3), strides=2),
    'circular': dict(features=4, kernel_size=(3, 3), padding='CIRCULAR'),
    'dilated-explicit-nobias': dict(
        features=4, kernel_size=(2, 3), kernel_dilation=2,
        input_dilation=(1, 2), padding=((1, 2), (0, 1)), use_bias=False),
}


def _batches(shape, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(n,) + shape).astype(np.float32) + 0.5
          for n in BATCH_SIZES]


def _flax_order(kernel_size, channels, has_bias):
  """Index map: position in the Flax (*k, C) layout -> PyTorch (C, *k)."""
  d_in = channels * int(np.prod(kernel_size))
  order = oracles.torch_order_to_flax(
      np.arange(d_in, dtype=np.float64)[None], kernel_size, channels, False)
  order = order[0].astype(int)
  return np.concatenate([order, [d_in]]) if has_bias else order


def _reference_moment(rows_per_batch, weighting='batch'):
  moments = [r.T @ r / len(r) for r in rows_per_batch]
  if weighting == 'batch':
    return np.mean(moments, axis=0)
  counts = [len(r) for r in rows_per_batch]
  return sum(c * m for c, m in zip(counts, moments)) / sum(counts)


def _conv_rows(batch, conv):
  """Whole-batch patches, PyTorch order, plus the bias column."""
  kernel_size = conv['kernel_size']
  rank = len(kernel_size)
  broadcast = lambda v: (v,) * rank if isinstance(v, int) else v
  patches = oracles.im2col(
      batch, kernel_size, broadcast(conv.get('strides', 1)),
      conv.get('padding', 'SAME'), broadcast(conv.get('input_dilation', 1)),
      broadcast(conv.get('kernel_dilation', 1)))
  rows = patches.reshape(-1, batch.shape[-1] * int(np.prod(kernel_size)))
  return oracles.augment(rows, conv.get('use_bias', True))


def _measure(model, batches, **kwargs):
  params = jax.jit(model.init)(jax.random.key(0), batches[0])['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, batches[0])
  moments = mac_optax.input_second_moments(
      model.apply, {'params': params}, batches, layers=layers,
      progress=False, **kwargs)
  return params, layers, moments


@pytest.mark.parametrize('name', list(CONVS))
def test_conv_second_moment_matches_reference_formula(name):
  conv = CONVS[name]
  batches = _batches((7, 7, 2))
  _, layers, moments = _measure(_ConvFirst(conv), batches)
  assert set(moments) == {'stem'}  # the default: the first layer called
  rows = [_conv_rows(np.asarray(b, np.float64), conv) for b in batches]
  order = _flax_order(conv['kernel_size'], 2, conv.get('use_bias', True))
  expected = _reference_moment(rows)[np.ix_(order, order)]
  moment = moments['stem']['second_moment']
  assert moment.shape == (layers[('stem',)].dim,) * 2 == expected.shape
  np.testing.assert_allclose(moment, expected, rtol=1e-5, atol=1e-6)


def test_weightings_and_dense_first_layer():
  batches = _batches((3, 2, 5), seed=1)
  model = _DenseFirst()
  _, _, by_batch = _measure(model, batches)
  _, _, by_row = _measure(model, batches, weighting='row')
  rows = [oracles.augment(np.asarray(b, np.float64).reshape(-1, 10), True)
          for b in batches]
  np.testing.assert_allclose(by_batch['stem']['second_moment'],
                             _reference_moment(rows, 'batch'), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(by_row['stem']['second_moment'],
                             _reference_moment(rows, 'row'), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(by_batch['stem']['second_moment'],
                         by_row['stem']['second_moment'], rtol=1e-3)


@pytest.fixture(scope='module')
def vit():
  model, params, layers, apply_with_stats = small_vit.build(batch_size=4)
  data = small_vit.batches(3, 4, seed=2)
  return model, params, layers, apply_with_stats, data


@pytest.fixture(scope='module')
def vit_moments(vit):
  model, params, layers, apply_with_stats, data = vit
  moments = mac_optax.input_second_moments(
      model.apply, {'params': params}, [x for x, _ in data], layers=layers,
      progress=False)
  grad_fn = jax.jit(jax.value_and_grad(small_vit.loss_fn(apply_with_stats),
                                       has_aux=True))
  (_, stats), grads = grad_fn(params, *data[0])
  return moments, stats, grads


def test_vit_default_is_the_patch_embedding_with_progress_bar(vit, capsys):
  model, params, layers, _, data = vit
  assert next(iter(layers)) != ('embed',)  # not simply the first in `layers`
  moments = mac_optax.input_second_moments(
      model.apply, {'params': params}, iter([x for x, _ in data]),
      layers=layers, num_batches=len(data))
  assert set(moments) == {'embed'}
  assert 'input second moment of embed' in capsys.readouterr().err
  rows = [_conv_rows(np.asarray(x, np.float64),
                     dict(kernel_size=(4, 4), strides=4, padding='VALID'))
          for x, _ in data]
  order = _flax_order((4, 4), 1, True)
  np.testing.assert_allclose(moments['embed']['second_moment'],
                             _reference_moment(rows)[np.ix_(order, order)],
                             rtol=1e-5, atol=1e-6)


def _flat_grad(grad, spec):
  d_in = int(np.prod(spec.in_shape))
  rows = [np.asarray(grad['kernel'], np.float64).reshape(d_in, -1)]
  if spec.has_bias:
    rows.append(np.asarray(grad['bias'], np.float64).reshape(1, -1))
  return np.concatenate(rows)


@pytest.mark.parametrize('convention', ['unit', 'damping'])
def test_mac_applies_the_damped_inverse_to_the_first_layer_only(
    vit, vit_moments, convention):
  _, params, layers, _, _ = vit
  moments, stats, grads = vit_moments
  sigma = np.asarray(moments['embed']['second_moment'], np.float64)
  exact = optax.chain(
      mac_optax.scale_by_second_moments(layers, moments, damping=DAMPING,
                                        scale=convention),
      mac_optax.scale_by_mac(layers.without([('embed',)]), damping=DAMPING))
  rank_one = mac_optax.scale_by_mac(layers, damping=DAMPING)
  updates, state = jax.jit(exact.update)(grads, exact.init(params), params,
                                         mac_stats=stats)
  plain, _ = jax.jit(rank_one.update)(grads, rank_one.init(params), params,
                                      mac_stats=stats)
  spec = layers[('embed',)]
  inverse = np.linalg.inv(sigma + DAMPING * np.eye(spec.dim))
  if convention == 'damping':
    inverse *= DAMPING
  expected = inverse @ _flat_grad(grads['embed'], spec)
  np.testing.assert_allclose(_flat_grad(updates['embed'], spec), expected,
                             rtol=1e-4, atol=1e-6)
  assert not np.allclose(_flat_grad(plain['embed'], spec), expected,
                         rtol=1e-2)
  for path in layers:
    if path != ('embed',):
      jax.tree.map(np.testing.assert_array_equal,
                   small_vit.flat(updates)['/'.join(path) + '/kernel'],
                   small_vit.flat(plain)['/'.join(path) + '/kernel'])
  # The only d x d state is the first layer's; it has no rank-one EMA.
  square = [k for k, v in small_vit.flat(state).items()
            if v.ndim == 2 and v.shape[0] == v.shape[1] and v.shape[0] > 2]
  assert sorted(square) == ['0/damped_inverse/embed', '0/second_moment/embed']
  assert 'embed' not in state[1].mean_input_ema


def test_injected_damping_reaches_the_inverse_at_the_next_refresh(
    vit, vit_moments):
  _, params, layers, _, _ = vit
  moments, stats, grads = vit_moments
  sigma = np.asarray(moments['embed']['second_moment'], np.float64)
  tx = optax.inject_hyperparams(mac_optax.scale_by_second_moments)(
      layers=layers, second_moments=moments, damping=0.5, t_inv=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  expected_damping = [0.5, 0.5, 2.0]  # set to 2 after step 0; refresh at 2
  for step, damping in enumerate(expected_damping):
    _, state = update(grads, state, params, mac_stats=stats)
    inverse = state.inner_state.damped_inverse['embed']
    np.testing.assert_allclose(
        inverse, np.linalg.inv(sigma + damping * np.eye(len(sigma))),
        rtol=1e-4, atol=1e-6, err_msg=f'step {step}')
    state.hyperparams['damping'] = jnp.asarray(2.0)


class _GroupedFirst(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), feature_group_count=2, name='grouped')(x).sum()


def test_bad_requests_name_the_layer(vit):
  model, params, layers, _, data = vit
  images = [x for x, _ in data]
  measure = lambda **kw: mac_optax.input_second_moments(
      model.apply, {'params': params}, images, layers=layers, progress=False,
      **kw)
  with pytest.raises(ValueError, match=r'`paths` asks for nope, which is not a preconditioned layer'):
    measure(paths=['nope'])
  with pytest.raises(ValueError, match=r'layer attn/value .*attention_value'):
    measure(paths=['attn/value'])
  with pytest.raises(ValueError, match='weighting must be one of'):
    measure(weighting='example')
  with pytest.raises(ValueError, match='got no batches'):
    mac_optax.input_second_moments(model.apply, {'params': params}, [],
                                   layers=layers)
  grouped = _GroupedFirst()
  x = jnp.ones((2, 5, 5, 4))
  grouped_params = grouped.init(jax.random.key(0), x)['params']
  grouped_layers = mac_optax.find_layers(grouped.apply,
                                         {'params': grouped_params}, x)
  with pytest.raises(ValueError, match=r'grouped .*(block|feature_group)'):
    mac_optax.input_second_moments(grouped.apply, {'params': grouped_params},
                                   [x], layers=grouped_layers, progress=False)
  with pytest.raises(ValueError, match=r'second_moments for layer embed '
                     r'\(Conv\) has shape \(3, 3\), expected \(17, 17\)'):
    mac_optax.mac(0.1, layers=layers,
                  second_moments={'embed': {'second_moment': jnp.eye(3)}})
  moments = {'embed': {'second_moment': jnp.eye(17)}}
  with pytest.raises(ValueError, match='scale must be one of'):
    mac_optax.scale_by_second_moments(layers, moments, scale='scaled')
  with pytest.raises(ValueError, match='second_moment_scale must be one of'):
    mac_optax.mac(0.1, layers=layers, second_moments=moments,
                  second_moment_scale='scaled')
