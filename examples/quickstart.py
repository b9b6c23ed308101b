"""Train a small CNN on scikit-learn's digits with MAC and with SGD + momentum.

    python examples/quickstart.py [--epochs 30]

The digits (1797 8x8 images) ship inside scikit-learn, so this runs offline.
It prints the layers MAC preconditions, then test accuracy per epoch for both
optimizers.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import mac_optax


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def load(seed):
  images, labels = load_digits(return_X_y=True)
  images = (images.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
  order = np.random.default_rng(seed).permutation(len(images))
  images, labels = images[order], labels[order].astype(np.int32)
  split = int(0.8 * len(images))
  return (images[:split], labels[:split]), (images[split:], labels[split:])


def train(name, tx, model, variables, data, epochs, batch_size, seed):
  (x_train, y_train), (x_test, y_test) = data
  apply_with_stats = mac_optax.capture(model.apply)

  def loss_fn(params, x, y):
    logits, stats = apply_with_stats({'params': params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, stats

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y)
    # Optimizers that take no statistics ignore the extra argument.
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params):
    logits = model.apply({'params': params}, x_test)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  params = variables['params']
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  history = []
  start = time.perf_counter()
  for _ in tqdm(range(epochs), desc=name, leave=False):
    order = rng.permutation(len(x_train))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      batch = order[i:i + batch_size]
      params, opt_state, _ = step(params, opt_state, x_train[batch],
                                  y_train[batch])
    history.append(float(accuracy(params)))
  return history, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--lr', type=float, default=0.1)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()

  data = load(args.seed)
  model = CNN()
  variables = model.init(jax.random.key(args.seed), data[0][0][:1])
  # One extra line compared with optax.sgd: which layers, of what shape.
  layers = mac_optax.find_layers(model.apply, variables, data[0][0][:1])
  print(mac_optax.summary(layers, variables['params']), '\n')

  optimizers = {
      'mac': mac_optax.mac(args.lr, layers=layers, momentum=0.9,
                           weight_decay=5e-4, damping=1.0, stat_decay=0.95,
                           t_cov=5, t_inv=50),
      'sgd+momentum': optax.chain(optax.add_decayed_weights(5e-4),
                                  optax.sgd(args.lr, momentum=0.9)),
  }
  results = {
      name: train(name, tx, model, variables, data, args.epochs,
                  args.batch_size, args.seed)
      for name, tx in optimizers.items()
  }
  print('test accuracy per epoch')
  print(f'{"epoch":>5}  ' + '  '.join(f'{n:>12}' for n in results))
  for epoch in range(args.epochs):
    if (epoch + 1) % 5 and epoch + 1 != args.epochs:
      continue
    row = '  '.join(f'{results[n][0][epoch]:12.3f}' for n in results)
    print(f'{epoch + 1:>5}  {row}')
  print('seconds (incl. compile): ' + ', '.join(
      f'{n} {t:.1f}' for n, (_, t) in results.items()))


if __name__ == '__main__':
  main()
