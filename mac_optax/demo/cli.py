"""``python -m mac_optax.demo``: MAC and its presets against AdamW,
SGD-momentum, Muon and K-FAC on real data.

Trains one model with each optimizer under the same budget and prints a
markdown table (final test metric, final train loss, wall-clock, steps/s; mean
± standard deviation over ``--seeds``), the steps and seconds each needed to
reach a common target, and writes a PNG of the curves and a JSON of all runs.
``--sweep`` instead tunes each optimizer's learning rate on a split held out
of the training set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import jax

from mac_optax.demo import data as data_lib
from mac_optax.demo import kfac as kfac_lib
from mac_optax.demo import report
from mac_optax.demo import tasks as tasks_lib
from mac_optax.demo import training as train_lib


@dataclasses.dataclass(frozen=True)
class Defaults:
  """A model's default size, budget and learning rates.

  ``learning_rates`` (and ``adam_learning_rates``, the second rate of the
  optimizers in ``training.TWO_RATES``) were chosen by ``--sweep`` (held-out
  split of the training set) at exactly this size and budget, except where
  the README says otherwise. Their keys are the optimizers a plain run
  trains.
  """

  dataset: str
  width: int
  depth: int
  heads: int
  patch: int
  context: int
  batch_size: int
  epochs: float | None
  steps: int | None
  evals: int
  first_layer: bool
  learning_rates: dict[str, float]
  grids: dict[str, tuple[float, ...]]
  adam_learning_rates: dict[str, float] = dataclasses.field(
      default_factory=dict)
  adam_grids: dict[str, tuple[float, ...]] = dataclasses.field(
      default_factory=dict)


_SGD_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
_ADAMW_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
_MUON_GRID = (0.01, 0.02, 0.05)
_KFAC_GRID = (0.01, 0.03, 0.1)
_GRIDS = {'mac': _SGD_GRID, 'mac_adamw': _SGD_GRID, 'pre_muon': _MUON_GRID,
          'pre_adamw': _ADAMW_GRID, 'adamw': _ADAMW_GRID, 'sgd': _SGD_GRID,
          'muon': _MUON_GRID, 'kfac': _KFAC_GRID}


def _with_peers(mac: float, adamw: float, sgd: float, muon: float,
                kfac: float, mac_adamw: float | None = None,
                pre_muon: float | None = None,
                pre_adamw: float | None = None) -> dict[str, float]:
  """Every optimizer's peak rate; a preset defaults to its parts' rates."""
  return {'mac': mac,
          'mac_adamw': mac if mac_adamw is None else mac_adamw,
          'pre_muon': muon if pre_muon is None else pre_muon,
          'pre_adamw': adamw if pre_adamw is None else pre_adamw,
          'adamw': adamw, 'sgd': sgd, 'muon': muon, 'kfac': kfac}


def _adam_rates(adamw: float, muon: float | None = None) -> dict[str, float]:
  """The Adam parts' rates: AdamW's tuned rate unless swept otherwise."""
  muon = adamw if muon is None else muon
  return {'mac_adamw': adamw, 'pre_muon': muon, 'muon': muon}


def _adam_grids(adamw: float) -> dict[str, tuple[float, ...]]:
  """Adam-part grids: AdamW's tuned rate and a third of it."""
  return {name: (adamw / 3, adamw) for name in ('mac_adamw', 'pre_muon',
                                                 'muon')}

