"""Data-parallel MAC on 8 devices and on 2 processes equals one device.

parallel_worker.py trains the small ViT (conv patch embedding, attention with
the reference value statistic, MLP) for a few steps in every mode, in a
subprocess whose environment forces 8 CPU devices (the flag must be set
before jax starts, so it cannot be set here). Each mode's parameters and
preconditioner statistics are compared with the same training on one device.
"""

import os
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

import mac_optax
import parallel_worker

WORKER = os.path.join(os.path.dirname(__file__), 'parallel_worker.py')
TOLERANCE = 1e-5
TIMEOUT_S = 900


def _environment(devices):
  env = dict(os.environ)
  # Compile time dominates these runs; optimisation level 0 halves it and
  # every mode, the one-device run included, is compiled the same way.
  env['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={devices}'
      ' --xla_backend_optimization_level=0'
  )
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _check(process, stderr):
  if process.returncode != 0:
    pytest.fail(f'worker exited with {process.returncode}:\n{stderr[-6000:]}')


def _results(path):
  """'<mode>:<leaf>' npz -> {mode: {leaf: array}}."""
  results = {}
  with np.load(path) as arrays:
    for key in arrays.files:
      mode, leaf = key.split(':', 1)
      results.setdefault(mode, {})[leaf] = arrays[key]
  return results


def _shared_directory(tmp_path_factory):
  """A directory that every pytest-xdist worker of this session sees."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """Runs the 8-device worker once per session, even under pytest-xdist.

  The first worker to create the directory runs the subprocess; any other
  worker that needs the results waits for them instead of running it again.
  """
  shared = _shared_directory(tmp_path_factory) / 'mac_optax_eight_devices'
  results, failure = shared / 'results.npz', shared / 'failure.txt'
  try:
    shared.mkdir()
  except FileExistsError:
    deadline = time.monotonic() + TIMEOUT_S
    while not (results.exists() or failure.exists()):
      if time.monotonic() > deadline:
        pytest.fail('timed out waiting for the 8-device worker')
      time.sleep(1)
  else:
    partial = shared / 'partial.npz'
    process = subprocess.run(
        [sys.executable, WORKER, 'devices', str(partial)],
        env=_environment(8), capture_output=True, text=True,
        timeout=TIMEOUT_S, cwd=os.path.dirname(WORKER))
    if process.returncode == 0:
      os.replace(partial, results)
    else:
      failure.write_text(
          f'worker exited with {process.returncode}:\n{process.stderr[-6000:]}')
  if failure.exists():
    pytest.fail(failure.read_text())
  return _results(results)


def _assert_matches(result, reference, prefix):
  """Every leaf under ``prefix`` agrees with the one-device run to 1e-5."""
  keys = [k for k in reference if k.startswith(prefix)]
  assert keys and all(k in result for k in keys), sorted(result)
  for key in keys:
    np.testing.assert_allclose(result[key], reference[key], rtol=0,
                               atol=TOLERANCE, err_msg=key)


def _assert_trained(reference):
  """Every parameter moved much further than the tolerance, so a mode that
  dropped or mangled updates could not pass."""
  for key in reference:
    if key.startswith('params/'):
      initial = reference['initial/' + key[len('params/'):]]
      assert np.abs(reference[key] - initial).max() > 100 * TOLERANCE, key


@pytest.mark.parametrize('mode', ['jit_sharded', 'shard_map', 'pmap', 'fsdp'])
def test_data_parallel_matches_one_device(eight_devices, mode):
  result = dict(eight_devices[mode])
  if mode == 'pmap':
    # Replicated parameters come back stacked: one copy per device.
    for key, value in result.items():
      np.testing.assert_array_equal(value, np.broadcast_to(value[:1],
                                                           value.shape))
      result[key] = value[0]
  reference = eight_devices['one_device']
  _assert_trained(reference)
  _assert_matches(result, reference, 'params/')
  _assert_matches(result, reference, 'stats/')


def test_jit_with_explicit_mesh_axes_matches_one_device(eight_devices):
  result = eight_devices['jit_explicit']
  assert 'error' not in result, str(result.get('error'))
  _assert_matches(result, eight_devices['one_device'], 'params/')


def test_without_axis_name_shard_map_replicas_drift_apart(eight_devices):
  """What axis_name prevents: each device preconditions with its own shard."""
  without = eight_devices['replicas_without_axis_name']
  with_axis = {k: v for k, v in eight_devices['shard_map'].items()
               if k.startswith('replicas/')}
  spread = lambda stats: max(float(np.ptp(v, axis=0).max())
                             for v in stats.values())
  assert len(without) == len(with_axis) == 8  # every preconditioned layer
  assert all(v.shape[0] == 8 for v in with_axis.values())
  assert spread(without) > 0.1
  assert spread(with_axis) == 0.0


def test_fsdp_state_follows_parameters_and_replicates_statistics(
    eight_devices):
  specs = eight_devices['fsdp']
  assert str(specs['specs/param']) == "P('fsdp',)"
  assert str(specs['specs/momentum']) == str(specs['specs/param'])
  assert str(specs['specs/statistic']) == 'P()'


def test_second_moment_over_sharded_batches_is_exact(eight_devices):
  moment = eight_devices['sharded_moment']['moment/embed/second_moment']
  reference = eight_devices['one_device']['moment/embed/second_moment']
  assert moment.shape == (17, 17)
  np.testing.assert_allclose(moment, reference, rtol=1e-6, atol=1e-6)


def _free_port():
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  """jax.distributed with 2 local processes of 2 CPU devices each."""
  port = _free_port()
  outs = [tmp_path / f'process{i}.npz' for i in range(2)]
  logs = [open(tmp_path / f'process{i}.log', 'w+') for i in range(2)]
  processes = [
      subprocess.Popen(
          [sys.executable, WORKER, 'process', str(i), '2', str(port),
           str(out)],
          env=_environment(2), stdout=log, stderr=subprocess.STDOUT,
          cwd=os.path.dirname(WORKER))
      for i, (out, log) in enumerate(zip(outs, logs))
  ]
  # A process that fails leaves the other waiting for it: stop both then.
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in processes):
      if any(p.poll() not in (None, 0) for p in processes):
        break
      if time.monotonic() > deadline:
        pytest.fail('the jax.distributed workers timed out')
      time.sleep(0.5)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()
  for process, log in zip(processes, logs):
    log.seek(0)
    _check(process, log.read())
    log.close()
  reference = parallel_worker.one_device_run()
  reference = {
      key: value for key, value in
      parallel_worker.small_vit.flat(reference).items()
  }
  for out in outs:
    results = _results(out)
    np.testing.assert_array_equal(results['devices']['count'], [2, 4])
    for mode in ('jit_sharded', 'shard_map'):
      _assert_matches(results[mode], reference, 'params/')
      _assert_matches(results[mode], reference, 'stats/')
    np.testing.assert_allclose(
        results['sharded_moment']['moment/embed/second_moment'],
        reference['moment/embed/second_moment'], rtol=1e-6, atol=1e-6)


def test_axis_name_outside_shard_map_is_a_clear_error():
  model = nn.Dense(2)
  x = np.ones((4, 3), np.float32)
  params = model.init(jax.random.key(0), x)['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, x)
  _, stats = mac_optax.capture(model.apply)({'params': params}, x)
  tx = mac_optax.mac(0.1, layers=layers, axis_name='data')
  with pytest.raises(ValueError, match=r"axis_name='data'.*inside shard_map"
                     r' or pmap.*leave axis_name=None'):
    tx.update(params, tx.init(params), params, mac_stats=stats)
