"""Step time and optimizer-state size of MAC against optax SGD and AdamW.

    python -m benchmarks.step_time [--rounds 7] [--steps 10]

Table 1 trains small ViTs with a full jitted step each (forward, backward,
update): MAC (momentum 0.9, no weight decay, t_inv=5) with its statistics
capture, optax.sgd(momentum=0.9) and optax.adamw on the plain model. The optimizers are timed in one process,
interleaved round by round, and each ratio is the median over rounds of the
per-round ratio, so that machine noise hits both sides alike.

Table 2 times the preconditioning of one layer's gradient: MAC's rank-one form
(O(m d) time, d floats of state) against the reference code's dense
``G @ (I - â âᵀ / (λ + ‖â‖²))`` (O(m d²) time, d² floats), at layer shapes of
ViT-S and ResNet-50.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mac_optax


class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y)
    y = nn.LayerNorm()(x)
    y = nn.Dense(4 * self.width)(y)
    return x + nn.Dense(self.width)(nn.gelu(y))


class ViT(nn.Module):
  width: int
  depth: int
  heads: int
  patch: int
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding='VALID')(x)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x)
    return nn.Dense(self.classes)(nn.LayerNorm()(x).mean(1))


CONFIGS = {
    # name: (model, image shape, batch)
    'vit-tiny d64 x2 (16 tokens)': (ViT(64, 2, 4, 7), (28, 28, 1), 128),
    'vit-small d192 x4 (64 tokens)': (ViT(192, 4, 3, 4), (32, 32, 3), 64),
}


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _make_step(model, tx, with_stats):
  apply_fn = mac_optax.capture(model.apply) if with_stats else model.apply

  def loss_fn(params, x, y):
    result = apply_fn({'params': params}, x)
    logits, stats = result if with_stats else (result, None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, stats

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y)
    extra = {'mac_stats': stats} if with_stats else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _time_steps(step, carry, x, y, steps):
  params, opt_state = carry
  jax.block_until_ready(params)
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, x, y)
  jax.block_until_ready(loss)
  return (time.perf_counter() - start) / steps, (params, opt_state)


def step_table(rounds, steps):
  rows = []
  for name, (model, shape, batch) in CONFIGS.items():
    x = jax.random.normal(jax.random.key(0), (batch,) + shape)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = model.init(jax.random.key(2), x[:1])
    params = variables['params']
    layers = mac_optax.find_layers(model.apply, variables, x)
    optimizers = {
        # No weight decay: the same work as optax.sgd besides preconditioning.
        'mac': (mac_optax.mac(0.1, layers=layers, weight_decay=0.0, t_inv=5),
                True),
        'sgd': (optax.sgd(0.1, momentum=0.9), False),
        'adamw': (optax.adamw(1e-3), False),
    }
    runs = {}
    for key, (tx, with_stats) in optimizers.items():
      step = _make_step(model, tx, with_stats)
      carry = (params, tx.init(params))
      _, carry = _time_steps(step, carry, x, y, 2)  # compile and warm up
      runs[key] = [step, carry, [], _tree_bytes(carry[1])]
    for _ in range(rounds):
      for run in runs.values():
        seconds, run[1] = _time_steps(run[0], run[1], x, y, steps)
        run[2].append(seconds)
    mac_times = np.asarray(runs['mac'][2])
    ratio = lambda key: statistics.median(mac_times / np.asarray(runs[key][2]))
    rows.append((
        name,
        f'{_tree_bytes(params) / 4:,.0f}',
        f'{1e3 * statistics.median(mac_times):.1f}',
        f'{1e3 * statistics.median(runs["sgd"][2]):.1f}',
        f'{1e3 * statistics.median(runs["adamw"][2]):.1f}',
        f'{ratio("sgd"):.3f}',
        f'{ratio("adamw"):.3f}',
        f'{runs["mac"][3]:,}',
        f'{runs["sgd"][3]:,}',
        f'{runs["mac"][3] / runs["sgd"][3]:.4f}',
        f'{runs["mac"][3] / runs["adamw"][3]:.4f}',
    ))
  header = ('model', 'params', 'mac ms', 'sgd ms', 'adamw ms', 'time/sgd',
            'time/adamw', 'mac state B', 'sgd state B', 'state/sgd',
            'state/adamw')
  return header, rows


def _dense_reference(grad, mean, damping):
  d = mean.shape[0]
  matrix = jnp.eye(d) - jnp.outer(mean, mean) / (damping + mean @ mean)
  return grad @ matrix


def precondition_table(rounds, steps):
  shapes = {
      'ViT-S attn.qkv': (1152, 385),
      'ViT-S mlp.fc2': (384, 1537),
      'R-50 layer3 conv2': (256, 2304),
      'R-50 layer4 conv2': (512, 4608),
  }
  rows = []
  for name, (m, d) in shapes.items():
    spec = mac_optax.LayerSpec('dense', 'Dense', (d,), (m,), 1, False)
    grad_torch = jax.random.normal(jax.random.key(0), (m, d))
    kernel = grad_torch.T  # Flax layout (d, m)
    mean = jax.random.normal(jax.random.key(1), (d,))
    rank_one = jax.jit(lambda k, a: mac_optax.precondition(k, None, a, spec,
                                                           1.0)[0])
    dense = jax.jit(lambda g, a: _dense_reference(g, a, 1.0))
    np.testing.assert_allclose(rank_one(kernel, mean).T,
                               dense(grad_torch, mean), rtol=1e-3, atol=1e-3)
    times = {'rank_one': [], 'dense': []}
    for _ in range(rounds):
      for key, fn, arg in (('rank_one', rank_one, kernel),
                           ('dense', dense, grad_torch)):
        jax.block_until_ready(fn(arg, mean))
        start = time.perf_counter()
        for _ in range(steps):
          out = fn(arg, mean)
        jax.block_until_ready(out)
        times[key].append((time.perf_counter() - start) / steps)
    rank_one_s = statistics.median(times['rank_one'])
    dense_s = statistics.median(times['dense'])
    rows.append((
        name, str(m), str(d),
        f'{1e6 * rank_one_s:.0f}', f'{1e6 * dense_s:.0f}',
        f'{dense_s / rank_one_s:.0f}',
        f'{4 * m * d / 1e6:.2f}', f'{2 * m * d * d / 1e6:.0f}',
        f'{4 * d:,}', f'{4 * d * d:,}',
    ))
  header = ('layer', 'm', 'd', 'rank-1 us', 'dense us', 'speed-up',
            'rank-1 MFLOP', 'dense MFLOP', 'rank-1 B', 'dense B')
  return header, rows


def _print_table(title, header, rows):
  widths = [max(len(str(r[i])) for r in (header,) + tuple(rows))
            for i in range(len(header))]
  print(title)
  print('  '.join(h.ljust(w) for h, w in zip(header, widths)))
  for row in rows:
    print('  '.join(str(c).ljust(w) for c, w in zip(row, widths)))
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, '
        f'{args.rounds} interleaved rounds of {args.steps} steps\n')
  _print_table('Table 1: training step (forward + backward + update)',
               *step_table(args.rounds, args.steps))
  _print_table('Table 2: preconditioning one layer gradient (m x d)',
               *precondition_table(args.rounds, args.steps))


if __name__ == '__main__':
  main()
