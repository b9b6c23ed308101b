"""Long MAC run on a small ViT: no NaN, bounded state, loss close to AdamW's.

    python -m benchmarks.long_run [--steps 3000] [--fashion-mnist DIR]
                                  [--first-layer] [--dtype bfloat16]

Trains the same ViT from the same initialisation on the same batches with
MAC and with AdamW, then prints, for each, the training loss (mean of the
last 10% of steps), the test loss and accuracy, whether any loss or state was
not finite, and the largest magnitudes the optimizer state and parameters
reached (checked every --check-every steps). Data: Fashion-MNIST from the
four ``*-ubyte.gz`` files in DIR, or scikit-learn's 8x8 digits (offline).
Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import auto as tqdm

import mac_optax
from mac_optax.demo import data as data_lib
from mac_optax.demo import training


class Block(nn.Module):
  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                            dtype=self.dtype)(y)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(4 * width, dtype=self.dtype, name='fc1')(y)
    return x + nn.Dense(width, dtype=self.dtype, name='fc2')(nn.gelu(y))


class ViT(nn.Module):
  patch: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding='VALID', dtype=self.dtype, name='embed')(images)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype),
         x], axis=1)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = Block(self.heads, self.dtype, name=f'block{i}')(x)
    x = nn.LayerNorm(dtype=self.dtype)(x[:, 0])
    return nn.Dense(self.classes, dtype=self.dtype, name='head')(x)


def load(fashion_mnist_dir, seed):
  """((train images, labels), (test images, labels)), images NHWC in [0, 1]."""
  if fashion_mnist_dir:
    images, patch = data_lib.load_fashion_mnist(fashion_mnist_dir), 7
  else:
    images, patch = data_lib.load_digits(seed=seed), 2
  return ((images.x_train, images.y_train),
          (images.x_test, images.y_test)), patch


def batches(images, labels, batch_size, steps, seed):
  """Shuffled epochs of full batches, as many as ``steps`` needs."""
  rng = np.random.default_rng(seed)
  count = 0
  while True:
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      if count == steps:
        return
      index = order[start:start + batch_size]
      yield images[index], labels[index]
      count += 1


def _largest(tree) -> float:
  leaves = [jnp.max(jnp.abs(x.astype(jnp.float32)))
            for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating) and x.size]
  return float(jnp.max(jnp.stack(leaves))) if leaves else 0.0


def _finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
             for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def train(name, tx, model, params, data, args):
  (x_train, y_train), (x_test, y_test) = data
  apply_with_stats = mac_optax.capture(model.apply)

  def loss_fn(params, x, y):
    logits, stats = apply_with_stats({'params': params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y).mean()
    return loss, stats

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({'params': params}, x).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    return loss, jnp.sum(jnp.argmax(logits, -1) == y)

  opt_state = tx.init(params)
  losses, largest_state, largest_params, finite = [], 0.0, 0.0, True
  start = time.perf_counter()
  stream = batches(x_train, y_train, args.batch_size, args.steps, args.seed)
  for i, (x, y) in enumerate(tqdm.tqdm(stream, total=args.steps, desc=name)):
    params, opt_state, loss = step(params, opt_state, x.astype(args.dtype), y)
    losses.append(loss)
    if (i + 1) % args.check_every == 0 or i + 1 == args.steps:
      finite &= _finite(opt_state) and _finite(params)
      largest_state = max(largest_state, _largest(opt_state))
      largest_params = max(largest_params, _largest(params))
  losses = np.asarray(jax.device_get(losses), np.float64)
  seconds = time.perf_counter() - start
  test_loss, correct = 0.0, 0
  for begin in range(0, len(x_test), 1000):
    loss, right = evaluate(params, x_test[begin:begin + 1000].astype(
        args.dtype), y_test[begin:begin + 1000])
    test_loss += float(loss)
    correct += int(right)
  tail = max(1, len(losses) // 10)
  return dict(
      optimizer=name, steps=len(losses), seconds=seconds,
      train_loss=float(losses[-tail:].mean()),
      test_loss=test_loss / len(x_test), test_accuracy=correct / len(x_test),
      nan_loss=int(np.sum(~np.isfinite(losses))), finite_state=finite,
      largest_state=largest_state, largest_param=largest_params,
      mac_statistic=_largest(next(
          part.mean_input for part in opt_state
          if isinstance(part, mac_optax.ScaleByMacState)))
      if name.startswith('MAC') else float('nan'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--fashion-mnist', default=None,
                      help='directory with the Fashion-MNIST *-ubyte.gz files')
  parser.add_argument('--first-layer', action='store_true',
                      help="precondition the patch embedding with the"
                      " reference's exact (Σ + λI)⁻¹ factor")
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'],
                      help='dtype of the activations (parameters stay fp32)')
  parser.add_argument('--mac-lr', type=float, default=0.3)
  parser.add_argument('--adamw-lr', type=float, default=1e-3)
  parser.add_argument('--check-every', type=int, default=250)
  parser.add_argument('--skip-adamw', action='store_true')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  args.dtype = jnp.dtype(args.dtype)

  data, patch = load(args.fashion_mnist, args.seed)
  (x_train, _), _ = data
  model = ViT(patch=patch, dtype=args.dtype)
  example = jnp.asarray(x_train[:args.batch_size], args.dtype)
  params = jax.jit(model.init)(jax.random.key(args.seed), example)['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, example)
  decay_mask = training.decay_mask(params)
  warmup = max(1, args.steps // 20)

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, args.steps)

  second_moments = None
  if args.first_layer:
    second_moments = mac_optax.input_second_moments(
        model.apply, {'params': params},
        (x.astype(args.dtype) for x, _ in batches(*data[0], args.batch_size,
                                                   len(x_train) //
                                                   args.batch_size,
                                                   args.seed + 1)),
        layers=layers, num_batches=len(x_train) // args.batch_size)
  mac = mac_optax.mac(
      schedule(args.mac_lr), layers=layers, momentum=0.9, weight_decay=5e-4,
      damping=1.0, stat_decay=0.95, t_cov=5, t_inv=5,
      weight_decay_mask=decay_mask, second_moments=second_moments)
  adamw = optax.adamw(schedule(args.adamw_lr), weight_decay=0.05,
                      mask=decay_mask)
  results = [train('MAC' + (' + first layer' if args.first_layer else ''),
                   mac, model, params, data, args)]
  if not args.skip_adamw:
    results.append(train('AdamW', adamw, model, params, data, args))
  print(f'\n{len(x_train)} training images, ViT with '
        f'{sum(p.size for p in jax.tree.leaves(params))} parameters, '
        f'{args.dtype.name}, batch {args.batch_size}, {args.steps} steps\n')
  keys = ['optimizer', 'train_loss', 'test_loss', 'test_accuracy', 'nan_loss',
          'finite_state', 'largest_state', 'largest_param', 'mac_statistic',
          'seconds']
  print(' | '.join(keys))
  for result in results:
    print(' | '.join(
        f'{result[k]:.4g}' if isinstance(result[k], float) else str(result[k])
        for k in keys))
  if len(results) == 2:
    ratio = results[0]['train_loss'] / results[1]['train_loss']
    print(f'\ntrain loss MAC / AdamW: {ratio:.3f}')


if __name__ == '__main__':
  main()
