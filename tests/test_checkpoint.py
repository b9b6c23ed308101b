"""Checkpoint and resume: an interrupted run is bit-identical to an unbroken one.

The optimizer has every kind of state MAC adds: step and capture counters,
EMAs, the refreshed preconditioner, per-layer skip counts, a first-layer
second moment with its damped inverse, a learning-rate schedule's count and
gradient accumulation interrupted between micro-batches.
"""

import flax.serialization
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import mac_optax
import small_vit

MICRO = 4
K = 2
MICRO_STEPS = 10
INTERRUPT_AT = 5  # mid-accumulation, and mid-way between t_cov/t_inv steps


def _optimizer(layers, second_moments, example_stats):
  return mac_optax.multi_steps(
      small_vit.optimizer(
          layers, learning_rate=optax.cosine_decay_schedule(0.1, 20),
          t_cov=2, t_inv=3, second_moments=second_moments),
      K, example_stats=example_stats)


@pytest.fixture(scope='module')
def run():
  model, params, layers, apply_with_stats = small_vit.build(batch_size=MICRO)
  data = small_vit.batches(MICRO_STEPS, MICRO, seed=7)
  moments = mac_optax.input_second_moments(
      model.apply, {'params': params}, [x for x, _ in data[:3]],
      layers=layers, progress=False)
  example_stats = jax.eval_shape(apply_with_stats, {'params': params},
                                 data[0][0])[1]
  tx = _optimizer(layers, moments, example_stats)
  step = jax.jit(small_vit.train_step(tx, apply_with_stats))
  state = tx.init(params)
  snapshots = []
  for i, (x, y) in enumerate(data):
    if i == INTERRUPT_AT:
      snapshots.append((params, state))
    params, state, _ = step(params, state, x, y)
  # What a restarted process builds before restoring: the same optimizer,
  # with only the shapes of the second moments (they come from the
  # checkpoint) and a fresh compilation of the step.
  template_moments = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), moments)
  fresh_tx = _optimizer(layers, template_moments, example_stats)
  fresh_step = jax.jit(small_vit.train_step(fresh_tx, apply_with_stats))
  return dict(data=data, saved=snapshots[0], final=(params, state),
              fresh_tx=fresh_tx, fresh_step=fresh_step, moments=moments)


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


def _resume(run, params, state):
  for x, y in run['data'][INTERRUPT_AT:]:
    params, state, _ = run['fresh_step'](params, state, x, y)
  return params, state


def _check_restored(run, restored_params, restored_state):
  params, state = run['saved']
  _assert_identical((restored_params, restored_state), (params, state))
  # Not just structurally equal: the counters and the second moment are the
  # saved ones, not the fresh template's zeros.
  assert int(restored_state.mini_step) == 1
  first_layer, mac_state = restored_state.inner_opt_state[:2]
  assert int(mac_state.count) == INTERRUPT_AT // K
  np.testing.assert_array_equal(first_layer.second_moment['embed'],
                                run['moments']['embed']['second_moment'])
  assert np.abs(first_layer.damped_inverse['embed']).max() > 0
  resumed = _resume(run, restored_params, restored_state)
  _assert_identical(resumed, run['final'])


def test_orbax_round_trip_resumes_bit_identically(run, tmp_path):
  params, state = run['saved']
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'step5', {'params': params, 'opt': state})
  checkpointer.wait_until_finished()
  target = {
      'params': jax.eval_shape(lambda: params),
      'opt': jax.eval_shape(run['fresh_tx'].init, params),
  }
  restored = checkpointer.restore(tmp_path / 'step5', target)
  assert isinstance(restored['opt'], mac_optax.MultiStepsState)
  _check_restored(run, restored['params'], restored['opt'])


def test_flax_serialization_round_trip_resumes_bit_identically(run):
  params, state = run['saved']
  data = flax.serialization.to_bytes({'params': params, 'opt': state})
  target = {'params': params, 'opt': run['fresh_tx'].init(params)}
  restored = flax.serialization.from_bytes(target, data)
  _check_restored(run, restored['params'], restored['opt'])


def test_an_unsaved_counter_would_change_the_run(run):
  """The check above can fail: resuming with the step counters reset (as the
  reference's resume does) gives a different run."""
  params, state = run['saved']
  first_layer, mac_state = state.inner_opt_state[:2]
  reset = state._replace(inner_opt_state=(
      first_layer,
      mac_state._replace(count=mac_state.count * 0,
                         stat_count=mac_state.stat_count * 0),
  ) + tuple(state.inner_opt_state[2:]))
  resumed, _ = _resume(run, params, reset)
  final, _ = run['final']
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(resumed), jax.tree.leaves(final)))
