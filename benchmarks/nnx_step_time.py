"""Step time of MAC on a Flax NNX ViT against optax SGD-momentum and AdamW.

    python -m benchmarks.nnx_step_time [--rounds 7] [--steps 10]

Each optimizer trains the same NNX ViT with ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` and a full step (forward, backward, update); MAC also
captures its statistics with ``mac_optax.capture(model)``. Steps run either
under ``nnx.jit`` or, as Flax recommends for speed, as ``jax.jit`` of a pure
function of the split state (``nnx.split``/``nnx.merge``): ``nnx.jit``'s
per-call Python work grows with the number of variables, and MAC's state has
a few per layer. The steps are timed in one process, interleaved round by
round, and each ratio is the median of the per-round ratios. The table also
gives XLA's temp memory of each compiled step.
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

  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def pure_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss = step(model, optimizer, images, labels)
    return nnx.state((model, optimizer)), loss

  temp = pure_step.lower(state, images, labels).compile().memory_analysis(
      ).temp_size_in_bytes
  jitted = nnx.jit(step)
  holder = [state]

  def run_pure():
    holder[0], loss = pure_step(holder[0], images, labels)
    return loss

  runs = {'nnx.jit': lambda: jitted(model, optimizer, images, labels),
          'jax.jit': run_pure}
  for run in runs.values():
    jax.block_until_ready(run())
  return runs, temp


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
  print('| NNX ViT | step | SGD ms/step | time MAC/SGD | time MAC/AdamW |'
        ' temp MAC/SGD |')
  print('|---|---|---|---|---|---|')
  for label, config, batch in configs:
    images = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    trainers = {name: _trainer(name, config, images, labels)
                for name in ('mac', 'sgd', 'adamw')}
    for kind in ('jax.jit', 'nnx.jit'):
      times = {name: [] for name in trainers}
      for _ in range(args.rounds):
        for name, (runs, _) in trainers.items():
          start = time.perf_counter()
          for _ in range(args.steps):
            loss = runs[kind]()
          jax.block_until_ready(loss)
          times[name].append(time.perf_counter() - start)
      ratio = lambda other: statistics.median(
          m / o for m, o in zip(times['mac'], times[other]))
      temp = trainers['mac'][1] / max(trainers['sgd'][1], 1)
      sgd_ms = statistics.median(times['sgd']) / args.steps * 1e3
      print(f'| {label} | {kind} | {sgd_ms:.1f} | {ratio("sgd"):.3f} |'
            f' {ratio("adamw"):.3f} | {temp:.3f} |')


if __name__ == '__main__':
  main()
