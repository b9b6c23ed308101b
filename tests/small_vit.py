"""A small ViT and its MAC training step, shared by several test modules.

Also imported by the multi-device and multi-process workers that the
distributed tests start in subprocesses, so it must not touch jax devices at
import time.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mac_optax

HYPER = dict(momentum=0.9, weight_decay=1e-2, damping=0.5, stat_decay=0.9,
             t_cov=1, t_inv=2)
LEARNING_RATE = 0.1
IMAGE_SHAPE = (8, 8, 1)
CLASSES = 10


class SmallViT(nn.Module):
  """Patch embedding, cls token, one pre-norm transformer block, head."""

  width: int = 16
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.width, (4, 4), strides=4, padding='VALID', name='embed',
                **kw)(x)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, self.width),
                     self.param_dtype)
    # zeros_like keeps x's batch sharding, which explicit mesh axes require.
    x = jnp.concatenate([jnp.zeros_like(x[:, :1]) + cls.astype(x.dtype), x],
                        axis=1)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (1, x.shape[1], self.width), self.param_dtype)
    x = x + pos.astype(x.dtype)
    y = nn.LayerNorm(name='ln1', **kw)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn', **kw)(y)
    y = nn.LayerNorm(name='ln2', **kw)(x)
    hidden = nn.gelu(nn.Dense(2 * self.width, name='fc1', **kw)(y))
    x = x + nn.Dense(self.width, name='fc2', **kw)(hidden)
    return nn.Dense(CLASSES, name='head', **kw)(x[:, 0])


def batches(count: int, batch_size: int, seed: int = 0):
  """``count`` (images, labels) numpy batches, images offset from zero."""
  rng = np.random.default_rng(seed)
  return [
      (rng.normal(size=(batch_size,) + IMAGE_SHAPE).astype(np.float32) + 0.3,
       rng.integers(0, CLASSES, size=(batch_size,)).astype(np.int32))
      for _ in range(count)
  ]


def init_params(model, x, seed: int):
  """Random parameters drawn with numpy (no XLA compilation, unlike init)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [jax.tree_util.keystr((k,), simple=True) for k in path]
    name, shape = names[-1], leaf.shape
    if name == 'kernel':
      # Attention q/k/v kernels are (D, heads, head_dim): fan-in D.
      qkv = len(shape) == 3 and names[-2] != 'out'
      fan_in = shape[0] if qkv else int(np.prod(shape[:-1]))
      value = rng.normal(size=shape) / np.sqrt(fan_in)
    elif name == 'scale':
      value = 1.0 + 0.1 * rng.normal(size=shape)
    elif name == 'bias':
      value = 0.1 * rng.normal(size=shape)
    else:
      value = 0.02 * rng.normal(size=shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def build(batch_size: int = 16, seed: int = 1, **model_kwargs):
  """Model, params, layers and the capture wrapper, for one batch shape."""
  model = SmallViT(**model_kwargs)
  x = jnp.zeros((batch_size,) + IMAGE_SHAPE, model.dtype)
  params = init_params(model, x, seed)
  layers = mac_optax.find_layers(model.apply, {'params': params}, x)
  return model, params, layers, mac_optax.capture(model.apply)


def optimizer(layers, **overrides) -> optax.GradientTransformationExtraArgs:
  kwargs = dict(HYPER, **overrides)
  learning_rate = kwargs.pop('learning_rate', LEARNING_RATE)
  return mac_optax.mac(learning_rate, layers=layers, **kwargs)


def loss_fn(apply_with_stats):
  def loss(params, x, y):
    logits, stats = apply_with_stats({'params': params}, x)
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (
        stats)

  return loss


def train_step(tx, apply_with_stats, pmean_axis=None, shards=1):
  """One MAC step on this device's batch.

  Under ``pmap`` the per-device gradients are averaged over ``pmean_axis``.
  Under ``shard_map`` (which sums the gradients of replicated parameters
  over the devices by itself) they are divided by the number of ``shards``.
  """
  grad_fn = jax.value_and_grad(loss_fn(apply_with_stats), has_aux=True)

  def step(params, opt_state, x, y):
    (loss, stats), grads = grad_fn(params, x, y)
    if pmean_axis is not None:
      grads = jax.lax.pmean(grads, pmean_axis)
    if shards > 1:
      grads = jax.tree.map(lambda g: g / shards, grads)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(tx, apply_with_stats, params, data, opt_state=None):
  """Runs jitted steps on ``data`` on the default device."""
  step = jax.jit(train_step(tx, apply_with_stats))
  opt_state = tx.init(params) if opt_state is None else opt_state
  for x, y in data:
    params, opt_state, _ = step(params, opt_state, x, y)
  return params, opt_state


def flat(tree) -> dict[str, np.ndarray]:
  """'a/b/c' -> numpy leaf, for comparisons and npz files."""
  return {
      jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def max_difference(a, b) -> float:
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys(), (sorted(a), sorted(b))
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64)
                                  - np.asarray(b[k], np.float64))))
             for k in a)
