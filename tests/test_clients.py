"""MAC inside the training code people run, rewritten small.

Each test follows the pattern of a well-known training script, written anew
for this project at a tiny size with synthetic data, changing only what the
README says to change:

* flax's ``TrainState``: :class:`mac_optax.TrainState`, the mixin and the
  function form take one optimizer step exactly as ``tx.update`` does;
* an lm1b-style decoder LM: parameters boxed by
  ``nn.with_logical_partitioning``, dropout rngs, bf16 compute with fp32
  parameters, causal self-attention with a padding mask, trained through
  ``TrainState``: the updates equal those of the same model with plain
  parameters, and the logical axis names survive;
* an imagenet-style ResNet under ``jax.pmap`` with ``BatchNorm(axis_name=
  'batch')`` and ``lax.pmean`` of the gradients (run in a subprocess with two
  forced CPU devices, ``clients_worker.py``): equal to one device on the
  concatenated batch;
* a MaxText-style scanned decoder stack (``nn.scan`` over layers with
  ``variable_axes={'params': 0}``, with and without ``'intermediates'``, and
  the stacked parameters' logical axis named ``'layers'``): its per-layer
  statistics and updates equal those of the same layers unrolled.
"""

import functools
import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax

WORKER = os.path.join(os.path.dirname(__file__), 'clients_worker.py')


def _kernel_modules(params):
  """Module paths of every parameter leaf named 'kernel' (boxed or not)."""
  flat = jax.tree_util.tree_flatten_with_path(
      nn.unbox(params), is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  paths = []
  for path, _ in flat:
    keys = tuple(getattr(k, 'key', getattr(k, 'name', None)) for k in path)
    if keys[-1] == 'kernel':
      paths.append(keys[:-1])
  return paths


def _jit(fn):
  """jax.jit, on CPU without XLA's backend optimisations: they double the
  compile time of these tiny models, and both sides of every comparison are
  compiled alike."""
  cpu = jax.default_backend() == 'cpu'
  return jax.jit(fn, compiler_options=(
      {'xla_backend_optimization_level': 0} if cpu else None))


def _assert_trees_close(actual, expected, atol, what, rtol=0.0):
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
  assert [p for p, _ in actual_leaves] == [p for p, _ in expected_leaves], what
  for (path, a), (_, b) in zip(actual_leaves, expected_leaves):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol,
        atol=atol, err_msg=f'{what} {jax.tree_util.keystr(path)}')


# --- TrainState -------------------------------------------------------------


class _TwoLayer(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='out')(jnp.tanh(nn.Dense(5, name='hidden')(x)))


def _small_problem():
  model = _TwoLayer()
  x = jax.random.normal(jax.random.key(1), (6, 4)) + 0.5
  y = jax.random.normal(jax.random.key(2), (6, 3))
  params = model.init(jax.random.key(0), x)['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, x)
  apply_with_stats = mac_optax.capture(model.apply)

  @jax.jit
  def grads_and_stats(params):
    def loss_fn(params):
      out, stats = apply_with_stats({'params': params}, x)
      return jnp.mean((out - y) ** 2), stats
    return jax.grad(loss_fn, has_aux=True)(params)

  return model, params, layers, grads_and_stats


def _by_hand(tx, params, grads_and_stats, steps):
  """The optimizer loop written with tx.update, as in the quickstart."""
  @jax.jit
  def step(params, opt_state, grads, stats):
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state, *grads_and_stats(params))
  return params, opt_state


@jax.jit
def _train_state_step(state, grads, stats):
  return state.apply_gradients(grads=grads, mac_stats=stats)