DEFAULTS = {
    'vit': Defaults('fashion_mnist', width=64, depth=2, heads=4, patch=7,
                    context=0, batch_size=128, epochs=4, steps=None, evals=12,
                    first_layer=False,
                    learning_rates=_with_peers(
                        mac=0.03, adamw=3e-3, sgd=0.03, muon=0.02, kfac=0.03),
                    grids=_GRIDS, adam_learning_rates=_adam_rates(3e-3),
                    adam_grids=_adam_grids(3e-3)),
    'cnn': Defaults('fashion_mnist', width=16, depth=3, heads=0, patch=0,
                    context=0, batch_size=128, epochs=2, steps=None, evals=12,
                    first_layer=False,
                    learning_rates=_with_peers(
                        mac=0.3, adamw=0.03, sgd=0.3, muon=0.02, kfac=0.03),
                    grids=_GRIDS, adam_learning_rates=_adam_rates(0.03),
                    adam_grids=_adam_grids(0.03)),
    'gpt': Defaults('shakespeare', width=64, depth=2, heads=4, patch=0,
                    context=64, batch_size=32, epochs=None, steps=1000,
                    evals=10, first_layer=False,
                    learning_rates=_with_peers(
                        mac=1.0, adamw=0.01, sgd=1.0, muon=0.02, kfac=0.03),
                    grids=_GRIDS, adam_learning_rates=_adam_rates(0.01),
                    adam_grids=_adam_grids(0.01)),
    'bert': Defaults('shakespeare', width=64, depth=2, heads=4, patch=0,
                     context=64, batch_size=128, epochs=None, steps=700,
                     evals=10, first_layer=False,
                     learning_rates=_with_peers(
                         mac=0.3, adamw=0.01, sgd=0.3, muon=0.02, kfac=0.03),
                     grids=_GRIDS, adam_learning_rates=_adam_rates(0.01),
                     adam_grids=_adam_grids(0.01)),
}
SWEEP_EVALS = 4
# A plain run's optimizers: K-FAC (over 100x SGD's step time on the CNN on a
# CPU) and the preconditioned_* compositions are asked for by --optimizers.
DEFAULT_OPTIMIZERS = ('mac', 'mac_adamw', 'muon', 'adamw', 'sgd')
_LABELS = {'vit': 'ViT', 'cnn': 'CNN', 'gpt': 'GPT', 'bert': 'BERT',
           'fashion_mnist': 'Fashion-MNIST', 'digits': 'digits',
           'shakespeare': 'Shakespeare'}
WARMUP_FRACTION = 0.05
HOLDOUT_IMAGES = 10_000
HOLDOUT_TEXT_FRACTION = 0.05


def _float_map(text: str, names=train_lib.OPTIMIZERS) -> dict[str, float]:
  """``'mac=0.3,adamw=3e-3'`` -> ``{'mac': 0.3, 'adamw': 0.003}``."""
  out = {}
  for item in filter(None, text.split(',')):
    name, _, value = item.partition('=')
    if name not in names or not value:
      raise argparse.ArgumentTypeError(
          f'expected optimizer=value with optimizer in {names}, got {item!r}')
    out[name] = float(value)
  return out


def _grid_map(text: str, names=train_lib.OPTIMIZERS
              ) -> dict[str, tuple[float, ...]]:
  """``'mac=0.1:0.3,sgd=0.1'`` -> ``{'mac': (0.1, 0.3), 'sgd': (0.1,)}``."""
  out = {}
  for item in filter(None, text.split(',')):
    name, _, values = item.partition('=')
    if name not in names or not values:
      raise argparse.ArgumentTypeError(
          f'expected optimizer=lr:lr:... with optimizer in {names}, got'
          f' {item!r}')
    out[name] = tuple(float(v) for v in values.split(':'))
  return out


def _adam_float_map(text: str) -> dict[str, float]:
  return _float_map(text, train_lib.TWO_RATES)


def _adam_grid_map(text: str) -> dict[str, tuple[float, ...]]:
  return _grid_map(text, train_lib.TWO_RATES)


