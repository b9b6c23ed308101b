"""Non-finite safety: bad steps and bad statistics do not poison MAC's state.

Oracles: an uninterrupted run that never saw the bad step, and the EMA and
bias-correction timeline computed by hand in float64 with the bad capture
left out.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import small_vit

BETA = 0.9


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name='fc1')(x))
    return nn.Dense(3, name='fc2')(x)


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_apply_if_finite_leaves_the_mac_state_untouched():
  _, params, layers, apply_with_stats = small_vit.build(batch_size=4)
  data = small_vit.batches(3, 4, seed=4)
  bad_x = data[0][0].copy()
  bad_x[1, 2, 3, 0] = np.nan  # NaN activations, loss and gradients
  tx = optax.apply_if_finite(small_vit.optimizer(layers), 3)
  step = jax.jit(small_vit.train_step(tx, apply_with_stats))
  state = tx.init(params)
  params_0, state_0, _ = step(params, state, *data[0])
  params_1, state_1, loss = step(params_0, state_0, bad_x, data[0][1])
  assert not np.isfinite(loss)
  assert int(state_1.notfinite_count) == 1
  _assert_identical(params_1, params_0)
  _assert_identical(state_1.inner_state, state_0.inner_state)
  # Training goes on exactly as if the bad batch had never been seen.
  resumed, clean = (params_1, state_1), (params_0, state_0)
  for x, y in data[1:]:
    resumed = step(*resumed, x, y)[:2]
    clean = step(*clean, x, y)[:2]
  _assert_identical(resumed[0], clean[0])
  _assert_identical(resumed[1].inner_state, clean[1].inner_state)


@pytest.fixture(scope='module')
def mlp():
  model = _MLP()
  x = jnp.ones((4, 5))
  params = model.init(jax.random.key(0), x)['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, x)
  return params, layers


def _stats(rng):
  return {
      'fc1': {'mean_input': jnp.asarray(np.append(rng.normal(size=5), 1.0),
                                        jnp.float32),
              'rows': jnp.float32(4)},
      'fc2': {'mean_input': jnp.asarray(np.append(rng.normal(size=6), 1.0),
                                        jnp.float32),
              'rows': jnp.float32(4)},
  }


@pytest.mark.parametrize('bad_value', [np.nan, np.inf])
def test_a_nonfinite_statistic_skips_that_layers_capture(mlp, bad_value):
  params, layers = mlp
  tx = mac_optax.scale_by_mac(layers, damping=0.5, stat_decay=BETA, t_cov=1,
                              t_inv=1)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  stats = [_stats(rng) for _ in range(3)]
  stats[1]['fc1']['mean_input'] = stats[1]['fc1']['mean_input'].at[2].set(
      bad_value)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  history = []
  for step_stats in stats:
    updates, state = update(grads, state, params, mac_stats=step_stats)
    history.append(state)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.isfinite(leaf))
  # At the bad step fc1 keeps its EMA and its preconditioner; fc2 moves on.
  _assert_identical(history[1].mean_input_ema['fc1'],
                    history[0].mean_input_ema['fc1'])
  _assert_identical(history[1].mean_input['fc1'], history[0].mean_input['fc1'])
  assert int(history[1].skipped_captures['fc1']) == 1
  assert int(history[1].skipped_captures['fc2']) == 0
  assert int(state.stat_count) == 3
  # By hand: fc1's EMA took captures 0 and 2 (bias correction k = 2), fc2's
  # all three (k = 3).
  s = lambda t, name: np.asarray(stats[t][name]['mean_input'], np.float64)
  ema = lambda values: sum((1 - BETA) * BETA ** (len(values) - 1 - i) * v
                           for i, v in enumerate(values))
  fc1 = ema([s(0, 'fc1'), s(2, 'fc1')]) / (1 - BETA ** 2)
  fc2 = ema([s(0, 'fc2'), s(1, 'fc2'), s(2, 'fc2')]) / (1 - BETA ** 3)
  np.testing.assert_allclose(state.mean_input['fc1'], fc1,
                             rtol=1e-6)
  np.testing.assert_allclose(state.mean_input['fc2'], fc2,
                             rtol=1e-6)


def test_nonfinite_statistics_off_capture_steps_are_ignored(mlp):
  params, layers = mlp
  tx = mac_optax.scale_by_mac(layers, stat_decay=BETA, t_cov=2, t_inv=2)
  rng = np.random.default_rng(1)
  good, bad = _stats(rng), _stats(rng)
  bad['fc2']['mean_input'] = bad['fc2']['mean_input'] * np.nan
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  _, state = update(grads, tx.init(params), params, mac_stats=good)
  before = state
  updates, state = update(grads, state, params, mac_stats=bad)  # t = 1
  _assert_identical(state.mean_input_ema, before.mean_input_ema)
  _assert_identical(state.skipped_captures, before.skipped_captures)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf))


def test_a_bad_micro_batch_skips_the_layer_for_that_step(mlp):
  params, layers = mlp
  rng = np.random.default_rng(2)
  good, bad = _stats(rng), _stats(rng)
  bad['fc1']['mean_input'] = bad['fc1']['mean_input'] * np.inf
  tx = mac_optax.multi_steps(
      mac_optax.scale_by_mac(layers, stat_decay=BETA, t_cov=1, t_inv=1), 2,
      example_stats=good)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  _, state = update(grads, state, params, mac_stats=good)
  updates, state = update(grads, state, params, mac_stats=bad)
  mac_state = state.inner_opt_state
  assert int(mac_state.count) == 1
  assert int(mac_state.skipped_captures['fc1']) == 1
  np.testing.assert_array_equal(mac_state.mean_input_ema['fc1'],
                                0.0)
  merged = (np.asarray(good['fc2']['mean_input'], np.float64)
            + np.asarray(bad['fc2']['mean_input'], np.float64)) / 2
  np.testing.assert_allclose(mac_state.mean_input['fc2'],
                             merged, rtol=1e-6)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf))
