"""An imagenet-style ResNet trained with MAC under pmap, for test_clients.py.

The test starts this file in a subprocess whose environment forces two CPU
devices (the flag must be set before jax starts):

  python clients_worker.py OUT.npz

It trains the ResNet for a few steps the way flax's imagenet example does
(``jax.pmap(train_step, axis_name='batch')``, ``BatchNorm(axis_name='batch')``,
``lax.pmean`` of the gradients, a ``TrainState`` subclass with
``batch_stats``), and again on one device with the concatenated batches, and
writes both to OUT.npz as ``'pmap:<leaf>'`` / ``'single:<leaf>'`` arrays, the
initial parameters as ``'initial:<leaf>'`` and ``'counts'`` (preconditioned
kernels, kernels). Importing this module has no side effects.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from flax import jax_utils
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mac_optax

STEPS = 3
BATCH = 8
CLASSES = 4
WEIGHT_DECAY = 1e-4


class ResidualBlock(nn.Module):
  """conv-norm-relu-conv-norm with a projection shortcut, as ResNet's."""

  filters: int
  strides: int
  norm: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    y = conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if x.shape != y.shape:
      x = conv(self.filters, (1, 1), (self.strides, self.strides),
               name='projection')(x)
      x = self.norm(name='projection_norm')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A two-stage ResNet whose norms average over ``axis_name`` in training."""

  axis_name: str | None = 'batch'

  @nn.compact
  def __call__(self, x, train=True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5,
                             axis_name=self.axis_name)
    x = nn.Conv(8, (3, 3), use_bias=False, name='stem')(x)
    x = nn.relu(norm(name='stem_norm')(x))
    x = ResidualBlock(8, 1, norm)(x)
    x = ResidualBlock(16, 2, norm)(x)
    return nn.Dense(CLASSES, name='head')(x.mean(axis=(1, 2)))


class TrainState(mac_optax.TrainStateMixin, train_state.TrainState):
  """imagenet's own TrainState subclass, with MAC's mixin added."""

  batch_stats: Any = None


def batches():
  rng = np.random.default_rng(0)
  return [(rng.normal(size=(BATCH, 8, 8, 3)).astype(np.float32) + 0.3,
           rng.integers(0, CLASSES, size=(BATCH,)))
          for _ in range(STEPS)]


def create_state(model, variables, layers, axis_name):
  tx = mac_optax.mac(0.3, layers=layers, momentum=0.9, weight_decay=0.0,
                     damping=1.0, t_cov=1, t_inv=2, axis_name=axis_name)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=tx, batch_stats=variables['batch_stats'])


def train_step(state, images, labels, axis_name=None):
  """imagenet's train step; with ``axis_name`` the gradients are averaged
  over devices (MAC merges the statistics itself, given the same axis)."""
  apply_with_stats = mac_optax.capture(state.apply_fn)

  def loss_fn(params):
    (logits, new_model_state), stats = apply_with_stats(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()
    weight_l2 = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params)
                    if p.ndim > 1)
    return loss + 0.5 * WEIGHT_DECAY * weight_l2, (new_model_state, stats)

  (_, (new_model_state, stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name=axis_name)
  return state.apply_gradients(grads=grads, mac_stats=stats,
                               batch_stats=new_model_state['batch_stats'])


def _flat(tree, prefix):
  return {
      prefix + '/'.join(str(getattr(k, 'key', getattr(k, 'name', k)))
                        for k in path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _results(state, prefix):
  results = _flat(state.params, f'{prefix}:params/')
  results.update(_flat(state.batch_stats, f'{prefix}:batch_stats/'))
  results.update(_flat(state.opt_state[0].mean_input, f'{prefix}:mac/'))
  return results


def main(argv):
  if len(argv) != 2 or jax.local_device_count() != 2:
    raise SystemExit(__doc__)
  data = batches()
  model = ResNet()
  # imagenet initialises in inference mode, where BatchNorm needs no axis.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  # The training call, outside pmap: BatchNorm's axis is not bound here.
  layers = mac_optax.find_layers(model.apply, variables, data[0][0],
                                 train=True, mutable=['batch_stats'])
  kernels = [p for p, _ in jax.tree_util.tree_leaves_with_path(
      variables['params']) if p[-1].key == 'kernel']
  results = {'counts': np.asarray([len(layers), len(kernels)])}
  results.update(_flat(variables['params'], 'initial:params/'))

  state = jax_utils.replicate(create_state(model, variables, layers, 'batch'))
  p_train_step = jax.pmap(functools.partial(train_step, axis_name='batch'),
                          axis_name='batch')
  for images, labels in data:
    shard = lambda a: a.reshape((2, -1) + a.shape[1:])
    state = p_train_step(state, shard(images), shard(labels))
  results.update(_results(state, 'pmap'))

  single_model = ResNet(axis_name=None)
  state = create_state(single_model, variables, layers, None)
  step = jax.jit(train_step)
  for images, labels in data:
    state = step(state, images, labels)
  results.update(_results(state, 'single'))
  np.savez(argv[1], **results)


if __name__ == '__main__':
  main(sys.argv)
