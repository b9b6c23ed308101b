"""What MAC costs against SGD-momentum, AdamW, Muon and K-FAC, as markdown.

    python -m benchmarks.cost [--device cpu|gpu] [--rounds 7] [--steps 5]
        [--optimizers mac,sgd,...] [--demo-results DIR] [--skip-scaling]
        [--skip-layer] [--skip-compile] [--depths 2,8,24] [--quick]

Table 1, the demo's models (ViT, ResNet-style CNN with BatchNorm, BERT-style
masked LM with a padding mask, GPT) at their demo sizes, one full jitted
training step each: MAC (the demo's settings without weight decay: damping 3,
stat_decay 0.99, t_cov = t_inv = 5, statistics captured every step), its
presets ``mac_adamw`` (MAC on the preconditioned layers, AdamW elsewhere) and
``pre_muon`` (MAC's preconditioner before Muon), ``optax.sgd(momentum=0.9)``,
``optax.adamw``, ``optax.contrib.muon`` and K-FAC (``kfac-jax``, curvature
estimated every step, inverses every 5th; its step is timed over whole
periods, and its temp memory is that of a step that refreshes the
inverses). An optimizer that cannot run a model gets its error as the row.

* step time: the optimizers run in one process, interleaved round by round;
  each ratio is the median over rounds of the per-round ratio, so that machine
  noise hits both sides alike;
* optimizer-state bytes;
* temp bytes of the compiled step, from XLA's memory analysis (buffers the
  step needs besides its arguments and outputs).

Table 2, scaling: the BERT-style model (2 blocks, batch 8) as width d and
sequence length N grow. Attention probabilities (B·H·N² floats, the model's
own) dominate temp memory at large N; MAC adds only O(Σ d_in) statistics, so
the ratios stay flat.

Table 3, one layer's preconditioning: MAC's rank-one form (O(m·d) time, d
floats of state) against the reference code's dense
``G (I − â âᵀ / (λ + ‖â‖²))`` (O(m·d²) time, d² floats), at layer shapes of
ViT-S and ResNet-50.

Table 4, compile time against depth: the jitted training step of the demo's
ViT (width 32) with 2, 8 and 24 unscanned blocks: ``optax.sgd(momentum=0.9)``,
the same SGD with MAC's statistics captured (and kept in its state, so that
XLA cannot drop them: what capture alone costs), and MAC; seconds to trace,
lower and compile, XLA's compile alone, and the lines of the compiled HLO.
MAC preconditions layers of equal shape together (one compiled body per
group), but on XLA:CPU every layer still adds its own small kernels: the
slices that take each layer's result out of its group differ in their
offsets, and XLA:CPU compiles each distinct fusion on its own (equal fusions,
such as SGD's per-parameter updates, once in all). The last row scans the
deepest stack (``nn.scan`` over stacked parameters, as large-scale code does):
MAC then sees one layer per stack, whatever the depth.

Table 5, with ``--demo-results``: steps and training seconds to a target from
the JSON files that ``python -m mac_optax.demo`` writes.

Inputs are random (shapes as in the demo), so no data set is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mac_optax
from mac_optax.demo import cli
from mac_optax.demo import data
from mac_optax.demo import report
from mac_optax.demo import tasks
from mac_optax.demo import training


def _parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--device', choices=('cpu', 'gpu', 'tpu'),
                 help='JAX platform (default: JAX picks); recorded in tables')
  p.add_argument('--rounds', type=int, default=7,
                 help='interleaved timing rounds (median over them)')
  p.add_argument('--steps', type=int, default=5, help='steps per round')
  p.add_argument('--models', default='vit,cnn,bert,gpt',
                 help='demo models for table 1')
  p.add_argument('--optimizers', default=','.join(OPTIMIZERS),
                 help='optimizers for table 1 (sgd always runs: the'
                 ' ratios are to it)')
  p.add_argument('--widths', default='128,256,512,1024')
  p.add_argument('--lengths', default='64,128,256,512,1024')
  p.add_argument('--scaling-batch', type=int, default=8)
  p.add_argument('--scaling-rounds', type=int, default=5,
                 help='timing rounds for table 2 (its large steps are slow)')
  p.add_argument('--scaling-steps', type=int, default=2)
  p.add_argument('--skip-scaling', action='store_true')
  p.add_argument('--skip-layer', action='store_true',
                 help='skip table 3 (one layer, rank-one vs dense)')
  p.add_argument('--depths', default='2,8,24',
                 help='ViT depths (unscanned blocks) for the compile table')
  p.add_argument('--compile-rounds', type=int, default=2,
                 help='interleaved compilations per optimizer and depth (min)')
  p.add_argument('--skip-compile', action='store_true',
                 help='skip table 4 (compile time against depth)')
  p.add_argument('--demo-results', help='folder with the demo JSON files')
  p.add_argument('--quick', action='store_true',
                 help='3 rounds of 2 steps, small scaling grid (a smoke run)')
  return p.parse_args()


MAC_SETTINGS = dict(momentum=0.9, weight_decay=0.0, damping=3.0,
                    stat_decay=0.99, t_cov=5, t_inv=5)
OPTIMIZERS = ('mac', 'mac_adamw', 'pre_muon', 'sgd', 'adamw', 'muon', 'kfac')
# Steps per timing call for K-FAC: a whole inverse-update period, so that
# every timed call has the same mix of cheap and refreshing steps.
KFAC_PERIOD = 5
TEXT_VOCAB = 84


def _synthetic_task(name: str, config: dict):
  """The demo task ``name`` on random data of the demo's shapes."""
  rng = np.random.default_rng(0)
  if name in ('vit', 'cnn'):
    x = rng.random((1024, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, 1024).astype(np.int32)
    images = data.ImageData(x, y, x[:8], y[:8], tuple('0123456789'))
    return tasks.image_task(name, images, width=config['width'],
                            depth=config['depth'], heads=config['heads'],
                            patch=config['patch'])
  ids = rng.integers(0, TEXT_VOCAB, 200_000).astype(np.uint8)
  text = data.TextData(ids[:190_000], ids[190_000:], 'x' * TEXT_VOCAB)
  return tasks.text_task(name, text, width=config['width'],
                         depth=config['depth'], heads=config['heads'],
                         context=config['context'], eval_windows=8)


def describe_device() -> str:
  """The device's name; for a CPU its model and core count."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    return f'{device.device_kind} ({device.platform})'
  model = 'cpu'
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f
               if line.startswith('model name')]
    model = names[0] if names else model
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} cores (cpu)'


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _optimizers(layers):
  preconditioner = {k: MAC_SETTINGS[k] for k in ('damping', 'stat_decay',
                                                 't_cov', 't_inv')}
  return {
      'mac': (mac_optax.mac(0.1, layers=layers, **MAC_SETTINGS), True),
      'mac_adamw': (mac_optax.mac_adamw(0.1, layers=layers,
                                        adam_learning_rate=1e-3,
                                        **MAC_SETTINGS), True),
      'pre_muon': (mac_optax.preconditioned(optax.contrib.muon(0.02),
                                            layers=layers, **preconditioner),
                   True),
      'sgd': (optax.sgd(0.1, momentum=0.9), False),
      'adamw': (optax.adamw(1e-3), False),
      'muon': (optax.contrib.muon(0.02), False),
  }


def _kfac_run(task, params, state, batch):
  """K-FAC's timed step (whole periods) and its memory, or its error."""
  from mac_optax.demo import kfac  # pylint: disable=g-import-not-at-top
  try:
    optimizer = kfac.kfac_optimizer(task, lambda _: 0.01, damping=0.1)
    key = jax.random.key(0)
    carry = jax.tree.map(jnp.array, (params, state))
    opt_state = optimizer.init(carry[0], key, batch, carry[1])

    def period(params, state, opt_state, batch):
      for _ in range(KFAC_PERIOD):
        params, opt_state, state, stats = optimizer.step(
            params, opt_state, key, batch=batch, func_state=state)
      return params, state, opt_state, stats['loss']

    # One step that refreshes the inverses, as a function of its inputs, for
    # XLA's memory analysis (K-FAC's own step is jitted inside it).
    def refresh_step(params, state, opt_state, batch):
      params, opt_state, state, stats = optimizer.step(
          params, opt_state, key, batch=batch, func_state=state,
          global_step_int=0)
      return params, state, opt_state, stats['loss']

    fresh = jax.tree.map(jnp.array, (params, state, opt_state))
    compiled = jax.jit(refresh_step).lower(*fresh, batch).compile()
    memory = compiled.memory_analysis()
    run = {'step': period, 'carry': (*carry, opt_state), 'batch': batch,
           'times': [], 'state_bytes': _tree_bytes(opt_state),
           'temp_bytes': memory.temp_size_in_bytes if memory else float('nan'),
           'steps_per_call': KFAC_PERIOD}
    _run_steps(run, 1)  # compiles both kinds of step
    return run
  except Exception as error:  # pylint: disable=broad-except
    return {'error': f'{type(error).__name__}: {" ".join(str(error).split())}'}


def _compiled_runs(task, batch_size, names=('mac', 'sgd', 'adamw')):
  """Per optimizer: compiled step, carry, state bytes, temp bytes."""
  params, state = training.init(task, 0)
  batch = next(task.batches(np.random.default_rng(0), batch_size))
  batch = jax.device_put(batch)
  layers = mac_optax.find_layers(task.model.apply,
                                 {'params': params, **state}, task.example)
  runs = {}
  for name, (tx, use_stats) in _optimizers(layers).items():
    if name not in names:
      continue
    opt_state = tx.init(params)
    step = jax.jit(training.make_train_step(task, tx, use_stats),
                   donate_argnums=(0, 1, 2))
    # Fresh copies: the step donates its inputs.
    carry = jax.tree.map(jnp.array, (params, state, opt_state))
    compiled = step.lower(*carry, batch).compile()
    memory = compiled.memory_analysis()
    runs[name] = {
        'step': compiled, 'carry': carry, 'batch': batch, 'times': [],
        'state_bytes': _tree_bytes(opt_state),
        'temp_bytes': memory.temp_size_in_bytes if memory else float('nan'),
    }
  if 'kfac' in names:
    runs['kfac'] = _kfac_run(task, params, state, batch)
  return runs, _tree_bytes(params) // 4


def _run_steps(run, steps) -> float:
  """Seconds per training step over ``steps`` calls of ``run['step']``."""
  params, state, opt_state = run['carry']
  jax.block_until_ready(params)
  start = time.perf_counter()
  for _ in range(steps):
    params, state, opt_state, loss = run['step'](params, state, opt_state,
                                                 run['batch'])
  jax.block_until_ready(loss)
  run['carry'] = (params, state, opt_state)
  return (time.perf_counter() - start) / (steps * run.get('steps_per_call', 1))


def _time(runs, rounds, steps):
  """Interleaved rounds; fills ``run['times']`` (failed runs are skipped)."""
  runs = {k: v for k, v in runs.items() if 'error' not in v}
  for run in runs.values():
    _run_steps(run, max(2, steps // 2))  # warm up caches and allocator
  for _ in range(rounds):
    for run in runs.values():
      calls = max(1, steps // run.get('steps_per_call', 1))
      run['times'].append(_run_steps(run, calls))


def _ratio(runs, a, b) -> float:
  return statistics.median(np.asarray(runs[a]['times']) /
                           np.asarray(runs[b]['times']))


def _mb(n) -> str:
  return f'{n / 2**20:,.1f}'


OPTIMIZER_LABELS = {'mac': 'MAC', 'mac_adamw': 'MAC + AdamW',
                    'pre_muon': 'MAC → Muon', 'sgd': 'SGD-momentum',
                    'adamw': 'AdamW', 'muon': 'Muon', 'kfac': 'K-FAC'}


def model_table(names, rounds, steps, optimizers=OPTIMIZERS):
  """One row per model and optimizer; ratios to SGD-momentum."""
  optimizers = [o for o in OPTIMIZERS if o in optimizers or o == 'sgd']
  rows = []
  for name in names:
    defaults = cli.DEFAULTS[name]
    config = {k: getattr(defaults, k) for k in ('width', 'depth', 'heads',
                                                'patch', 'context')}
    task = _synthetic_task(name, config)
    runs, params = _compiled_runs(task, defaults.batch_size, optimizers)
    _time(runs, rounds, steps)
    model = (f'{name} ({defaults.batch_size} × '
             f'{"28×28" if name in ("vit", "cnn") else defaults.context},'
             f' {params / 1e3:,.0f} k params)')
    sgd = runs['sgd']
    for optimizer in optimizers:
      run = runs[optimizer]
      label = OPTIMIZER_LABELS[optimizer]
      if 'error' in run:
        rows.append((model, label, f'failed: {run["error"]}', '—', '—', '—',
                     '—', '—'))
        continue
      rows.append((
          model, label,
          f'{1e3 * statistics.median(run["times"]):.1f}',
          f'{_ratio(runs, optimizer, "sgd"):.3f}',
          f'{run["state_bytes"] / 1024:,.0f}',
          f'{run["state_bytes"] / sgd["state_bytes"]:.3f}',
          _mb(run['temp_bytes']),
          f'{run["temp_bytes"] / sgd["temp_bytes"]:.3f}',
      ))
  header = ('model (batch × input)', 'optimizer', 'step ms',
            'time / SGD', 'state KiB', 'state / SGD', 'temp MiB',
            'temp / SGD')
  return header, rows


def scaling_table(widths, lengths, batch, rounds, steps):
  grid = [(d, lengths[0]) for d in widths] + [(widths[0], n)
                                              for n in lengths[1:]]
  rows = []
  for width, length in grid:
    heads = max(4, width // 64)
    config = {'width': width, 'depth': 2, 'heads': heads, 'patch': 0,
              'context': length}
    task = _synthetic_task('bert', config)
    runs, params = _compiled_runs(task, batch, names=('mac', 'sgd'))
    _time(runs, rounds, steps)
    state = lambda k: runs[k]['state_bytes']
    temp = lambda k: runs[k]['temp_bytes']
    # The model's own largest activation: one layer's attention weights.
    probs = batch * heads * length**2 * 4
    rows.append((
        str(width), str(length), str(heads), f'{params / 1e6:.2f} M',
        f'{1e3 * statistics.median(runs["mac"]["times"]):.1f}',
        f'{_ratio(runs, "mac", "sgd"):.3f}',
        f'{state("mac") / state("sgd"):.4f}',
        f'{(state("mac") - state("sgd")) / 1024:,.1f}',
        _mb(probs), _mb(temp('sgd')), _mb(temp('mac')),
        f'{temp("mac") / temp("sgd"):.3f}',
    ))
  header = ('d', 'N', 'heads', 'params', 'MAC ms', 'time MAC/SGD',
            'state MAC/SGD', 'MAC extra state KiB', 'B·H·N² probs MiB',
            'temp SGD MiB', 'temp MAC MiB', 'temp MAC/SGD')
  return header, rows


def _dense_reference(grad, mean, damping):
  """The reference's preconditioner, an explicit d×d matrix (torch layout)."""
  d = mean.shape[0]
  matrix = jnp.eye(d) - jnp.outer(mean, mean) / (damping + mean @ mean)
  return grad @ matrix


LAYER_SHAPES = {
    'ViT-S attn.qkv': (1152, 385),
    'ViT-S mlp.fc2': (384, 1537),
    'ResNet-50 layer3 conv2': (256, 2304),
    'ResNet-50 layer4 conv2': (512, 4608),
}


def layer_table(rounds, steps):
  rows = []
  for name, (m, d) in LAYER_SHAPES.items():
    spec = mac_optax.LayerSpec('dense', 'Dense', (d,), (m,), 1, False)
    grad_torch = jax.random.normal(jax.random.key(0), (m, d))
    kernel = grad_torch.T  # Flax layout (d, m)
    mean = jax.random.normal(jax.random.key(1), (d,))
    rank_one = jax.jit(
        lambda k, a: mac_optax.precondition(k, None, a, spec, 1.0)[0])
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
        f'{name} ({m} × {d})', f'{1e3 * rank_one_s:.2f}',
        f'{1e3 * dense_s:.1f}', f'{dense_s / rank_one_s:.0f}×',
        f'{4 * d / 1024:,.0f} KiB', f'{4 * d * d / 2**20:,.1f} MiB',
    ))
  header = ('layer (m × d)', 'rank-one ms', 'dense `G @ P` ms', 'speed-up',
            'MAC state', 'dense P')
  return header, rows


def _compile_once(task, tx, use_stats, params, state, batch):
  """Seconds to trace and lower, seconds to compile, HLO lines."""
  opt_state = jax.eval_shape(tx.init, params)
  step = jax.jit(training.make_train_step(task, tx, use_stats))
  start = time.perf_counter()
  lowered = step.lower(params, state, opt_state, batch)
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return traced - start, done - traced, compiled.as_text().count('\n')


def _keeping_stats(tx, example_stats):
  """``tx`` that also keeps the latest statistics in its state.

  Statistics that nothing uses would be dropped by XLA: kept, they make the
  step compile with capture's work and without MAC's update.
  """
  def init_fn(params):
    return tx.init(params), jax.tree.map(jnp.zeros_like, example_stats)

  def update_fn(updates, state, params=None, *, mac_stats, **extra_args):
    del extra_args
    updates, inner = tx.update(updates, state[0], params)
    return updates, (inner, mac_stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def compile_table(depths, rounds):
  """SGD's, SGD with capture's and MAC's jitted step: compile cost by depth."""
  rows = []
  for depth, scan in [(d, False) for d in depths] + [(max(depths), True)]:
    task = _synthetic_task('vit', dict(width=32, depth=depth, heads=4,
                                       patch=7))
    if scan:
      task = dataclasses.replace(task, model=dataclasses.replace(task.model,
                                                                 scan=True))
    params, state = training.init(task, 0)
    batch = next(task.batches(np.random.default_rng(0), 32))
    variables = {'params': params, **state}
    layers = mac_optax.find_layers(task.model.apply, variables, task.example)
    _, example_stats = jax.eval_shape(mac_optax.capture(task.model.apply),
                                      variables, task.example)
    sgd = optax.sgd(0.1, momentum=0.9)
    optimizers = {'sgd': (sgd, False),
                  'capture': (_keeping_stats(sgd, example_stats), True),
                  'mac': (mac_optax.mac(0.1, layers=layers, **MAC_SETTINGS),
                          True)}
    results = {name: [] for name in optimizers}
    for _ in range(rounds):
      for name, (tx, use_stats) in optimizers.items():
        results[name].append(_compile_once(task, tx, use_stats, params, state,
                                           batch))
    best = {name: [min(r[i] for r in runs) for i in range(3)]
            for name, runs in results.items()}
    total = {name: b[0] + b[1] for name, b in best.items()}
    mac, sgd = best['mac'], best['sgd']
    rows.append((
        f'{depth}, scanned' if scan else str(depth), str(len(layers)),
        f'{total["sgd"]:.2f}',
        f'{total["capture"]:.2f}', f'{total["mac"]:.2f}',
        f'{total["capture"] / total["sgd"]:.2f}',
        f'{total["mac"] / total["sgd"]:.2f}',
        f'{mac[1] / sgd[1]:.2f}', f'{sgd[2]:,}', f'{mac[2]:,}',
        f'{mac[2] / sgd[2]:.2f}'))
  header = ('blocks', 'MAC layers', 'SGD s', 'SGD + capture s', 'MAC s',
            'capture / SGD', 'MAC / SGD', 'XLA compile only, MAC / SGD',
            'SGD HLO lines', 'MAC HLO lines', 'HLO MAC / SGD')
  return header, rows


def target_tables(folder) -> list[str]:
  out = []
  for path in sorted(glob.glob(os.path.join(folder, '*.json'))):
    if os.path.basename(path).startswith('sweep_'):
      continue
    config, runs = cli.load_runs(path)
    first = next(iter(runs.values()))[0]
    target = report.default_target(runs)
    out.append(
        f'{config["model"]} on {config["dataset"]}, {config["steps"]} steps,'
        f' {len(next(iter(runs.values())))} seed(s), on'
        f' {config.get("device", "?")}; target = the weakest optimizer\'s'
        f' mean final {first.eval_name} {first.metric}:\n\n'
        + report.time_to_target_table(runs, target))
  return out


def main():
  args = _parse()
  if args.device:
    # Before anything touches a backend.
    jax.config.update('jax_platforms', args.device)
  rounds, steps = (3, 2) if args.quick else (args.rounds, args.steps)
  widths = [int(w) for w in args.widths.split(',')]
  lengths = [int(n) for n in args.lengths.split(',')]
  if args.quick:
    widths, lengths = widths[:2], lengths[:2]
  print(f'Device: {describe_device()}, jax'
        f' {jax.__version__}, {rounds} interleaved rounds of {steps} steps,'
        f' medians.\n')
  names = [n for n in args.models.split(',') if n]
  if names:
    print('Table 1: training step (forward, backward, update) of the demo'
          ' models\n')
    optimizers = [o for o in args.optimizers.split(',') if o]
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
      raise SystemExit(f'unknown optimizers {unknown}; choose from'
                       f' {OPTIMIZERS}.')
    print(report.markdown_table(*model_table(names, rounds, steps,
                                             optimizers)) + '\n')
  if not args.skip_scaling:
    print(f'Table 2: scaling, BERT-style model, 2 blocks, batch'
          f' {args.scaling_batch}, MAC vs optax.sgd(momentum=0.9)\n')
    scaling_rounds, scaling_steps = ((2, 1) if args.quick else
                                     (args.scaling_rounds, args.scaling_steps))
    print(report.markdown_table(*scaling_table(
        widths, lengths, args.scaling_batch, scaling_rounds, scaling_steps))
          + '\n')
  if not args.skip_layer:
    print('Table 3: preconditioning one layer gradient, MAC rank-one vs the'
          ' reference\'s dense d×d matrix\n')
    print(report.markdown_table(*layer_table(rounds, steps)) + '\n')
  if not args.skip_compile:
    depths = [int(d) for d in args.depths.split(',')]
    if args.quick:
      depths = depths[:1]
    print('Table 4: compiling the jitted training step (trace, lower and XLA'
          ' compile; best of interleaved rounds) of a ViT of width 32 against'
          ' depth: unscanned blocks, then the deepest stack scanned\n')
    print(report.markdown_table(*compile_table(
        depths, 1 if args.quick else args.compile_rounds)) + '\n')
  if args.demo_results:
    print('Table 5: time to target in the demo runs\n')
    for table in target_tables(args.demo_results):
      print(table + '\n')


if __name__ == '__main__':
  main()
