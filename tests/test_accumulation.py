"""Gradient accumulation: k micro-batches of B rows equal one batch of k·B.

The model is the small ViT, whose attention value layer has the reference
statistic v = Σ_j p̄_j x̄_j: a product of two means, which is merged exactly
only through its factors (an average of the micro-batches' v is wrong).
The oracle is the same training on whole batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import small_vit

MICRO = 3      # micro-batch size B
K = 2          # micro-batches per step
STEPS = 3
TOLERANCE = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope='module')
def problem():
  _, params, layers, apply_with_stats = small_vit.build(batch_size=K * MICRO)
  data = small_vit.batches(STEPS, K * MICRO, seed=5)
  grad_fn = jax.jit(jax.value_and_grad(small_vit.loss_fn(apply_with_stats),
                                       has_aux=True))
  example_stats = jax.eval_shape(
      apply_with_stats, {'params': params}, data[0][0][:MICRO])[1]
  return params, layers, apply_with_stats, data, grad_fn, example_stats


@pytest.fixture(scope='module')
def whole_batches(problem):
  params, layers, apply_with_stats, data, _, _ = problem
  tx = small_vit.optimizer(layers)
  return small_vit.train(tx, apply_with_stats, params, data)


def _assert_close(a, b, **tolerance):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, **(tolerance or TOLERANCE)),
      a, b)


def test_multi_steps_equals_whole_batches(problem, whole_batches):
  params, layers, apply_with_stats, data, _, example_stats = problem
  tx = mac_optax.multi_steps(small_vit.optimizer(layers), K,
                             example_stats=example_stats)
  step = jax.jit(small_vit.train_step(tx, apply_with_stats))
  state = tx.init(params)
  for x, y in data:
    before = params
    for i in range(K):
      part = slice(i * MICRO, (i + 1) * MICRO)
      params, state, _ = step(params, state, x[part], y[part])
      if i < K - 1:  # accumulating: no update yet
        jax.tree.map(np.testing.assert_array_equal, params, before)
  expected_params, expected_state = whole_batches
  _assert_close(params, expected_params)
  mac_state, expected_mac = state.inner_opt_state[0], expected_state[0]
  # The counters advanced once per optimizer step, not per micro-batch.
  assert int(state.gradient_step) == STEPS and int(state.mini_step) == 0
  assert int(mac_state.count) == int(expected_mac.count) == STEPS
  assert int(mac_state.stat_count) == int(expected_mac.stat_count) == STEPS
  # Merged statistics: the EMA and the preconditioner's â are the whole
  # batches' (t_cov=1, so every step's merged statistic entered the EMA).
  _assert_close(mac_state.mean_input_ema, expected_mac.mean_input_ema,
                rtol=1e-5, atol=1e-6)
  _assert_close(mac_state.mean_input, expected_mac.mean_input,
                rtol=1e-5, atol=1e-6)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(expected_params), jax.tree.leaves(problem[0])))
  assert moved > 1e-2


def test_microbatch_with_stats_accumulator_equals_whole_batch(problem):
  params, _, _, data, grad_fn, _ = problem
  mean = optax.microbatching.AccumulationType.MEAN

  @jax.jit
  def compare(params, x, y):
    exact = optax.microbatching.microbatch(
        grad_fn, argnums=(1, 2), microbatch_size=MICRO,
        accumulator=((mean, mac_optax.stats_accumulator()), mean))
    # What the plain MEAN accumulator does with the same statistics.
    leafwise = optax.microbatching.microbatch(
        grad_fn, argnums=(1, 2), microbatch_size=MICRO, accumulator=mean)
    return grad_fn(params, x, y), exact(params, x, y), leafwise(params, x, y)

  x, y = data[0]
  (whole, exact, leafwise) = compare(params, x, y)
  (_, whole_stats), whole_grads = whole
  (_, exact_stats), exact_grads = exact
  _assert_close(exact_grads, whole_grads, rtol=1e-5, atol=1e-6)
  _assert_close(exact_stats, whole_stats, rtol=1e-5, atol=1e-6)
  (_, leafwise_stats), _ = leafwise
  # Plain means of equally many rows are fine leaf by leaf; the value
  # statistic, a product of means, is not.
  value = lambda stats: stats['attn']['value']['mean_input']
  fc1 = lambda stats: stats['fc1']['mean_input']
  np.testing.assert_allclose(fc1(leafwise_stats), fc1(whole_stats), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(value(leafwise_stats) - value(whole_stats)).max() > 1e-4


def _update_once(tx, problem):
  params, _, _, data, grad_fn, _ = problem
  x, y = data[0]
  (_, stats), grads = grad_fn(params, x[:MICRO], y[:MICRO])
  return tx.update(grads, tx.init(params), params, mac_stats=stats)


@pytest.mark.parametrize('wrap', [
    lambda layers: optax.MultiSteps(small_vit.optimizer(layers), K),
    lambda layers: optax.MultiSteps(
        small_vit.optimizer(layers), K).gradient_transformation(),
    lambda layers: optax.MultiSteps(optax.chain(
        optax.clip_by_global_norm(1.0),
        mac_optax.scale_by_mac(layers), optax.sgd(0.1)), K),
    lambda layers: optax.chain(
        optax.MultiSteps(mac_optax.scale_by_mac(layers), K), optax.sgd(0.1)),
], ids=['around-mac', 'gradient_transformation', 'around-chain',
        'inside-chain'])
def test_optax_multisteps_with_mac_raises(problem, wrap):
  layers = problem[1]
  with pytest.raises(ValueError, match=r'optax\.MultiSteps.*multi_steps'):
    _update_once(wrap(layers), problem)


def test_multi_steps_rejects_missing_or_mismatched_statistics(problem):
  params, layers, apply_with_stats, data, grad_fn, example_stats = problem
  tx = mac_optax.multi_steps(small_vit.optimizer(layers), K,
                             example_stats=example_stats)
  x, y = data[0]
  (_, stats), grads = grad_fn(params, x[:MICRO], y[:MICRO])
  with pytest.raises(ValueError, match='mac_stats=stats'):
    tx.update(grads, tx.init(params), params)
  wrong = jax.tree.map(lambda a: a, stats)
  wrong['attn']['value']['position_input'] = jnp.zeros((7, 17))
  with pytest.raises(ValueError, match=r"\['attn'\]\['value'\]\['position_"
                     r"input'\] has shape \(7, 17\), example_stats has"):
    tx.update(grads, tx.init(params), params, mac_stats=wrong)
  no_rows = jax.tree.map(lambda a: a, stats)
  del no_rows['fc1']['rows']
  with pytest.raises(ValueError, match="layer fc1 has no 'rows'"):
    mac_optax.multi_steps(small_vit.optimizer(layers), K,
                          example_stats=no_rows)
  with pytest.raises(ValueError, match='every_k_schedule must be >= 1'):
    mac_optax.multi_steps(small_vit.optimizer(layers), 0,
                          example_stats=example_stats)
  del apply_with_stats


def test_multi_steps_accepts_a_schedule_and_keeps_dtypes(problem):
  params, layers, _, data, grad_fn, example_stats = problem
  schedule = jnp.ones_like  # k = 1 at every step count
  tx = mac_optax.multi_steps(small_vit.optimizer(layers), schedule,
                             example_stats=example_stats)
  plain = small_vit.optimizer(layers)
  x, y = data[0]
  (_, stats), grads = grad_fn(params, x[:MICRO], y[:MICRO])
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params,
                                          mac_stats=stats)
  expected, _ = jax.jit(plain.update)(grads, plain.init(params), params,
                                      mac_stats=stats)
  _assert_close(updates, expected, rtol=1e-6, atol=1e-7)
  assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(
      lambda a: a.dtype, state)