def test_train_state_steps_exactly_like_tx_update():
  model, params, layers, grads_and_stats = _small_problem()
  tx = mac_optax.mac(0.1, layers=layers, t_cov=1, t_inv=2, damping=0.5)
  expected_params, expected_state = _by_hand(tx, params, grads_and_stats, 3)

  state = mac_optax.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=tx)
  assert isinstance(state, train_state.TrainState)
  for _ in range(3):
    state = _train_state_step(state, *grads_and_stats(state.params))
  assert int(state.step) == 3
  _assert_trees_close(state.params, expected_params, 0, 'params')
  _assert_trees_close(state.opt_state, expected_state, 0, 'opt_state')
  # The statistics reached MAC: three captures, both layers' EMAs non-zero.
  mac_state = state.opt_state[0]
  assert int(mac_state.stat_count) == 3
  assert all(np.abs(ema).max() > 0.1
             for ema in jax.tree.leaves(mac_state.mean_input_ema))


def test_flax_train_state_cannot_pass_the_statistics():
  """Why mac_optax.TrainState exists: flax's step gives tx.update no stats."""
  model, params, layers, grads_and_stats = _small_problem()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=mac_optax.mac(0.1, layers=layers))
  grads, _ = grads_and_stats(params)
  with pytest.raises(ValueError,
                     match='needs the layer statistics.*mac_optax.TrainState'):
    state.apply_gradients(grads=grads)


class _StateWithBatchStats(mac_optax.TrainStateMixin, train_state.TrainState):
  """A user's own TrainState subclass, as imagenet's, with the mixin added."""

  batch_stats: Any = None


def test_mixin_function_and_subclass_agree_and_replace_fields():
  model, params, layers, grads_and_stats = _small_problem()
  tx = mac_optax.mac(0.1, layers=layers, t_cov=1, t_inv=1)
  marker = {'mean': jnp.arange(3.0)}
  states = [
      _StateWithBatchStats.create(apply_fn=model.apply, params=params, tx=tx,
                                  batch_stats={'mean': jnp.zeros(3)}),
      train_state.TrainState.create(apply_fn=model.apply, params=params,
                                    tx=tx),
  ]
  grads, stats = grads_and_stats(params)
  with_mixin = states[0].apply_gradients(grads=grads, mac_stats=stats,
                                         batch_stats=marker)
  # The function form works on flax's own class, unchanged.
  with_function = mac_optax.apply_gradients(states[1], grads=grads,
                                            mac_stats=stats)
  assert type(with_function) is train_state.TrainState
  np.testing.assert_array_equal(with_mixin.batch_stats['mean'],
                                marker['mean'])
  _assert_trees_close(with_mixin.params, with_function.params, 0, 'params')
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  _assert_trees_close(with_function.params,
                      optax.apply_updates(params, updates), 0, 'params')
  with pytest.raises(TypeError, match='sets params itself'):
    mac_optax.apply_gradients(states[1], grads=grads, mac_stats=stats,
                              params=params)


def _scale_by_factor():
  """A transformation that reads an extra tx.update argument, `factor`."""

  def update_fn(updates, state, params=None, *, factor, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda g: g * factor, updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def test_update_args_reach_tx_update_alongside_the_statistics():
  model, params, layers, grads_and_stats = _small_problem()
  tx = optax.chain(mac_optax.scale_by_mac(layers, 1.0, 0.95, 1, 1),
                   _scale_by_factor(), optax.scale(-0.1))
  state = mac_optax.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=tx)
  grads, stats = grads_and_stats(params)
  stepped = state.apply_gradients(grads=grads, mac_stats=stats,
                                  update_args={'factor': 3.0})
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats,
                         factor=3.0)
  _assert_trees_close(stepped.params, optax.apply_updates(params, updates), 0,
                      'params')
  with pytest.raises(TypeError, match='mac_stats both'):
    state.apply_gradients(grads=grads, mac_stats=stats,
                          update_args={'mac_stats': stats, 'factor': 1.0})


