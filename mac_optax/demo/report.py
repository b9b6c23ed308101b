"""Tables of demo runs: mean ± spread over seeds, time to a target.

>>> print(markdown_table(('a', 'b'), [('1', '2')]))
| a | b |
|---|---|
| 1 | 2 |
>>> mean_spread([0.8, 0.9, 1.0], '.2f')
'0.90 ± 0.10'
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from mac_optax.demo import training as train_lib

History = train_lib.History
Runs = Mapping[str, Sequence[History]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table."""
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def mean_spread(values: Sequence[float], fmt: str) -> str:
  """``mean ± std`` (sample standard deviation; the mean alone for one run)."""
  values = np.asarray(values, np.float64)
  mean = format(float(np.mean(values)), fmt)
  if len(values) < 2:
    return mean
  return f'{mean} ± {format(float(np.std(values, ddof=1)), fmt)}'


def _metric_format(metric: str) -> tuple[float, str]:
  """(scale, format): accuracy in percent, loss in nats."""
  return (100.0, '.2f') if metric == 'accuracy' else (1.0, '.3f')


def results_table(runs: Runs) -> str:
  """Final eval metric, final train loss, wall-clock and steps/s per optimizer.

  Args:
    runs: ``{optimizer: [History per seed]}``, all of one task.

  Returns:
    A markdown table, one row per optimizer.
  """
  first = next(iter(runs.values()))[0]
  scale, fmt = _metric_format(first.metric)
  unit = ' (%)' if first.metric == 'accuracy' else ''
  header = ('optimizer', 'lr', f'final {first.eval_name} {first.metric}{unit}',
            'final train loss', 'train s', 'steps/s', 'seeds')
  rows = []
  for name, histories in runs.items():
    failed = [h for h in histories if h.error]
    if failed:
      rows.append((train_lib.OPTIMIZER_LABELS[name], histories[0].rates,
                   f'failed: {failed[0].error}', '—', '—', '—',
                   f'0/{len(histories)}'))
      continue
    rows.append((
        train_lib.OPTIMIZER_LABELS[name],
        histories[0].rates,
        mean_spread([scale * h.final for h in histories], fmt),
        mean_spread([h.train_loss[-1] for h in histories], '.3f'),
        mean_spread([h.train_seconds for h in histories], '.0f'),
        mean_spread([h.steps_per_second for h in histories], '.1f'),
        str(len(histories)),
    ))
  return markdown_table(header, rows)


def reached(history: History, target: float) -> tuple[float, float]:
  """(steps, seconds) at the first evaluation at or past ``target``.

  Both are ``inf`` if the run never gets there.
  """
  for steps, seconds, value in zip(history.steps, history.seconds,
                                   history.curve):
    if (value >= target if history.metric == 'accuracy' else value <= target):
      return float(steps), float(seconds)
  return math.inf, math.inf


def default_target(runs: Runs) -> float:
  """The weakest optimizer's mean final metric: a level every one reaches.

  Optimizers that failed to run (``History.error``) do not count.
  """
  finals = [np.mean([h.final for h in hs]) for hs in runs.values()
            if not any(h.error for h in hs)]
  metric = next(iter(runs.values()))[0].metric
  return float(min(finals) if metric == 'accuracy' else max(finals))


def time_to_target_table(runs: Runs, target: float | None = None) -> str:
  """Steps and training seconds until the eval metric first reaches a target.

  Args:
    runs: ``{optimizer: [History per seed]}``, all of one task.
    target: the level; by default :func:`default_target`.

  Returns:
    A markdown table (mean ± spread over the seeds that got there, and how
    many did).
  """
  if target is None:
    target = default_target(runs)
  first = next(iter(runs.values()))[0]
  scale, fmt = _metric_format(first.metric)
  sign = '≥' if first.metric == 'accuracy' else '≤'
  rows = []
  for name, histories in runs.items():
    if any(h.error for h in histories):
      rows.append((train_lib.OPTIMIZER_LABELS[name], 'failed', 'failed',
                   f'0/{len(histories)}'))
      continue
    hits = [reached(h, target) for h in histories]
    done = [hit for hit in hits if math.isfinite(hit[0])]
    rows.append((
        train_lib.OPTIMIZER_LABELS[name],
        mean_spread([s for s, _ in done], '.0f') if done else 'never',
        mean_spread([t for _, t in done], '.1f') if done else 'never',
        f'{len(done)}/{len(hits)}',
    ))
  header = (f'to {first.eval_name} {first.metric} {sign} '
            f'{format(scale * target, fmt)}', 'steps', 'train s', 'reached')
  return markdown_table(header, rows)


def sweep_table(results: Runs) -> str:
  """Held-out metric per learning rate; the chosen one in bold.

  Args:
    results: ``{optimizer: [History per learning rate]}`` from ``sweep``.

  Returns:
    A markdown table, one row per optimizer.
  """
  first = next(iter(results.values()))[0]
  scale, fmt = _metric_format(first.metric)
  rows = []
  for name, histories in results.items():
    best = train_lib.best_learning_rate(histories)
    cells = []
    for h in histories:
      value = (f'failed ({h.error})' if h.error
               else format(scale * h.final, fmt))
      cell = f'{h.rates}: {value}'
      cells.append(f'**{cell}**' if h is best else cell)
    rows.append((train_lib.OPTIMIZER_LABELS[name], ', '.join(cells)))
  header = ('optimizer', f'lr (/ Adam lr): final {first.eval_name}'
            f' {first.metric}')
  return markdown_table(header, rows)