def _defaults_help() -> str:
  lines = ['defaults per model (peak learning rates; the README says which'
           ' came from --sweep):']
  for name, d in DEFAULTS.items():
    size = (f'width {d.width}, depth {d.depth}'
            + (f', {d.heads} heads' if d.heads else '')
            + (f', patch {d.patch}' if d.patch else '')
            + (f', context {d.context}' if d.context else ''))
    budget = (f'{d.epochs:g} epochs' if d.epochs else f'{d.steps} steps')
    lrs = ', '.join(
        f'{k}={v:g}' + (f'/{d.adam_learning_rates[k]:g}'
                        if k in d.adam_learning_rates else '')
        for k, v in d.learning_rates.items())
    lines.append(f'  {name}: {d.dataset}; {size}; batch {d.batch_size},'
                 f' {budget}; {lrs}')
  lines.append('  (rate/rate: the optimizer\'s own rate / its Adam part\'s)')
  labels = ', '.join(f'{k} ({v})'
                     for k, v in train_lib.OPTIMIZER_LABELS.items())
  lines.append(f'optimizers: {labels}')
  return '\n'.join(lines)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m mac_optax.demo',
      description=__doc__.replace('``', ''),
      epilog=_defaults_help(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', choices=tasks_lib.MODELS, default='vit',
                 help='default: vit')
  p.add_argument('--dataset', choices=('fashion_mnist', 'digits',
                                       'shakespeare'),
                 help="default: the model's (fashion_mnist or shakespeare)")
  p.add_argument('--data-dir', help='Fashion-MNIST folder (default:'
                 f' ${data_lib.FASHION_MNIST_ENV}, then'
                 f' {data_lib.FASHION_MNIST_DEBIAN_DIR})')
  p.add_argument('--optimizers',
                 help='comma-separated subset of'
                 f' {",".join(train_lib.OPTIMIZERS)} (default:'
                 f' {",".join(DEFAULT_OPTIMIZERS)}; K-FAC, slow on a CPU,'
                 ' shows its error where it cannot run the model)')
  p.add_argument('--seeds', type=int, default=1,
                 help='runs per optimizer (seeds 0..N-1): mean ± std')
  p.add_argument('--epochs', type=float,
                 help='image models: passes over the training set')
  p.add_argument('--steps', type=int, help='optimizer steps (overrides'
                 ' --epochs)')
  p.add_argument('--batch-size', type=int)
  p.add_argument('--width', type=int, help='ViT/GPT/BERT width, CNN channels')
  p.add_argument('--depth', type=int, help='transformer blocks, CNN stages')
  p.add_argument('--heads', type=int)
  p.add_argument('--patch', type=int, help='ViT patch side')
  p.add_argument('--context', type=int, help='GPT/BERT sequence length')
  p.add_argument('--lr', type=_float_map, default={},
                 help='peak learning rates, e.g. mac=0.3,adamw=3e-3'
                 " (default: the model's, below)")
  p.add_argument('--adam-lr', type=_adam_float_map, default={},
                 help='peak Adam rates of the two-rate optimizers, e.g.'
                 ' muon=3e-3,mac_adamw=1e-2 (default: the model\'s)')
  p.add_argument('--first-layer', action=argparse.BooleanOptionalAction,
                 help="MAC: the reference's exact first-layer factor, from"
                 " one pass over the training images (default: the model's)")
  p.add_argument('--evals', type=int,
                 help="evaluations per run, points on the curves (default:"
                 f" the model's; {SWEEP_EVALS} with --sweep)")
  p.add_argument('--train-limit', type=int,
                 help='use only this many training images / characters'
                 ' (quick checks; the budget stays as given)')
  p.add_argument('--test-limit', type=int,
                 help='evaluate on only this many test images')
  p.add_argument('--sweep', action='store_true',
                 help='tune learning rates on a held-out split of the'
                 ' training set instead of training on all of it')
  p.add_argument('--grid', type=_grid_map, default={},
                 help='sweep grids, e.g. mac=0.1:0.3:1,adamw=1e-3:3e-3')
  p.add_argument('--adam-grid', type=_adam_grid_map, default={},
                 help='Adam-rate grids of the two-rate optimizers, e.g.'
                 ' muon=1e-3:3e-3; they sweep the product of both grids')
  p.add_argument('--target', type=float, help='time-to-target level (accuracy'
                 ' in %% or loss; default: the weakest final mean)')
  p.add_argument('--out', default='mac_optax_demo',
                 help='folder for the PNG and JSON (default: mac_optax_demo)')
  p.add_argument('--device', choices=('cpu', 'gpu', 'tpu'),
                 help='JAX platform (default: JAX picks)')
  p.add_argument('--no-progress', action='store_true',
                 help='no progress bars')
  return p


def _configure(args) -> tuple[Defaults, dict]:
  """The model's defaults, overridden by the flags."""
  defaults = DEFAULTS[args.model]
  dataset = args.dataset or defaults.dataset
  if dataset not in tasks_lib.DATASETS[args.model]:
    raise SystemExit(f'--model {args.model} trains on'
                     f' {" or ".join(tasks_lib.DATASETS[args.model])},'
                     f' not {dataset}.')
  pick = lambda name: (getattr(args, name) if getattr(args, name) is not None
                       else getattr(defaults, name))
  config = {name: pick(name) for name in ('width', 'depth', 'heads', 'patch',
                                         'context', 'batch_size')}
  config['dataset'] = dataset
  return defaults, config