def test_fp8_overwrite_with_gradient_params_are_kept_from_the_optimizer():
  """Flax's fp8 layout: params {'params': ..., '_overwrite_with_gradient':
  ...}; the second part is set to its 'gradient' and never optimized."""
  model, params, layers, grads_and_stats = _small_problem()
  tx = mac_optax.mac(0.1, layers=layers)
  owg = '_overwrite_with_gradient'
  full = {'params': params, owg: {'amax_history': jnp.zeros(4)}}
  state = mac_optax.TrainState.create(apply_fn=model.apply, params=full,
                                      tx=tx)
  grads, stats = grads_and_stats(params)
  new_history = {'amax_history': jnp.arange(4.0)}
  state = state.apply_gradients(grads={'params': grads, owg: new_history},
                                mac_stats=stats)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  _assert_trees_close(state.params['params'],
                      optax.apply_updates(params, updates), 0, 'params')
  np.testing.assert_array_equal(state.params[owg]['amax_history'],
                                new_history['amax_history'])


# --- lm1b-style decoder LM --------------------------------------------------

VOCAB, WIDTH, HEADS, MLP, DEPTH, LENGTH, BATCH = 12, 16, 2, 32, 2, 8, 8


def _maybe_partitioned(boxed, init, names):
  """lm1b wraps every initializer in logical axis names; the twin does not."""
  return nn.with_logical_partitioning(init, names) if boxed else init


class _Mlp(nn.Module):
  boxed: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    init = nn.initializers.xavier_uniform()
    zeros = nn.initializers.zeros_init()
    y = nn.Dense(
        MLP, dtype=self.dtype, name='wi',
        kernel_init=_maybe_partitioned(self.boxed, init, ('embed', 'mlp')),
        bias_init=_maybe_partitioned(self.boxed, zeros, ('mlp',)))(x)
    y = nn.Dropout(0.1)(nn.relu(y), deterministic=deterministic)
    return nn.Dense(
        WIDTH, dtype=self.dtype, name='wo',
        kernel_init=_maybe_partitioned(self.boxed, init, ('mlp', 'embed')),
        bias_init=_maybe_partitioned(self.boxed, zeros, ('embed',)))(y)


class _DecoderBlock(nn.Module):
  """Pre-norm causal self-attention and MLP, with dropout, as lm1b's."""

  boxed: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, deterministic):
    part = functools.partial(_maybe_partitioned, self.boxed)
    ones = nn.initializers.ones_init()
    zeros = nn.initializers.zeros_init()
    init = nn.initializers.xavier_uniform()
    y = nn.LayerNorm(dtype=self.dtype, name='pre_attention_norm',
                     scale_init=part(ones, ('embed',)),
                     bias_init=part(zeros, ('embed',)))(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, dtype=self.dtype, dropout_rate=0.1,
        broadcast_dropout=False, deterministic=deterministic,
        kernel_init=part(init, ('embed', 'heads', 'kv')),
        out_kernel_init=part(init, ('heads', 'kv', 'embed')),
        bias_init=part(zeros, ('heads', 'kv')),
        out_bias_init=part(zeros, ('embed',)),
        name='attention')(y, mask=mask)
    x = x + nn.Dropout(0.1)(y, deterministic=deterministic)
    y = nn.LayerNorm(dtype=self.dtype, name='pre_mlp_norm',
                     scale_init=part(ones, ('embed',)),
                     bias_init=part(zeros, ('embed',)))(x)
    y = _Mlp(self.boxed, self.dtype, name='mlp')(y, deterministic)
    return x + nn.Dropout(0.1)(y, deterministic=deterministic)


class DecoderLM(nn.Module):
  """lm1b's TransformerLM in miniature: shifted inputs, learned positions."""

  boxed: bool = True
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, targets, train=False):
    part = functools.partial(_maybe_partitioned, self.boxed)
    # Teacher forcing: the decoder sees the targets shifted right by one.
    inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    mask = nn.combine_masks(
        nn.make_attention_mask(inputs > 0, inputs > 0, dtype=self.dtype),
        nn.make_causal_mask(inputs, dtype=self.dtype))
    x = nn.Embed(VOCAB, WIDTH, name='token_embed',
                 embedding_init=part(nn.initializers.normal(1.0),
                                     ('vocab', 'embed')))(inputs)
    position = self.param(
        'position_embedding',
        part(nn.initializers.normal(0.02), (None, 'length', 'embed')),
        (1, LENGTH, WIDTH))
    x = nn.Dropout(0.1)((x + position).astype(self.dtype),
                        deterministic=not train)
    for i in range(DEPTH):
      x = _DecoderBlock(self.boxed, self.dtype, name=f'block_{i}')(
          x, mask, not train)
    x = nn.LayerNorm(dtype=self.dtype, name='final_norm',
                     scale_init=part(nn.initializers.ones_init(), ('embed',)),
                     bias_init=part(nn.initializers.zeros_init(),
                                    ('embed',)))(x)
    logits = nn.Dense(
        VOCAB, dtype=self.dtype, name='logits',
        kernel_init=part(nn.initializers.xavier_uniform(),
                         ('embed', 'vocab')),
        bias_init=part(nn.initializers.zeros_init(), ('vocab',)))(x)
    return logits.astype(jnp.float32)


