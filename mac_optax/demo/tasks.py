"""Training tasks: a model, how to draw training batches, a fixed eval set.

Every batch is a dict of ``inputs``, ``targets`` and ``weights``; the loss is
the weighted mean cross-entropy, so image classification (one weight per
image), causal language modelling (one per position) and masked language
modelling (one per masked position) share one training loop.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import flax.linen as nn
import numpy as np

from mac_optax.demo import data as data_lib
from mac_optax.demo import models

Batch = dict[str, np.ndarray]
MODELS = ('vit', 'cnn', 'gpt', 'bert')
DATASETS = {'vit': ('fashion_mnist', 'digits'),
            'cnn': ('fashion_mnist', 'digits'),
            'gpt': ('shakespeare',),
            'bert': ('shakespeare',)}
MASK_RATE = 0.15


@dataclasses.dataclass
class Task:
  """What to train and how to judge it.

  Attributes:
    name: e.g. ``'vit'``.
    model: the Flax module.
    example: a small input batch, for ``init`` and ``find_layers``.
    batches: ``batches(rng, batch_size)`` yields training batches forever.
    eval_batches: the fixed evaluation set, in equal-shaped batches (padding
      rows have weight 0).
    metric: the eval number that judges a run, ``'accuracy'`` or ``'loss'``.
    eval_name: what the eval set is, e.g. ``'test'`` or ``'held-out'``.
    units: what a batch row is, for examples/s (``'images'``,
      ``'sequences'``).
    epoch_inputs: ``epoch_inputs(batch_size)`` yields the model inputs of one
      pass over the training set, in order (for MAC's first-layer factor);
      None where there is no such pass.
  """

  name: str
  model: nn.Module
  example: np.ndarray
  batches: Callable[[np.random.Generator, int], Iterator[Batch]]
  eval_batches: list[Batch]
  metric: str
  eval_name: str
  units: str
  epoch_inputs: Callable[[int], Iterator[np.ndarray]] | None = None


def _chunk(inputs, targets, weights, size) -> list[Batch]:
  """Cuts arrays into equal batches, padding the last one with weight 0."""
  n = len(inputs)
  pad = -n % size
  if pad:
    inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, 0)])
    targets = np.concatenate([targets, np.repeat(targets[-1:], pad, 0)])
    weights = np.concatenate([weights, np.zeros_like(weights[:pad])])
  return [{'inputs': inputs[i:i + size], 'targets': targets[i:i + size],
           'weights': weights[i:i + size]} for i in range(0, n + pad, size)]


def _image_batches(x, y):
  def batches(rng, batch_size):
    weights = np.ones(batch_size, np.float32)
    while True:
      order = rng.permutation(len(x))
      for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield {'inputs': x[idx], 'targets': y[idx], 'weights': weights}
  return batches


def image_task(name: str, images: data_lib.ImageData, *, width: int,
               depth: int, heads: int, patch: int,
               eval_name: str = 'test', eval_batch: int = 1000) -> Task:
  """Classification with ``'vit'`` or ``'cnn'``.

  Args:
    name: ``'vit'`` or ``'cnn'``.
    images: the data; its test set is the eval set.
    width: ViT width, or the CNN's first-stage channels.
    depth: ViT blocks, or CNN stages.
    heads: ViT attention heads (unused by the CNN).
    patch: ViT patch side (unused by the CNN).
    eval_name: what the eval set is called in tables and plots.
    eval_batch: eval batch size.

  Returns:
    The :class:`Task`.
  """
  classes = len(images.classes)
  if name == 'vit':
    model = models.ViT(width, depth, heads, patch, classes)
  elif name == 'cnn':
    model = models.CNN(width, depth, classes)
  else:
    raise ValueError(f'unknown image model {name!r}.')
  eval_batch = min(eval_batch, len(images.y_test))
  evals = _chunk(images.x_test, images.y_test,
                 np.ones(len(images.y_test), np.float32), eval_batch)
  def epoch_inputs(batch_size):
    for i in range(0, len(images.x_train), batch_size):
      yield images.x_train[i:i + batch_size]

  return Task(name, model, images.x_train[:2],
              _image_batches(images.x_train, images.y_train), evals,
              'accuracy', eval_name, 'images', epoch_inputs)


def _causal_windows(text, starts, context):
  idx = starts[:, None] + np.arange(context + 1)
  window = text[idx].astype(np.int32)
  return window[:, :-1], window[:, 1:]


def _gpt_batches(text, context):
  def batches(rng, batch_size):
    weights = np.ones((batch_size, context), np.float32)
    while True:
      starts = rng.integers(0, len(text) - context - 1, batch_size)
      inputs, targets = _causal_windows(text, starts, context)
      yield {'inputs': inputs, 'targets': targets, 'weights': weights}
  return batches


def masked_windows(text, rng, batch_size, context, text_vocab, pad_id,
                   mask_id, mask_rate=MASK_RATE) -> Batch:
  """BERT-style batch: variable-length windows, padded, 15% masked.

  Each row is a window of the text whose length is drawn uniformly from
  ``[context // 4, context]``, padded with ``pad_id`` to ``context``. Each
  real position is chosen with probability ``mask_rate``; a chosen position's
  input becomes ``mask_id`` (80%), a random character (10%) or stays (10%),
  and only chosen positions carry loss weight.

  Args:
    text: character ids.
    rng: numpy generator.
    batch_size: rows.
    context: padded length.
    text_vocab: number of real characters (random replacements come from
      ``[0, text_vocab)``).
    pad_id: padding token.
    mask_id: mask token.
    mask_rate: share of real positions chosen.

  Returns:
    A batch dict.
  """
  lengths = rng.integers(context // 4, context + 1, batch_size)
  starts = rng.integers(0, len(text) - context, batch_size)
  tokens = text[starts[:, None] + np.arange(context)].astype(np.int32)
  real = np.arange(context)[None] < lengths[:, None]
  tokens = np.where(real, tokens, pad_id)
  chosen = (rng.random(tokens.shape) < mask_rate) & real
  action = rng.random(tokens.shape)
  inputs = np.where(chosen & (action < 0.8), mask_id, tokens)
  swap = chosen & (action >= 0.8) & (action < 0.9)
  inputs = np.where(swap, rng.integers(0, text_vocab, tokens.shape), inputs)
  return {'inputs': inputs.astype(np.int32), 'targets': tokens,
          'weights': chosen.astype(np.float32)}


def text_task(name: str, text: data_lib.TextData, *, width: int, depth: int,
              heads: int, context: int, eval_name: str = 'test',
              eval_windows: int = 256, eval_batch: int = 64) -> Task:
  """Character LM with ``'gpt'`` (causal) or ``'bert'`` (masked).

  The eval set is ``eval_windows`` windows spread evenly over the test text
  (for BERT with fixed random lengths and masks), so every run is judged on
  the same characters.

  Args:
    name: ``'gpt'`` or ``'bert'``.
    text: the corpus; its test text is the eval set.
    width: model width.
    depth: transformer blocks.
    heads: attention heads.
    context: sequence length.
    eval_name: what the eval set is called in tables and plots.
    eval_windows: number of eval sequences.
    eval_batch: eval batch size.

  Returns:
    The :class:`Task`.
  """
  vocab = len(text.vocab)
  starts = np.linspace(0, len(text.test) - context - 2, eval_windows)
  starts = starts.astype(np.int64)
  if name == 'gpt':
    model = models.GPT(vocab, width, depth, heads, context)
    inputs, targets = _causal_windows(text.test, starts, context)
    weights = np.ones(inputs.shape, np.float32)
    batches = _gpt_batches(text.train, context)
  elif name == 'bert':
    pad_id, mask_id = vocab, vocab + 1
    model = models.BERT(vocab + 2, pad_id, width, depth, heads, context)
    fixed = masked_windows(text.test, np.random.default_rng(0), eval_windows,
                           context, vocab, pad_id, mask_id)
    inputs, targets, weights = (fixed['inputs'], fixed['targets'],
                                fixed['weights'])

    def batches(rng, batch_size):
      while True:
        yield masked_windows(text.train, rng, batch_size, context, vocab,
                             pad_id, mask_id)
  else:
    raise ValueError(f'unknown text model {name!r}.')
  evals = _chunk(inputs, targets, weights, min(eval_batch, eval_windows))
  return Task(name, model, inputs[:2], batches, evals, 'loss', eval_name,
              'sequences')
