"""Several full mac(...) steps against a numpy re-implementation of the reference.

The oracle gets the raw layer inputs from a plain recording interceptor and
then does the reference's work in float64 numpy: whole-batch im2col means in
PyTorch order, attention recomputed from the query/key projections, the EMA and
bias-correction timeline, dense d x d preconditioners per layer (Q/K with the
plain mean, V with the attention-weighted one), heavy-ball momentum and
decoupled weight decay. Only the gradients come from JAX.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import oracles

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, damping=0.5,
             stat_decay=0.9, t_cov=2, t_inv=3)
STEPS = 7


class TinyViT(nn.Module):
  """Patch embedding, cls token, one pre-norm transformer block, head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (4, 4), strides=4, padding='VALID', name='embed')(x)
    x = x.reshape(x.shape[0], -1, 16)
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, 16))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, 16)), x], 1)
    x = x + self.param('pos', nn.initializers.normal(0.02), (1, 5, 16))
    y = nn.LayerNorm(name='ln1')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(y)
    y = nn.LayerNorm(name='ln2')(x)
    x = x + nn.Dense(16, name='fc2')(nn.gelu(nn.Dense(32, name='fc1')(y)))
    return nn.Dense(10, name='head')(x[:, 0])


VIT_LAYERS = {
    ('embed',): ('conv', 1),
    ('attn', 'query'): ('dense', 1),
    ('attn', 'key'): ('dense', 1),
    ('attn', 'value'): ('value', 1),
    ('attn', 'out'): ('dense', 2),
    ('fc1',): ('dense', 1),
    ('fc2',): ('dense', 1),
    ('head',): ('dense', 1),
}


class TinyCNN(nn.Module):
  """Conv + BatchNorm, depthwise, strided grouped conv without bias, head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), name='conv1')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False, name='bn')(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name='dw')(x))
    x = nn.Conv(12, (3, 3), strides=2, feature_group_count=2, use_bias=False,
                name='grouped')(x)
    return nn.Dense(10, name='head')(nn.relu(x).mean((1, 2)))


CNN_LAYERS = {
    ('conv1',): ('conv', 1),
    ('dw',): ('conv', 1),
    ('grouped',): ('conv', 1),
    ('head',): ('dense', 1),
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _oracle_stat(modules, kind, n_axes, raw, params, path):
  """The reference statistic of one layer, (blocks, d) in PyTorch order."""
  node = _get(raw, path)
  inputs = node['inputs'][0]
  has_bias = 'bias' in _get(params, path)
  if kind == 'dense':
    return oracles.dense_mean(inputs, n_axes, has_bias)[None]
  if kind == 'value':
    attention = _get(raw, path[:-1])
    probs = oracles.attention_probs(attention['query']['outputs'][0],
                                    attention['key']['outputs'][0])
    return oracles.attention_value_mean(probs, inputs, has_bias)[None]
  conv = modules[path]
  rank = len(conv.kernel_size)
  strides = conv.strides if isinstance(conv.strides, tuple) else (
      (conv.strides,) * rank)
  patches = oracles.im2col(inputs, conv.kernel_size, strides, conv.padding)
  return oracles.conv_mean(patches, conv.feature_group_count, has_bias)


def _no_decay(path, leaf):
  return path[-1] == 'bias' or np.ndim(leaf) <= 1 or path[-1] in ('cls', 'pos')


def _reference_run(model, modules, layer_kinds, variables, batches):
  ref = oracles.ReferenceMAC(**HYPER)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64),
                        variables['params'])
  others = {k: v for k, v in variables.items() if k != 'params'}
  mutable = list(others) or False

  def loss_fn(p, x, y):
    logits = model.apply({'params': p, **others}, x, mutable=mutable)
    logits = logits[0] if mutable else logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = jax.jit(jax.grad(loss_fn))
  for x, y in batches:
    p32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64),
                         grad_fn(p32, x, y))
    _, state, raw = oracles.apply_recording(
        model, {'params': p32, **others}, x, mutable=mutable)
    for path, (kind, n_axes) in layer_kinds.items():
      ref.capture(path, _oracle_stat(modules, kind, n_axes, raw, params, path))
    ref.refresh()
    for path, (kind, n_axes) in layer_kinds.items():
      node = _get(grads, path)
      node['kernel'], bias = oracles.precondition_layer(
          node['kernel'], node.get('bias'), ref.mean[path], HYPER['damping'],
          'conv' if kind == 'conv' else 'dense', n_axes)
      if bias is not None:
        node['bias'] = bias
    params = jax.tree_util.tree_map_with_path(
        lambda keys, p, g: ref.momentum_step(
            keys, p, g, decay=not _no_decay([k.key for k in keys], p)),
        params, grads)
    others = {k: v for k, v in state.items() if k in others}
    ref.finish()
  return params


def _library_run(model, variables, batches):
  x0 = batches[0][0]
  others = {k: v for k, v in variables.items() if k != 'params'}
  mutable = list(others) or False
  layers = mac_optax.find_layers(model.apply, variables, x0, mutable=mutable)
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda keys, p: not _no_decay([k.key for k in keys], p),
      variables['params'])
  tx = mac_optax.mac(
      HYPER['lr'], layers=layers, momentum=HYPER['momentum'],
      weight_decay=HYPER['weight_decay'], damping=HYPER['damping'],
      stat_decay=HYPER['stat_decay'], t_cov=HYPER['t_cov'],
      t_inv=HYPER['t_inv'], weight_decay_mask=decay_mask)
  apply_with_stats = mac_optax.capture(model.apply)

  def loss_fn(params, others, x, y):
    result, stats = apply_with_stats({'params': params, **others}, x,
                                     mutable=mutable)
    logits, state = result if mutable else (result, others)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (stats, state)

  @jax.jit
  def step(params, others, opt_state, x, y):
    (_, (stats, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, others, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), dict(state), opt_state

  params = variables['params']
  opt_state = tx.init(params)
  for x, y in batches:
    params, others, opt_state = step(params, others, opt_state, x, y)
  return params, layers


@pytest.mark.parametrize('name', ['vit', 'cnn'])
def test_mac_steps_match_numpy_reference(name):
  if name == 'vit':
    model, layer_kinds, shape = TinyViT(), VIT_LAYERS, (6, 8, 8, 1)
  else:
    model, layer_kinds, shape = TinyCNN(), CNN_LAYERS, (6, 8, 8, 3)
  keys = jax.random.split(jax.random.key(0), STEPS)
  batches = [
      (jax.random.normal(k, shape) + 0.3,
       jax.random.randint(jax.random.fold_in(k, 1), (shape[0],), 0, 10))
      for k in keys
  ]
  variables = model.init(jax.random.key(1), batches[0][0])
  params, layers = _library_run(model, variables, batches)
  assert set(layers) == set(layer_kinds)
  modules = _bound_modules(model, variables, batches[0][0])
  expected = _reference_run(model, modules, layer_kinds, variables, batches)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), expected,
                       jax.tree.map(np.asarray, variables['params']))
  assert min(jax.tree.leaves(moved)) > 1e-4  # every parameter trained
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
      jax.tree.map(np.asarray, params), expected)


def _bound_modules(model, variables, x):
  """Module path -> linen module (for the oracle's conv geometry)."""
  modules = {}

  def interceptor(next_fun, args, kwargs, context):
    modules.setdefault(tuple(context.module.path), context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, mutable=True)
  return modules