def _token_batches(steps, seed=0):
  """Sequences counting up from a random start (token 0 is padding), some
  padded at the end, so that a model can learn to predict the next token."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(steps):
    start = rng.integers(1, VOCAB, size=(BATCH, 1))
    tokens = (start + np.arange(LENGTH) - 1) % (VOCAB - 1) + 1
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, size=(BATCH, 1))
    batches.append(jnp.asarray(np.where(np.arange(LENGTH) < lengths,
                                        tokens, 0), jnp.int32))
  return batches


def _lm_train(model, params, layers, batches, learning_rate=0.5):
  """lm1b's train step: dropout rng folded with the step, weighted cross
  entropy over non-padding targets, state.apply_gradients."""
  tx = mac_optax.mac(learning_rate, layers=layers, momentum=0.9,
                     weight_decay=0.0, damping=1.0, t_cov=1, t_inv=2)
  state = mac_optax.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=tx)
  apply_with_stats = mac_optax.capture(model.apply)

  @_jit
  def train_step(state, targets, dropout_rng):
    dropout_rng = jax.random.fold_in(dropout_rng, state.step)

    def loss_fn(params):
      logits, stats = apply_with_stats({'params': params}, targets,
                                       train=True,
                                       rngs={'dropout': dropout_rng})
      weights = (targets > 0).astype(jnp.float32)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                               targets)
      return (losses * weights).sum() / weights.sum(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads, mac_stats=stats), loss

  losses = []
  for targets in batches:
    state, loss = train_step(state, targets, jax.random.key(7))
    losses.append(float(loss))
  return state, losses


@pytest.fixture(scope='module')
def lm_setup():
  batches = _token_batches(20)
  model = DecoderLM(boxed=True)
  params = _jit(model.init)(jax.random.key(0), batches[0])['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, batches[0],
                                 train=True,
                                 rngs={'dropout': jax.random.key(1)})
  return model, params, layers, batches


def test_lm1b_style_boxed_lm_finds_every_kernel(lm_setup):
  model, params, layers, _ = lm_setup
  assert any(isinstance(leaf, nn.LogicallyPartitioned) for leaf in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(
                 x, nn.LogicallyPartitioned)))
  kernels = _kernel_modules(params)
  assert len(kernels) == DEPTH * 6 + 1
  assert sorted(layers) == sorted(kernels)
  for i in range(DEPTH):
    value = layers[(f'block_{i}', 'attention', 'value')]
    assert value.kind == 'attention_value'
    assert value.in_shape == (WIDTH,)
  table = mac_optax.summary(layers, params)
  kernel_rows = [row for row in table.splitlines() if '/kernel' in row]
  assert len(kernel_rows) == len(kernels), table
  assert all('preconditioned:' in row and 'not preconditioned' not in row
             for row in kernel_rows), table
  assert f'preconditioned kernels: {len(kernels)} of {len(kernels)}' in table


def test_lm1b_style_boxed_lm_trains_like_its_unboxed_twin(lm_setup):
  model, params, layers, batches = lm_setup
  state, losses = _lm_train(model, params, layers, batches)
  assert np.isfinite(losses).all(), losses
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses

  # The names lm1b uses for its shardings survive training.
  assert (nn.get_partition_spec(state.params)
          == nn.get_partition_spec(params))
  assert isinstance(state.params['logits']['kernel'], nn.LogicallyPartitioned)
  assert state.params['logits']['kernel'].value.dtype == jnp.float32
  momentum = optax.tree_utils.tree_get(state.opt_state, 'trace')
  assert nn.get_partition_spec(momentum) == nn.get_partition_spec(params)

  twin = DecoderLM(boxed=False)
  plain = nn.unbox(params)
  twin_layers = mac_optax.find_layers(twin.apply, {'params': plain},
                                      batches[0], train=True,
                                      rngs={'dropout': jax.random.key(1)})
  assert dict(twin_layers) == dict(layers)
  twin_state, twin_losses = _lm_train(twin, plain, twin_layers, batches)
  np.testing.assert_allclose(losses, twin_losses, rtol=1e-6)
  _assert_trees_close(nn.unbox(state.params), twin_state.params, 1e-6,
                      'params')
  _assert_trees_close(
      nn.unbox(state.opt_state[0]), twin_state.opt_state[0], 1e-6,
      'MAC state')
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       twin_state.params, plain)
  assert min(jax.tree.leaves(moved)) > 1e-4


# --- MaxText-style scanned decoder stack ------------------------------------

SCAN_DEPTH = 3


class _ScannedLayer(nn.Module):
  """One decoder layer in MaxText's form: (carry, *broadcast) -> (carry, _)."""

  @nn.compact
  def __call__(self, x, mask, deterministic):
    return _DecoderBlock(True, jnp.float32, name='block')(
        x, mask, deterministic), None


