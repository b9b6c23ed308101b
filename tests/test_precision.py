"""Mixed precision: fp32 statistics and preconditioner maths, param-dtype updates.

Oracles are float64 numpy: explicit d x d preconditioners applied to the same
low-precision gradients, and means of the same low-precision activations.
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

DAMPING = 0.5


def _dense_preconditioned(kernel, bias, mean, damping, spec):
  """P Ĝ with P = I - â âᵀ / (λ + ‖â‖²) as a d x d float64 matrix (one block,
  Flax layout: input rows, the bias gradient as the last row)."""
  kernel = np.asarray(kernel, np.float64)
  d_in = int(np.prod(spec.in_shape))
  rows = [kernel.reshape(d_in, -1)]
  if bias is not None:
    rows.append(np.asarray(bias, np.float64).reshape(1, -1))
  grad = np.concatenate(rows)
  result = oracles.preconditioner_matrix(mean, damping) @ grad
  new_bias = None if bias is None else result[-1].reshape(np.shape(bias))
  return result[:d_in].reshape(kernel.shape), new_bias


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.fixture(scope='module')
def bf16_vit():
  _, params, layers, apply_with_stats = small_vit.build(
      batch_size=8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  data = small_vit.batches(3, 8, seed=11)
  data = [(x.astype(jnp.bfloat16), y) for x, y in data]
  return params, layers, apply_with_stats, data


def test_bf16_vit_statistics_fp32_and_updates_bf16(bf16_vit):
  params, layers, apply_with_stats, data = bf16_vit
  grad_fn = jax.jit(jax.value_and_grad(small_vit.loss_fn(apply_with_stats),
                                       has_aux=True))
  (_, stats), grads = grad_fn(params, *data[0])
  for leaf in jax.tree.leaves(stats):
    assert leaf.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  tx = mac_optax.scale_by_mac(layers, damping=DAMPING)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      mac_stats=stats)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  for leaf in jax.tree.leaves(state.mean_input_ema):
    assert leaf.dtype == jnp.float32
  for path in layers:
    grad, update = _get(grads, path), _get(updates, path)
    mean = np.asarray(_get(stats, path)['mean_input'], np.float64)
    kernel, bias = _dense_preconditioned(grad['kernel'], grad.get('bias'),
                                         mean, DAMPING, layers[path])
    # The only bf16 rounding is the final cast: within one bf16 ulp.
    np.testing.assert_allclose(
        np.asarray(update['kernel'], np.float64),
        np.asarray(jnp.asarray(kernel, jnp.bfloat16), np.float64),
        rtol=2 ** -7, atol=1e-30, err_msg=str(path))
    np.testing.assert_allclose(
        np.asarray(update['bias'], np.float64),
        np.asarray(jnp.asarray(bias, jnp.bfloat16), np.float64),
        rtol=2 ** -7, atol=1e-30, err_msg=str(path))


def test_bf16_training_keeps_dtypes_and_stays_finite(bf16_vit):
  params, layers, apply_with_stats, data = bf16_vit
  example_stats = jax.eval_shape(apply_with_stats, {'params': params},
                                 data[0][0])[1]
  tx = mac_optax.multi_steps(small_vit.optimizer(layers), 1,
                             example_stats=example_stats)
  state = tx.init(params)
  new_params, new_state = small_vit.train(tx, apply_with_stats, params, data,
                                          state)
  assert jax.tree.map(lambda a: a.dtype, new_params) == jax.tree.map(
      lambda a: a.dtype, params)
  assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(
      lambda a: a.dtype, state)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.acc_grads))
  for leaf in jax.tree.leaves(new_params):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(new_params), jax.tree.leaves(params)))


class _Fp16Model(nn.Module):

  @nn.compact
  def __call__(self, image, tokens):
    kw = dict(dtype=jnp.float16, param_dtype=jnp.float16)
    a = nn.Conv(4, (3, 3), name='conv', **kw)(image)
    b = nn.Dense(8, name='dense', **kw)(tokens)
    return a.astype(jnp.float32).sum() + b.astype(jnp.float32).sum()


def test_fp16_activations_beyond_fp16_range_do_not_overflow():
  rng = np.random.default_rng(0)
  image = (200.0 + rng.normal(size=(4, 16, 16, 8))).astype(np.float16)
  tokens = (200.0 + rng.normal(size=(8, 64, 64))).astype(np.float16)
  # In fp16 arithmetic the row sums and ‖ā‖² overflow: the test is real.
  with np.errstate(over='ignore'):
    assert np.isinf(tokens.sum(axis=(0, 1), dtype=np.float16)).all()
    assert np.isinf(np.sum(np.float16(200.0) ** 2 * np.ones(64, np.float16),
                           dtype=np.float16))
  model = _Fp16Model()
  params = jax.jit(model.init)(jax.random.key(0), image, tokens)['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, image,
                                 tokens)
  apply_with_stats = mac_optax.capture(model.apply)
  _, stats = jax.jit(apply_with_stats)({'params': params}, image, tokens)
  dense_mean = oracles.dense_mean(np.asarray(tokens, np.float64), 1, True)
  np.testing.assert_allclose(stats['dense']['mean_input'], dense_mean,
                             rtol=1e-6)
  patches = oracles.im2col(np.asarray(image, np.float64), (3, 3))
  conv_mean = oracles.torch_order_to_flax(
      oracles.conv_mean(patches, 1, True), (3, 3), 8, True)
  np.testing.assert_allclose(stats['conv']['mean_input'], conv_mean[0],
                             rtol=1e-6)
  assert float(np.sum(dense_mean ** 2)) > 1e6  # ‖â‖² far beyond fp16's 65504
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float16), params)
  tx = mac_optax.scale_by_mac(layers, damping=DAMPING)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params,
                                          mac_stats=stats)
  assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(
      lambda a: a.dtype, state)
  for path in layers:
    grad, update = _get(grads, path), _get(updates, path)
    mean = np.asarray(_get(stats, path)['mean_input'], np.float64)
    kernel, bias = _dense_preconditioned(grad['kernel'], grad['bias'], mean,
                                         DAMPING, layers[path])
    assert update['kernel'].dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(update['kernel'], np.float32)))
    np.testing.assert_allclose(np.asarray(update['kernel'], np.float64),
                               kernel, rtol=2e-3, atol=2e-3, err_msg=str(path))
    np.testing.assert_allclose(np.asarray(update['bias'], np.float64),
                               bias, rtol=2e-3, atol=2e-3, err_msg=str(path))


def test_inject_hyperparams_needs_fp32_hyperparameters_for_bf16_params(
    bf16_vit):
  params, layers, apply_with_stats, data = bf16_vit
  # Why: bf16 rounds a stat_decay of 0.999 to 1.0, which stops the EMA and
  # divides by 1 - 1**k = 0 at the refresh.
  assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0
  injected = optax.inject_hyperparams(mac_optax.mac)
  with pytest.raises(ValueError, match=r'(damping|stat_decay) is a bfloat16'
                     r' value.*hyperparam_dtype=jnp.float32'):
    injected(learning_rate=0.1, layers=layers, stat_decay=0.999).init(params)
  tx = optax.inject_hyperparams(mac_optax.mac, hyperparam_dtype=jnp.float32)(
      learning_rate=0.1, layers=layers, damping=DAMPING, stat_decay=0.999)
  plain = mac_optax.mac(0.1, layers=layers, damping=DAMPING, stat_decay=0.999)
  grad_fn = jax.jit(jax.value_and_grad(small_vit.loss_fn(apply_with_stats),
                                       has_aux=True))
  (_, stats), grads = grad_fn(params, *data[0])
  _, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                mac_stats=stats)
  _, plain_state = jax.jit(plain.update)(grads, plain.init(params), params,
                                         mac_stats=stats)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state[0],
               plain_state[0])
  assert float(state.hyperparams['stat_decay']) == pytest.approx(0.999)
