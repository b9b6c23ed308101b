"""Never silently wrong: the optimizer's answers to bad numbers and bad inputs.

Each case is a fault that once gave NaN, inf or a silently wrong update (or
an error that named nothing). Oracles: the preconditioner written out in
float64 numpy, and the EMA / bias-correction timeline by hand.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import mac_optax

DAMPING = 1.0
BETA = 0.95


def _oracle(grad_kernel, grad_bias, mean_input, damping, scale='damping'):
  """``G - â (âᵀG) / (λ + ‖â‖²)`` in float64, the bias as the last row."""
  grad = np.concatenate([np.asarray(grad_kernel, np.float64),
                         np.asarray(grad_bias, np.float64)[None]], axis=0)
  a = np.asarray(mean_input, np.float64)
  new = grad - np.outer(a, a @ grad) / (damping + a @ a)
  if scale == 'unit':
    new = new / damping
  return new[:-1], new[-1]


def _dense(features_in=3, features_out=2):
  model = nn.Dense(features_out)
  x = jnp.ones((4, features_in))
  params = model.init(jax.random.key(0), x)['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, x)
  return model, params, layers


# --------------------------------------------------------------------------
# Huge but finite activations.


def test_huge_finite_activation_gives_the_float64_update():
  model, params, layers = _dense()
  x = np.ones((4, 3), np.float32)
  x[0, 0] = 1e21  # ‖ā‖² = 6e40 overflows float32
  apply_with_stats = mac_optax.capture(model.apply)
  target = jnp.asarray([1.0, -2.0])

  def loss_fn(params):
    out, stats = apply_with_stats({'params': params}, x)
    return jnp.sum(out * target), stats

  grads, stats = jax.grad(loss_fn, has_aux=True)(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  tx = mac_optax.scale_by_mac(layers, damping=DAMPING, stat_decay=BETA)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      mac_stats=stats)
  mean_input = np.asarray(state.mean_input)
  np.testing.assert_allclose(mean_input[0], 2.5e20, rtol=1e-5)
  assert int(state.skipped_captures) == 0
  kernel, bias = _oracle(grads['kernel'], grads['bias'], mean_input, DAMPING)
  assert np.isfinite(updates['kernel']).all()
  scale = np.abs(grads['kernel']).max()
  np.testing.assert_allclose(updates['kernel'], kernel, rtol=1e-5,
                             atol=1e-6 * scale)
  np.testing.assert_allclose(updates['bias'], bias, rtol=1e-5,
                             atol=1e-6 * scale)

  # A small gradient along the huge direction is still projected out (it
  # used to pass through unchanged: ‖â‖² = inf made the projection 0).
  ones = jax.tree.map(jnp.ones_like, grads)
  updates, _ = jax.jit(tx.update)(ones, tx.init(params), params,
                                  mac_stats=stats)
  kernel, bias = _oracle(ones['kernel'], ones['bias'], mean_input, DAMPING)
  assert abs(kernel[0]).max() < 1e-6  # the 1e21 input's row: removed
  np.testing.assert_allclose(updates['kernel'], kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['bias'], bias, rtol=1e-5, atol=1e-6)


def test_default_size_numbers_are_bit_identical_to_the_plain_formula():
  # Rescaling by a power of two changes no rounding: the plain float32
  # formula, written out, gives the same bits.
  spec = mac_optax.LayerSpec('dense', 'Dense', (6,), (3,), 1, True)
  rng = np.random.default_rng(0)

  @jax.jit
  def plain(kernel, bias, a, damping):
    projection = (a[:6] @ kernel + a[6] * bias) / (damping + jnp.sum(a * a))
    return kernel - jnp.outer(a[:6], projection), bias - a[6] * projection

  precondition = jax.jit(
      lambda k, b, a, d: mac_optax.precondition(k, b, a, spec, d))
  for _ in range(20):
    a = (rng.normal(size=7) * 10.0 ** rng.uniform(-4, 4)).astype(np.float32)
    kernel = rng.normal(size=(6, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    damping = np.float32(10.0 ** rng.uniform(-3, 1))
    for got, want in zip(precondition(kernel, bias, a, damping),
                         plain(kernel, bias, a, damping)):
      np.testing.assert_array_equal(got, want)


def test_a_statistic_beyond_the_bound_is_skipped_like_a_nan_one():
  model, params, layers = _dense()
  apply_with_stats = mac_optax.capture(model.apply)
  huge = np.ones((4, 3), np.float32)
  huge[0, 0] = 1e30
  clean = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
  tx = mac_optax.scale_by_mac(layers, damping=DAMPING, stat_decay=BETA,
                              t_cov=1, t_inv=1)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  _, stats = apply_with_stats({'params': params}, huge)
  assert np.isfinite(stats['mean_input']).all()
  assert float(stats['mean_input'][0]) > mac_optax._transform.MAX_STATISTIC
  updates, state = update(grads, state, params, mac_stats=stats)
  assert int(state.skipped_captures) == 1
  np.testing.assert_array_equal(state.mean_input_ema, 0.0)
  # No statistic yet: the gradient passes unchanged.
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
  # The next clean capture is the only one in the bias correction.
  _, clean_stats = apply_with_stats({'params': params}, clean)
  updates, state = update(grads, state, params, mac_stats=clean_stats)
  mean_input = np.asarray(clean_stats['mean_input'], np.float64)
  np.testing.assert_allclose(state.mean_input, mean_input,
                             rtol=1e-6)
  kernel, bias = _oracle(grads['kernel'], grads['bias'], mean_input, DAMPING)
  np.testing.assert_allclose(updates['kernel'], kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['bias'], bias, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# First-layer second moments.


def _sequential():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  return model, variables, layers, x


@pytest.mark.parametrize('fault', ['nan_sample', 'scaled_1e20'])
def test_input_second_moments_rejects_non_finite_batches(fault):
  model, variables, layers, x = _sequential()
  bad = np.array(x)
  if fault == 'nan_sample':
    bad[2, 1] = np.nan
  else:
    bad = bad * 1e20  # squares overflow float32
  with pytest.raises(ValueError, match=r'layers_0 \(Dense\).*1 of 3 batches'):
    mac_optax.input_second_moments(model.apply, variables, [x, bad, x],
                                   layers=layers, progress=False)


def test_second_moments_must_be_finite_and_positive_semi_definite():
  model, variables, layers, x = _sequential()
  moments = mac_optax.input_second_moments(model.apply, variables, [x],
                                           layers=layers, progress=False)
  mac_optax.mac(0.1, layers=layers, second_moments=moments)  # accepted
  sigma = np.asarray(moments['layers_0']['second_moment'])
  non_psd = sigma - 2 * np.linalg.eigvalsh(sigma)[-1] * np.outer(
      np.eye(4)[0], np.eye(4)[0])
  for bad, message in ((non_psd, 'not positive semi-definite'),
                       (np.where(np.eye(4) > 0, np.nan, sigma), 'NaN or Inf'),
                       (sigma + np.triu(np.ones((4, 4)), 1), 'not symmetric')):
    with pytest.raises(ValueError, match=f'layers_0 .*{message}'):
      mac_optax.mac(0.1, layers=layers,
                    second_moments={'layers_0': {'second_moment': bad}})
    with pytest.raises(ValueError, match=f'layers_0 .*{message}'):
      mac_optax.scale_by_second_moments(
          layers, {'layers_0': {'second_moment': bad}})


# --------------------------------------------------------------------------
# Statistics of no rows.


class _Attention(nn.Module):

  @nn.compact
  def __call__(self, x, mask):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(
        x, mask=mask)


def test_fully_masked_attention_batch_is_skipped():
  model = _Attention()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  masked = jnp.zeros((2, 1, 3, 3), bool)
  open_mask = jnp.ones((2, 1, 3, 3), bool)
  variables = model.init(jax.random.key(0), x, open_mask)
  params = variables['params']
  layers = mac_optax.find_layers(model.apply, variables, x, open_mask)
  value = ('MultiHeadDotProductAttention_0', 'value')
  query = ('MultiHeadDotProductAttention_0', 'query')
  assert value in layers
  apply_with_stats = mac_optax.capture(model.apply)
  tx = mac_optax.scale_by_mac(layers, damping=DAMPING, stat_decay=BETA,
                              t_cov=1, t_inv=1)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)

  def node(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  _, stats = apply_with_stats(variables, x, masked)
  assert float(node(stats, value)['rows']) == 0  # all queries masked
  _, state = update(grads, tx.init(params), params, mac_stats=stats)
  assert int(node(state.skipped_captures, value)) == 1
  assert int(node(state.skipped_captures, query)) == 0
  np.testing.assert_array_equal(node(state.mean_input_ema, value), 0.0)
  # The first real batch is the value layer's only capture.
  _, open_stats = apply_with_stats(variables, x, open_mask)
  _, state = update(grads, state, params, mac_stats=open_stats)
  np.testing.assert_allclose(node(state.mean_input, value),
                             node(open_stats, value)['mean_input'], rtol=1e-6)


def test_empty_batch_is_skipped():
  model, params, layers = _dense()
  tx = mac_optax.scale_by_mac(layers, t_cov=1, t_inv=1)
  _, stats = mac_optax.capture(model.apply)({'params': params},
                                            jnp.ones((0, 3)))
  assert float(stats['rows']) == 0
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      mac_stats=stats)
  assert int(state.skipped_captures) == 1
  jax.tree.map(np.testing.assert_array_equal, updates, grads)


# --------------------------------------------------------------------------
# Injected (traced) hyperparameters.


def _injected_run(hyperparameter, value, steps=3, **kwargs):
  """Runs injected scale_by_mac, setting one hyperparameter under jit."""
  model, params, layers = _dense()
  apply_with_stats = mac_optax.capture(model.apply)
  tx = optax.inject_hyperparams(mac_optax.scale_by_mac)(
      layers=layers, **kwargs)
  state = tx.init(params)
  state.hyperparams[hyperparameter] = jnp.asarray(
      value, state.hyperparams[hyperparameter].dtype)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(2)
  results = []
  for _ in range(steps):
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    _, stats = apply_with_stats({'params': params}, x)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = update(grads, state, params, mac_stats=stats)
    results.append((stats, updates, state.inner_state))
  return params, results


def test_injected_stat_decay_of_one_is_clamped_below_one():
  _, results = _injected_run('stat_decay', 1.0, steps=1, t_cov=1, t_inv=1,
                             stat_decay=0.9)
  stats, updates, state = results[0]
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  assert all(np.isfinite(s).all() for s in jax.tree.leaves(state))
  # Clamped to the largest float32 below 1: after one capture the bias
  # correction still gives exactly that capture's statistic.
  np.testing.assert_allclose(state.mean_input,
                             stats['mean_input'], rtol=1e-6)


def test_injected_zero_damping_with_exact_scale_stays_finite():
  params, results = _injected_run('damping', 0.0, steps=1, t_cov=1, t_inv=1,
                                   scale='unit')
  stats, updates, _ = results[0]
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  floor = mac_optax._transform.MIN_DAMPING
  grads = jax.tree.map(jnp.ones_like, params)
  kernel, bias = _oracle(grads['kernel'], grads['bias'], stats['mean_input'],
                         floor, scale='unit')
  np.testing.assert_allclose(updates['kernel'], kernel, rtol=1e-4)
  np.testing.assert_allclose(updates['bias'], bias, rtol=1e-4)


@pytest.mark.parametrize('period', ['t_cov', 't_inv'])
def test_injected_period_of_zero_acts_as_one(period):
  _, zero = _injected_run(period, 0, steps=3, t_cov=1, t_inv=1)
  _, one = _injected_run(period, 1, steps=3, t_cov=1, t_inv=1)
  assert int(zero[-1][2].stat_count) == 3
  for (_, updates_zero, state_zero), (_, updates_one, state_one) in zip(
      zero, one):
    jax.tree.map(np.testing.assert_array_equal, updates_zero, updates_one)
    jax.tree.map(np.testing.assert_array_equal, state_zero, state_one)


def test_damping_array_is_rejected():
  _, params, layers = _dense()
  with pytest.raises(ValueError, match=r'damping must be a scalar.*\(4,\)'):
    mac_optax.mac(0.1, layers=layers, damping=jnp.ones(4))
  injected = optax.inject_hyperparams(mac_optax.scale_by_mac)(
      layers=layers, damping=jnp.ones(4))
  with pytest.raises(ValueError, match='damping must be a scalar'):
    injected.init(params)


# --------------------------------------------------------------------------
# Statistics, layers and state that do not belong.


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_statistics_are_rejected(dtype):
  model, variables, layers, x = _sequential()
  params = variables['params']
  _, stats = mac_optax.capture(model.apply)(variables, x)
  stats['layers_2']['mean_input'] = stats['layers_2']['mean_input'].astype(
      dtype)
  tx = mac_optax.scale_by_mac(layers)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError,
                     match=rf'layers_2 \(Dense\) has dtype {jnp.dtype(dtype)}'):
    tx.update(grads, tx.init(params), params, mac_stats=stats)


def test_layers_of_a_shallower_model_are_rejected_at_init():
  shallow = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(4)])
  deep = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(4), nn.relu,
                        nn.Dense(2)])
  x = jnp.ones((2, 3))
  shallow_vars = shallow.init(jax.random.key(0), x)
  deep_params = deep.init(jax.random.key(0), x)['params']
  layers = mac_optax.find_layers(shallow.apply, shallow_vars, x)
  # The same path names and shapes for the layers both models have.
  assert set(layers) == {('layers_0',), ('layers_2',)}
  tx = mac_optax.mac(0.1, layers=layers)
  with pytest.raises(ValueError, match=r'kernel at layers_4/kernel'):
    tx.init(deep_params)


class _Named(nn.Module):
  layer_name: str

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name=self.layer_name)(x)


def test_state_of_another_model_is_rejected_by_name():
  narrow, wide, other = _Named('d1'), _Named('d1'), _Named('d2')
  x8, x16 = jnp.ones((4, 8)), jnp.ones((4, 16))

  def build(model, x):
    variables = model.init(jax.random.key(0), x)
    layers = mac_optax.find_layers(model.apply, variables, x)
    tx = mac_optax.scale_by_mac(layers)
    return variables, tx, tx.init(variables['params'])

  narrow_vars, _, narrow_state = build(narrow, x8)
  wide_vars, wide_tx, _ = build(wide, x16)
  _, wide_stats = mac_optax.capture(wide.apply)(wide_vars, x16)
  grads = jax.tree.map(jnp.ones_like, wide_vars['params'])
  with pytest.raises(ValueError, match=r'layer d1 \(Dense\) has shape \(9,\)'
                     r'.*\(17,\).*another model'):
    wide_tx.update(grads, narrow_state, wide_vars['params'],
                   mac_stats=wide_stats)
  # A state whose layer `layers` does not have (once a bare KeyError).
  other_vars, other_tx, _ = build(other, x8)
  _, other_stats = mac_optax.capture(other.apply)(other_vars, x8)
  with pytest.raises(ValueError, match=r'for d1, which is not a layer.*d2'):
    other_tx.update(jax.tree.map(jnp.ones_like, other_vars['params']),
                    narrow_state, other_vars['params'], mac_stats=other_stats)


def test_state_sharding_through_masked_and_partition():
  model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(2)])
  x = jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)
  params = variables['params']
  layers = mac_optax.find_layers(model.apply, variables, x)
  specs = jax.tree.map(lambda p: P(*(['model'] + [None] * (p.ndim - 1))),
                       params)
  mask = mac_optax.precondition_mask(layers, params)
  labels = jax.tree.map(lambda m: 'mac' if m else 'adam', mask)
  labels['layers_0'] = {'kernel': 'adam', 'bias': 'adam'}  # MAC: layers_2
  for tx in (optax.masked(mac_optax.mac(0.1, layers=layers), mask),
             optax.partition({'mac': mac_optax.mac(0.1, layers=layers),
                              'adam': optax.adam(1e-3)}, labels)):
    shardings = mac_optax.state_sharding(tx, params, specs)
    state = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    leaves = jax.tree_util.tree_leaves_with_path(shardings)
    shapes = dict(jax.tree_util.tree_leaves_with_path(state))
    for path, spec in leaves:
      # Parameter-shaped leaves are sharded like their parameter, the rest
      # (MAC's statistics, counters) replicated.
      expected = P() if len(shapes[path].shape) == 0 or 'mean_input' in str(
          path) else P(*(['model'] + [None] * (len(shapes[path].shape) - 1)))
      assert spec == expected, (jax.tree_util.keystr(path), spec)


# --------------------------------------------------------------------------
# Nothing to precondition.


def test_empty_layers_are_refused_unless_allowed():
  model = nn.Sequential([nn.LayerNorm()])
  x = jnp.ones((4, 3))
  empty = mac_optax.Layers({})
  with pytest.raises(ValueError, match='`layers` is empty.*allow_empty=True'):
    mac_optax.mac(0.1, layers=empty)
  with pytest.raises(ValueError, match='`layers` is empty'):
    mac_optax.scale_by_mac(empty)
  variables = model.init(jax.random.key(0), x)
  allowed = mac_optax.find_layers(model.apply, variables, x, allow_empty=True)
  assert not allowed
  tx = mac_optax.mac(0.1, layers=allowed)  # the user opted out
  params = variables['params']
  _, stats = mac_optax.capture(model.apply, allow_empty=True)(variables, x)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  # Plain SGD with momentum and weight decay, as asked.
  jax.tree.map(lambda u, g, p: np.testing.assert_allclose(
      u, -0.1 * (g + 5e-4 * p), rtol=1e-6), updates, grads, params)