class ScannedDecoder(nn.Module):
  """A decoder whose layers run under nn.scan (or unrolled, the twin)."""

  scan: str = 'params'  # 'params', 'intermediates' or 'unrolled'

  @nn.compact
  def __call__(self, tokens):
    part = functools.partial(_maybe_partitioned, True)
    mask = nn.make_causal_mask(tokens)
    x = nn.Embed(VOCAB, WIDTH, name='token_embed',
                 embedding_init=part(nn.initializers.normal(1.0),
                                     ('vocab', 'embed')))(tokens)
    if self.scan == 'unrolled':
      for i in range(SCAN_DEPTH):
        x, _ = _ScannedLayer(name=f'layers_{i}')(x, mask, True)
    else:
      axes = {'params': 0}
      if self.scan == 'intermediates':
        axes['intermediates'] = 0
      stack = nn.scan(
          nn.remat(_ScannedLayer, prevent_cse=False, static_argnums=(3,)),
          variable_axes=axes, split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast), length=SCAN_DEPTH,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(name='layers')(x, mask, True)
    return nn.Dense(VOCAB, name='logits',
                    kernel_init=part(nn.initializers.xavier_uniform(),
                                     ('embed', 'vocab')))(x)


def _unroll(params):
  """Stacked (boxed) params -> the unrolled twin's, names without 'layers'."""
  params = dict(params)
  stacked = params.pop('layers')

  def take(leaf, i):
    names = list(leaf.names)
    axis = names.index('layers')
    del names[axis]
    return leaf.replace(value=jnp.take(leaf.value, i, axis=axis),
                        names=tuple(names))

  for i in range(SCAN_DEPTH):
    params[f'layers_{i}'] = jax.tree.map(
        lambda leaf, i=i: take(leaf, i), stacked,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return params


def _unroll_stats(stats):
  stats = dict(stats)
  stacked = stats.pop('layers')
  for i in range(SCAN_DEPTH):
    stats[f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return stats


def _scan_train(model, params, steps):
  batches = _token_batches(steps, seed=1)
  layers = mac_optax.find_layers(model.apply, {'params': params}, batches[0])
  tx = mac_optax.mac(0.3, layers=layers, t_cov=1, t_inv=2, damping=0.5)
  state = mac_optax.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=tx)
  apply_with_stats = mac_optax.capture(model.apply)

  @_jit
  def train_step(state, tokens):
    def loss_fn(params):
      logits, stats = apply_with_stats({'params': params}, tokens)
      losses = optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1], tokens[:, 1:])
      return losses.mean(), stats
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads, mac_stats=stats), stats

  all_stats = []
  for tokens in batches:
    state, stats = train_step(state, tokens)
    all_stats.append(stats)
  return layers, state, all_stats