def build_task(model: str, config: dict, *, sweep: bool = False,
               data_dir: str | None = None, train_limit: int | None = None,
               test_limit: int | None = None) -> tuple[tasks_lib.Task, int]:
  """The task and the size of its full training set (for epochs).

  With ``sweep``, the eval set is split off the training set.
  """
  dataset = config['dataset']
  if model in ('vit', 'cnn'):
    images = data_lib.load_images(dataset, data_dir)
    full_size = len(images.y_train)
    eval_name = 'test'
    if sweep:
      holdout = min(HOLDOUT_IMAGES, full_size // 6)
      images = data_lib.holdout_images(images, holdout)
      eval_name = 'held-out'
    if train_limit:
      images = dataclasses.replace(images, x_train=images.x_train[:train_limit],
                                   y_train=images.y_train[:train_limit])
    if test_limit:
      images = dataclasses.replace(images, x_test=images.x_test[:test_limit],
                                   y_test=images.y_test[:test_limit])
    task = tasks_lib.image_task(
        model, images, width=config['width'], depth=config['depth'],
        heads=config['heads'], patch=config['patch'], eval_name=eval_name)
    return task, full_size
  text = data_lib.load_shakespeare(max_chars=train_limit)
  eval_name = 'test'
  if sweep:
    text = data_lib.holdout_text(text, HOLDOUT_TEXT_FRACTION)
    eval_name = 'held-out'
  task = tasks_lib.text_task(
      model, text, width=config['width'], depth=config['depth'],
      heads=config['heads'], context=config['context'], eval_name=eval_name)
  return task, len(text.train)


def make_budget(steps: int, batch_size: int, evals: int) -> train_lib.Budget:
  """The shared budget: 5% linear warmup, cosine to 0, ``evals`` evaluations."""
  return train_lib.Budget(
      steps=steps, batch_size=batch_size,
      warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
      eval_every=max(1, steps // max(evals, 1)))


def compare(task: tasks_lib.Task, learning_rates: dict[str, float],
            budget: train_lib.Budget, seeds: int = 1, progress: bool = True,
            first_layer: bool = False,
            adam_learning_rates: dict[str, float] | None = None,
            ) -> dict[str, list[train_lib.History]]:
  """Trains each optimizer for each seed; ``{optimizer: [History]}``.

  Seeds run in the outer loop, so an interrupted run has every optimizer at
  the same number of seeds.

  Args:
    task: what to train.
    learning_rates: ``{optimizer: peak learning rate}``.
    budget: the budget every run gets.
    seeds: runs per optimizer, seeds ``0 .. seeds - 1``.
    progress: tqdm bars.
    first_layer: MAC's first-layer factor (see ``training.train``).
    adam_learning_rates: ``{optimizer: peak Adam rate}`` for the optimizers
      in ``training.TWO_RATES``.

  Returns:
    ``{optimizer: [History per seed]}``.
  """
  adam_learning_rates = adam_learning_rates or {}
  runs = {name: [] for name in learning_rates}
  for seed in range(seeds):
    for name, lr in learning_rates.items():
      runs[name].append(train_lib.train(
          task, name, lr, budget, seed, progress, first_layer=first_layer,
          adam_learning_rate=adam_learning_rates.get(name)))
  return runs


def save_runs(path: str, runs, config: dict) -> None:
  with open(path, 'w') as f:
    json.dump({'config': config,
               'runs': {k: [h.to_json() for h in v] for k, v in runs.items()}},
              f, indent=1)


def load_runs(path: str) -> tuple[dict, dict[str, list[train_lib.History]]]:
  """``(config, runs)`` from a JSON written by the demo."""
  with open(path) as f:
    saved = json.load(f)
  runs = {k: [train_lib.History.from_json(h) for h in v]
          for k, v in saved['runs'].items()}
  return saved['config'], runs


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the demo; returns ``{'runs', 'config', 'png', 'json'}``."""
  args = parser().parse_args(argv)
  if args.device:
    # Before anything touches a backend.
    jax.config.update('jax_platforms', args.device)

  defaults, config = _configure(args)
  optimizers = ([o for o in args.optimizers.split(',') if o]
                if args.optimizers else list(DEFAULT_OPTIMIZERS))
  unknown = set(optimizers) - set(train_lib.OPTIMIZERS)
  if unknown:
    raise SystemExit(f'unknown optimizers {sorted(unknown)}; choose from'
                     f' {train_lib.OPTIMIZERS}.')
  try:
    task, train_size = build_task(
        args.model, config, sweep=args.sweep, data_dir=args.data_dir,
        train_limit=args.train_limit, test_limit=args.test_limit)
  except FileNotFoundError as e:
    raise SystemExit(f'error: {e}') from None
  if args.steps is not None:
    steps = args.steps
  elif args.epochs is not None or defaults.epochs is not None:
    if args.model in ('gpt', 'bert'):
      raise SystemExit('--epochs applies to image models; use --steps.')
    epochs = args.epochs if args.epochs is not None else defaults.epochs
    # Epochs of the full training set, so a sweep's held-out runs take the
    # same steps (and schedule) as the final runs.
    steps = max(1, int(epochs * (train_size // config['batch_size'])))
  else:
    steps = defaults.steps
  evals = args.evals or (SWEEP_EVALS if args.sweep else defaults.evals)
  first_layer = (defaults.first_layer if args.first_layer is None
                 else args.first_layer)
  if first_layer and task.epoch_inputs is None:
    raise SystemExit(f'--first-layer needs image data; {args.model} has no'
                     ' first-layer pass.')
  budget = make_budget(steps, config['batch_size'], evals)
  config.update(model=args.model, steps=steps, first_layer=first_layer,
                warmup_steps=budget.warmup_steps, sweep=args.sweep,
                seeds=args.seeds, train_limit=args.train_limit,
                mac_hparams=train_lib.MAC_HPARAMS,
                sgd_hparams=train_lib.SGD_HPARAMS,
                adamw_hparams=train_lib.ADAMW_HPARAMS,
                muon_hparams=train_lib.MUON_HPARAMS,
                kfac_hparams=kfac_lib.KFAC_HPARAMS,
                device=jax.devices()[0].device_kind,
                platform=jax.devices()[0].platform, jax=jax.__version__)
  os.makedirs(args.out, exist_ok=True)
  stem = f'{"sweep_" if args.sweep else ""}{args.model}_{config["dataset"]}'
  print(f'{args.model} on {config["dataset"]}: {steps} steps of'
        f' {config["batch_size"]} {task.units} ({budget.warmup_steps} warmup,'
        f' cosine){", MAC with first-layer factor" if first_layer else ""},'
        f' on {config["device"]} (jax {jax.__version__})', flush=True)

  start = time.perf_counter()
  if args.sweep:
    grids = {o: args.grid.get(o, defaults.grids[o]) for o in optimizers}
    adam_grids = {o: args.adam_grid.get(o, defaults.adam_grids[o])
                  for o in optimizers if o in train_lib.TWO_RATES}
    config.update(grids=grids, adam_grids=adam_grids)
    runs = train_lib.sweep(task, grids, budget, seed=0,
                           progress=not args.no_progress,
                           first_layer=first_layer, adam_grids=adam_grids)
    chosen = {o: train_lib.best_learning_rate(h) for o, h in runs.items()}
    config['best'] = {o: h.learning_rate for o, h in chosen.items()}
    config['best_adam'] = {o: h.adam_learning_rate for o, h in chosen.items()
                           if h.adam_learning_rate is not None}
    print('\n' + report.sweep_table(runs))
    print('\nchosen: ' + ', '.join(f'{o}={h.rates.replace(" ", "")}'
                                   for o, h in chosen.items()))
  else:
    lrs = {o: args.lr.get(o, defaults.learning_rates[o]) for o in optimizers}
    adam_lrs = {o: args.adam_lr.get(o, defaults.adam_learning_rates[o])
                for o in optimizers if o in train_lib.TWO_RATES}
    config.update(learning_rates=lrs, adam_learning_rates=adam_lrs)
    runs = compare(task, lrs, budget, args.seeds,
                   progress=not args.no_progress, first_layer=first_layer,
                   adam_learning_rates=adam_lrs)
    target = args.target
    if target is not None and task.metric == 'accuracy':
      target /= 100.0
    print('\n' + report.results_table(runs))
    print('\n' + report.time_to_target_table(runs, target))
  json_path = os.path.join(args.out, stem + '.json')
  save_runs(json_path, runs, config)
  png_path = None
  if not args.sweep:
    from mac_optax.demo import plots  # pylint: disable=g-import-not-at-top
    png_path = plots.plot_runs(
        runs, os.path.join(args.out, stem + '.png'),
        title=f'{_LABELS[args.model]} on {_LABELS[config["dataset"]]},'
        f' {steps} steps')
  print(f'\n{time.perf_counter() - start:.0f} s in all; wrote {json_path}'
        + (f' and {png_path}' if png_path else ''), flush=True)
  return {'runs': runs, 'config': config, 'json': json_path, 'png': png_path}


if __name__ == '__main__':
  main(sys.argv[1:])
