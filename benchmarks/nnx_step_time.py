"""Step time of MAC on a Flax NNX ViT against optax SGD-momentum and AdamW.

    python -m benchmarks.nnx_step_time [--rounds 7] [--steps 10]

Each optimizer trains the same NNX ViT with ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` and a full ``nnx.jit`` step (forward, backward, update); MAC
also captures its statistics with ``mac_optax.capture(model)``. The steps are
timed in one process, interleaved round by round, and each ratio is the median
of the per-round ratios. The table also gives XLA's temp memory of each
compiled step.
"""

import argparse
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import mac_optax


class Block(nnx.Module):

  def __init__(self, width, heads, rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):

  def __init__(self, width, depth, heads, patch, rngs, classes=10):
    self.width = width
    self.embed = nnx.Conv(1, width, (patch, patch), strides=patch,
                          padding='VALID', rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, images):
    x = self.embed(images)
    x = x.reshape(x.shape[0], -1, self.width)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _trainer(name, config, images, labels):
  model = ViT(**config, rngs=nnx.Rngs(0))
  if name == 'mac':
    layers = mac_optax.find_layers(model, images)
    tx = mac_optax.mac(0.1, layers=layers, weight_decay=0.0, t_inv=5)
  elif name == 'sgd':
    tx = optax.sgd(0.1, momentum=0.9)
  else:
    tx = optax.adamw(1e-3)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def step(model, optimizer, images, labels):
    if name == 'mac':
      def loss_fn(model):
        logits, stats = mac_optax.capture(model)(images)
        return _loss(logits, labels), stats
      (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      optimizer.update(model, grads, mac_stats=stats)
    else:
      loss, grads = nnx.value_and_grad(
          lambda m: _loss(m(images), labels))(model)
      optimizer.update(model, grads)
    return loss

  jitted = nnx.jit(step)
  graphdef, state = nnx.split((model, optimizer))
  compiled = jax.jit(
      lambda s, x, y: step(*nnx.merge(graphdef, s), x, y)).lower(
          state, images, labels).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(jitted(model, optimizer, images, labels))
  return lambda: jitted(model, optimizer, images, labels), temp


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  configs = [
      ('d64x2, 16 tok, b128', dict(width=64, depth=2, heads=4, patch=7), 128),
      ('d192x4, 49 tok, b64', dict(width=192, depth=4, heads=3, patch=4), 64),
  ]
  print(f'device: {jax.devices()[0].device_kind}')
  print('| NNX ViT | time MAC/SGD | time MAC/AdamW | temp MAC/SGD |')
  print('|---|---|---|---|')
  for label, config, batch in configs:
    images = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    runs = {name: _trainer(name, config, images, labels)
            for name in ('mac', 'sgd', 'adamw')}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
      for name, (run, _) in runs.items():
        start = time.perf_counter()
        for _ in range(args.steps):
          loss = run()
        jax.block_until_ready(loss)
        times[name].append(time.perf_counter() - start)
    ratio = lambda other: statistics.median(
        m / o for m, o in zip(times['mac'], times[other]))
    temp = runs['mac'][1] / max(runs['sgd'][1], 1)
    print(f'| {label} | {ratio("sgd"):.3f} | {ratio("adamw"):.3f} |'
          f' {temp:.3f} |')


if __name__ == '__main__':
  main()