@pytest.fixture(scope='module')
def scan_params():
  tokens = _token_batches(1, seed=1)[0]
  return _jit(ScannedDecoder(scan='params').init)(jax.random.key(0),
                                                  tokens)['params']


@pytest.fixture(scope='module')
def unrolled_run(scan_params):
  return _scan_train(ScannedDecoder(scan='unrolled'), _unroll(scan_params), 3)


@pytest.mark.parametrize('scan', ['params', 'intermediates'])
def test_maxtext_style_scanned_stack_equals_its_unrolled_twin(
    scan, scan_params, unrolled_run):
  kernel = scan_params['layers']['block']['mlp']['wi']['kernel']
  assert kernel.names == ('layers', 'embed', 'mlp'), kernel.names
  layers, state, stats = _scan_train(ScannedDecoder(scan=scan), scan_params,
                                     3)
  twin_layers, twin_state, twin_stats = unrolled_run
  value = layers[('layers', 'block', 'attention', 'value')]
  assert value.stack_shape == (SCAN_DEPTH,)
  assert value.kind == 'attention_value'
  assert sorted(layers) == sorted(_kernel_modules(scan_params))
  assert 'preconditioned kernels: 7 of 7' in mac_optax.summary(layers,
                                                               scan_params)
  assert len(twin_layers) == 1 + SCAN_DEPTH * (len(layers) - 1)
  for step_stats, step_twin in zip(stats, twin_stats):
    _assert_trees_close(_unroll_stats(step_stats), step_twin, 1e-6,
                        'statistics', rtol=1e-5)
  assert (nn.get_partition_spec(state.params)
          == nn.get_partition_spec(scan_params))
  _assert_trees_close(nn.unbox(_unroll(state.params)),
                      nn.unbox(twin_state.params), 1e-6, 'params', rtol=1e-5)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       nn.unbox(state.params), nn.unbox(scan_params))
  assert min(jax.tree.leaves(moved)) > 1e-4


# --- imagenet-style ResNet under pmap ----------------------------------------


def test_imagenet_style_pmap_resnet_equals_one_device(tmp_path):
  out = tmp_path / 'resnet.npz'
  env = dict(os.environ)
  env['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=2'
                      ' --xla_backend_optimization_level=0')
  env['JAX_PLATFORMS'] = 'cpu'
  process = subprocess.run(
      [sys.executable, WORKER, str(out)], env=env, capture_output=True,
      text=True, timeout=600, cwd=os.path.dirname(WORKER))
  if process.returncode != 0:
    pytest.fail(f'worker exited with {process.returncode}:\n'
                f'{process.stderr[-6000:]}')
  with np.load(out) as arrays:
    results = {key: arrays[key] for key in arrays.files}
  counts = results.pop('counts')
  assert counts[0] == counts[1], f'{counts[0]} of {counts[1]} kernels'
  pmapped = {k[len('pmap:'):]: v for k, v in results.items()
             if k.startswith('pmap:')}
  single = {k[len('single:'):]: v for k, v in results.items()
            if k.startswith('single:')}
  initial = {k[len('initial:'):]: v for k, v in results.items()
             if k.startswith('initial:')}
  assert sorted(pmapped) == sorted(single)
  assert any(k.startswith('batch_stats/') for k in single)
  assert any(k.startswith('mac/') for k in single)
  for key, value in single.items():
    # Replicated state comes back stacked, one copy per device.
    replicas = pmapped[key]
    np.testing.assert_array_equal(replicas, np.broadcast_to(replicas[:1],
                                                            replicas.shape))
    np.testing.assert_allclose(replicas[0], value, rtol=0, atol=1e-6,
                               err_msg=key)
  for key, value in initial.items():
    assert np.abs(single[key] - value).max() > 1e-5, key
