"""Matplotlib figure of demo runs: eval metric and train loss vs time and steps."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mac_optax.demo import training as train_lib

DPI = 110
COLORS = {'mac': 'tab:red', 'adamw': 'tab:blue', 'sgd': 'tab:green',
          'mac_adamw': 'tab:orange', 'pre_muon': 'tab:pink',
          'pre_adamw': 'tab:brown', 'muon': 'tab:purple', 'kfac': 'tab:gray'}


def _band(ax, x, values, color, label):
  """Mean line with a min-max band over seeds."""
  values = np.asarray(values, np.float64)
  mean = np.nanmean(values, axis=0)
  ax.plot(x, mean, color=color, label=label, lw=1.8)
  if len(values) > 1:
    ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0),
                    color=color, alpha=0.2, lw=0)


def make_figure(runs: Mapping[str, Sequence[train_lib.History]],
                title: str = ''):
  """A 2x2 matplotlib figure: eval metric (top) and train loss (bottom),
  against training wall-clock (left) and steps (right).

  Lines are means over seeds, bands their min-max. Wall-clock is each
  optimizer's mean over seeds at each evaluation.

  Args:
    runs: ``{optimizer: [History per seed]}``, all of one task. Runs that
      failed (``History.error``) have no curves and are left out.
    title: figure title.

  Returns:
    The ``matplotlib.figure.Figure`` (not shown; close it when done).
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

  runs = {name: [h for h in histories if not h.error]
          for name, histories in runs.items()}
  runs = {name: histories for name, histories in runs.items() if histories}

  first = next(iter(runs.values()))[0]
  scale = 100.0 if first.metric == 'accuracy' else 1.0
  metric_label = (f'{first.eval_name} accuracy (%)' if first.metric ==
                  'accuracy' else f'{first.eval_name} loss')
  fig = figure.Figure(figsize=(11, 7.5), layout='constrained')
  axes = fig.subplots(2, 2)
  for name, histories in runs.items():
    color = COLORS.get(name)
    label = (f'{train_lib.OPTIMIZER_LABELS[name]} '
             f'(lr {histories[0].rates})')
    steps = np.asarray(histories[0].steps)
    seconds = np.mean([h.seconds for h in histories], axis=0)
    curves = [scale * np.asarray(h.curve) for h in histories]
    losses = [h.train_loss for h in histories]
    for col, x in enumerate((seconds, steps)):
      _band(axes[0, col], x, curves, color, label)
      # Step 0 has no training loss yet.
      _band(axes[1, col], x[1:], [l[1:] for l in losses], color, label)
  for row, ylabel in enumerate((metric_label, 'train loss')):
    for col, xlabel in enumerate(('training wall-clock (s)', 'steps')):
      ax = axes[row, col]
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
  if first.metric == 'accuracy':
    # Zoom on the interesting part: from the first real progress upwards.
    finals = [scale * h.final for hs in runs.values() for h in hs]
    low = max(0.0, min(finals) - 25.0)
    for ax in axes[0]:
      ax.set_ylim(low, min(100.0, max(finals) + 2.0))
  else:
    for ax in axes[0]:
      top = max(np.nanmedian(h.curve) for hs in runs.values() for h in hs)
      low = min(min(h.curve) for hs in runs.values() for h in hs)
      ax.set_ylim(low - 0.05 * (top - low), top)
  axes[0, 0].legend(loc='best')
  seeds = len(next(iter(runs.values())))
  fig.suptitle(f'{title} ({seeds} seed{"s" * (seeds > 1)}; '
               f'band: min-max over seeds)' if title else '')
  return fig


def plot_runs(runs: Mapping[str, Sequence[train_lib.History]], path: str,
              title: str = '') -> str:
  """Writes :func:`make_figure`'s figure as a PNG at ``path``; returns it."""
  make_figure(runs, title).savefig(path, dpi=DPI)
  return path
