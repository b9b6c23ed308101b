"""Capture where the user cannot wrap apply: recording() and with_stats.

A big_vision-style training step and an AlgoPerf-style submission, whose
``model.apply`` sits inside code the user does not own, must record exactly
the statistics ``capture(model.apply)`` gives, and leave what ``apply``
returns unchanged.
"""

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax


class CNN(nn.Module):
  """Conv + BatchNorm + dropout + head, like an AlgoPerf or big_vision model."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (3, 3), name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


def _batch():
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2)) + 0.3
  return x, jnp.array([0, 1, 2, 1])


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                       atol=1e-7), a, b)


class Workload:
  """AlgoPerf-style workload: its model_fn is not the user's code."""

  def __init__(self):
    self._model = CNN()

  def init_model_fn(self, rng, x):
    variables = self._model.init(rng, x)
    return variables['params'], {'batch_stats': variables['batch_stats']}

  def model_fn(self, params, batch, model_state, mode, rng,
               update_batch_norm):
    train = mode == 'train'
    variables = {'params': params, **model_state}
    if update_batch_norm:
      logits, new_state = self._model.apply(
          variables, batch['inputs'], train=train, rngs={'dropout': rng},
          mutable=['batch_stats'])
      return logits, new_state
    return self._model.apply(variables, batch['inputs'], train=train,
                             rngs={'dropout': rng}), model_state

  def loss_fn(self, labels, logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()


def test_algoperf_style_update_params_records_the_workload_model():
  workload = Workload()
  x, y = _batch()
  batch = {'inputs': x, 'targets': y}
  params, model_state = workload.init_model_fn(jax.random.key(1), x)
  rng = jax.random.key(3)

  # Layer discovery through the same code path: the workload's model_fn.
  @mac_optax.with_stats
  def forward(params):
    return workload.model_fn(params, batch, model_state, 'train', rng,
                             update_batch_norm=True)[0]

  layers = mac_optax.find_layers(forward, params, params=params)
  assert set(layers) == {('conv',), ('head',)}
  assert layers[('conv',)].kernel_shape == params['conv']['kernel'].shape
  tx = mac_optax.mac(0.1, layers=layers)

  # The submission's own code: the loss function is the user's.
  def loss_fn(params):
    with mac_optax.recording() as record:
      logits, new_state = workload.model_fn(
          params, batch, model_state, 'train', rng, update_batch_norm=True)
      loss = workload.loss_fn(batch['targets'], logits)
    return loss, (new_state, record.stats)

  @jax.jit
  def update_params(params, opt_state):
    (loss, (new_state, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, new_state, stats

  new_params, _, new_state, stats = update_params(params, tx.init(params))
  # The same step with capture() around the model's apply.
  apply_with_stats = mac_optax.capture(workload._model.apply)  # pylint: disable=protected-access
  (logits, expected_state), expected_stats = apply_with_stats(
      {'params': params, **model_state}, x, train=True,
      rngs={'dropout': rng}, mutable=['batch_stats'])
  _assert_close(stats, expected_stats)
  _assert_close(new_state, expected_state)
  assert set(_flat(stats)) == {('conv',), ('head',)}
  # And the plain workload is untouched outside the block.
  _, plain_state = workload.model_fn(params, batch, model_state, 'train', rng,
                                     update_batch_norm=True)
  _assert_close(plain_state, expected_state)
  del logits, new_params


def _flat(stats):
  return mac_optax._stats.mean_inputs(stats)  # pylint: disable=protected-access


def test_big_vision_style_loss_fn():
  model = CNN()
  x, y = _batch()
  params = model.init(jax.random.key(1), x)
  batch_stats = params['batch_stats']
  params = params['params']

  def forward(params, images, rng):  # big_vision's train.py owns this
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats},
                            images, train=True, rngs={'dropout': rng},
                            mutable=['batch_stats'])
    return logits

  def loss_fn(params, images, labels, rng):
    with mac_optax.recording() as record:
      logits = forward(params, images, rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()
    return loss, record.stats

  rng = jax.random.key(4)
  (loss, stats), _ = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, x, y, rng)
  (_, _), expected = mac_optax.capture(model.apply)(
      {'params': params, 'batch_stats': batch_stats}, x, train=True,
      rngs={'dropout': rng}, mutable=['batch_stats'])
  _assert_close(stats, expected)
  assert np.isfinite(loss)


def test_two_applies_of_one_model_merge_like_one_call():
  model = nn.Dense(3)
  a = jax.random.normal(jax.random.key(5), (2, 4))
  b = jax.random.normal(jax.random.key(6), (6, 4)) + 2.0
  variables = model.init(jax.random.key(0), a)
  with mac_optax.recording() as record:
    model.apply(variables, a)
    model.apply(variables, b)
  _, expected = mac_optax.capture(model.apply)(
      variables, jnp.concatenate([a, b]))
  _assert_close(record.stats, expected)


def test_with_stats_decorates_linen_and_nnx_loss_functions():
  linen_model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(7), (5, 4))
  variables = linen_model.init(jax.random.key(0), x)

  @functools.partial(mac_optax.with_stats, has_aux=True)
  def linen_loss(params):
    out = linen_model.apply({'params': params}, x)
    return jnp.mean(out ** 2), out.shape

  (loss, (aux, stats)), _ = jax.value_and_grad(linen_loss, has_aux=True)(
      variables['params'])
  _, expected = mac_optax.capture(linen_model.apply)(variables, x)
  _assert_close(stats, expected)
  assert aux == (5, 3) and np.isfinite(loss)

  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

  @mac_optax.with_stats
  def nnx_loss(model, x):
    return jnp.mean(model(x) ** 2)

  (_, stats), _ = nnx.jit(nnx.value_and_grad(nnx_loss, has_aux=True))(
      model, x)
  _, expected = nnx.jit(lambda m, x: mac_optax.capture(m)(x))(model, x)
  _assert_close(stats, expected)
  found = mac_optax.find_layers(nnx_loss, model, x)
  assert dict(found) == dict(mac_optax.find_layers(model, x))


def test_calls_that_cannot_be_recorded_raise():
  model = nn.Dense(3)
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.key(0), x)
  bound = model.bind(variables)
  with pytest.raises(ValueError, match='outside Module.apply'):
    with mac_optax.recording():
      bound(x)
  nnx_model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='with_stats'):
    with mac_optax.recording():
      nnx_model(x)
  with pytest.raises(ValueError, match='no Module.apply was called'):
    with mac_optax.recording() as record:
      pass
    _ = record.stats
  # Nothing stays patched afterwards.
  assert nn.Module.apply is mac_optax._capture.module_apply.ORIGINAL_APPLY  # pylint: disable=protected-access
  np.testing.assert_array_equal(nnx_model(x), nnx_model(x))
