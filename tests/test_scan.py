"""Scanned stacks need no edit: a scanned ViT against its unscanned twin.

The scanned encoders are written the way large-scale code writes them:
big_vision's ``nn.scan(nn.remat(block, policy=...), variable_axes={'params':
0})`` and MaxText's scan that also lists ``'intermediates'``. Their stacked
statistics and several MAC steps must equal those of the same network with
one module per layer (itself checked against the numpy oracles elsewhere).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax

DEPTH, WIDTH = 3, 8


class EncoderBlock(nn.Module):
  """Pre-norm block with MHA and an MLP, returning (x, None) for nn.scan."""

  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = nn.LayerNorm(name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(
        y, deterministic=deterministic)
    x = x + y
    y = nn.Dense(2 * WIDTH, name='fc1')(nn.LayerNorm(name='ln2')(x))
    x = x + nn.Dense(WIDTH, name='fc2')(nn.gelu(y))
    return x, None


class ViT(nn.Module):
  """Patch embedding, encoder stack (scanned or not), head."""

  scan: str = 'none'  # 'none', 'big_vision' or 'maxtext'

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(WIDTH, (2, 2), strides=2, name='embed')(images)
    x = x.reshape(x.shape[0], -1, WIDTH)
    if self.scan == 'none':
      for i in range(DEPTH):
        x, _ = EncoderBlock(name=f'block_{i}')(x)
    else:
      block = nn.remat(EncoderBlock, prevent_cse=False, static_argnums=(2,),
                       policy=jax.checkpoint_policies.nothing_saveable)
      axes = {'params': 0}
      if self.scan == 'maxtext':
        axes['intermediates'] = 0
      x, _ = nn.scan(block, variable_axes=axes,
                     split_rngs={'params': True, 'dropout': True},
                     in_axes=nn.broadcast, length=DEPTH)(name='blocks')(
                         x, True)
    return nn.Dense(4, name='head')(x.mean(axis=1))


def _unstack(params):
  """Scanned params -> the unscanned twin's params."""
  params = dict(params)
  blocks = params.pop('blocks')
  for i in range(DEPTH):
    params[f'block_{i}'] = jax.tree.map(lambda a, i=i: a[i], blocks)
  return params


def _batches(steps):
  keys = jax.random.split(jax.random.key(3), steps)
  return [(jax.random.normal(k, (4, 6, 6, 1)) + 0.2,
           jax.random.randint(jax.random.fold_in(k, 1), (4,), 0, 4))
          for k in keys]


def _train(model, params, layers, batches):
  tx = mac_optax.mac(0.05, layers=layers, t_cov=1, t_inv=2, damping=0.5)
  apply_with_stats = mac_optax.capture(model.apply)

  def loss_fn(params, x, y):
    logits, stats = apply_with_stats({'params': params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, stats

  @jax.jit
  def step(params, opt_state, x, y):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, stats

  opt_state = tx.init(params)
  all_stats = []
  for x, y in batches:
    params, opt_state, stats = step(params, opt_state, x, y)
    all_stats.append(stats)
  return params, all_stats


@pytest.mark.parametrize('scan', ['big_vision', 'maxtext'])
def test_scanned_vit_trains_like_its_unscanned_twin(scan):
  batches = _batches(3)
  scanned, twin = ViT(scan=scan), ViT()
  x0 = batches[0][0]
  params = scanned.init(jax.random.key(0), x0)['params']
  layers = mac_optax.find_layers(scanned.apply, {'params': params}, x0)
  twin_layers = mac_optax.find_layers(twin.apply,
                                      {'params': _unstack(params)}, x0)
  assert layers[('blocks', 'attn', 'value')].stack_shape == (DEPTH,)
  assert layers[('blocks', 'attn', 'value')].kind == 'attention_value'
  assert len(twin_layers) == 2 + DEPTH * (len(layers) - 2)
  trained, stats = _train(scanned, params, layers, batches)
  twin_trained, twin_stats = _train(twin, _unstack(params), twin_layers,
                                    batches)
  for step_stats, step_twin in zip(stats, twin_stats):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        _unstack(step_stats), step_twin)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       trained, params)
  assert min(jax.tree.leaves(moved)) > 1e-5
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      _unstack(trained), twin_trained)


def test_scan_leaves_the_returned_collections_as_apply_returns_them():
  model = ViT(scan='maxtext')
  x = _batches(1)[0][0]
  variables = model.init(jax.random.key(0), x)
  apply_with_stats = mac_optax.capture(model.apply)
  (_, state), stats = apply_with_stats(variables, x,
                                       mutable=['intermediates'])
  assert state == {}
  (_, state), _ = mac_optax.capture(ViT(scan='big_vision').apply)(
      variables, x, mutable=['params'])
  jax.tree.map(np.testing.assert_array_equal, state['params'],
               variables['params'])
  assert set(stats['blocks']) == {'attn', 'fc1', 'fc2'}


class _SharedLoop(nn.Module):
  """One Dense applied DEPTH times: weights shared across scan iterations."""

  @nn.compact
  def __call__(self, x):
    body = lambda module, x, _: (jnp.tanh(module(x)), None)
    loop = nn.scan(body, variable_broadcast='params',
                   split_rngs={'params': False}, length=DEPTH)
    return loop(nn.Dense(WIDTH, name='shared'), x, None)[0]


def test_weight_shared_scan_is_a_clear_error():
  model = _SharedLoop()
  x = jnp.ones((2, WIDTH))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='shared.*broadcasts its params'):
    mac_optax.capture(model.apply)(variables, x)
