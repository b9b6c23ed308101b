"""MAC on meshes with Explicit axes (jax.make_mesh's default) equals unsharded.

explicit_sharding_worker.py trains small linen and NNX models (Dense and
Linear with and without bias, Einsums, Flax attention, a convolution, and
Gemma-style NNX decoders) for a few MAC steps on a 4 x 2 ('fsdp', 'tp') mesh
of forced CPU devices, with FSDP + tensor-parallel parameter shardings and
activations resharded over the batch, the features or both (and once inside
a shard_map over 'fsdp', 'tp' left Explicit), in a subprocess (the device
count must be set before jax starts). Every case is compared with the same
training without any mesh: the statistics of the first step, the parameters
and the preconditioner statistic after the last.
"""

import os
import subprocess
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import explicit_sharding_worker as worker
import mac_optax

WORKER = os.path.join(os.path.dirname(__file__), 'explicit_sharding_worker.py')
TOLERANCE = 1e-5
TIMEOUT_S = 900
SHARDED_CASES = [(case, layout) for case, layouts in worker.PLAN
                 for layout in layouts]


def _environment():
  env = dict(os.environ)
  # Compilation dominates; level 0 roughly halves it, for every run alike.
  env['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8'
                      ' --xla_backend_optimization_level=0')
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _shared_directory(tmp_path_factory):
  """A directory that every pytest-xdist worker of this session sees."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """Runs the worker once per session (the first xdist worker to get here)."""
  shared = _shared_directory(tmp_path_factory) / 'mac_optax_explicit_mesh'
  done, failure = shared / 'results.npz', shared / 'failure.txt'
  try:
    shared.mkdir()
  except FileExistsError:
    deadline = time.monotonic() + TIMEOUT_S
    while not (done.exists() or failure.exists()):
      if time.monotonic() > deadline:
        pytest.fail('timed out waiting for the explicit-mesh worker')
      time.sleep(1)
  else:
    partial = shared / 'partial.npz'
    process = subprocess.run(
        [sys.executable, WORKER, str(partial)], env=_environment(),
        capture_output=True, text=True, timeout=TIMEOUT_S,
        cwd=os.path.dirname(WORKER))
    if process.returncode == 0:
      os.replace(partial, done)
    else:
      failure.write_text(f'worker exited with {process.returncode}:\n'
                         f'{process.stderr[-6000:]}')
  if failure.exists():
    pytest.fail(failure.read_text())
  by_case = {}
  with np.load(done) as arrays:
    for key in arrays.files:
      case, leaf = key.split(':', 1)
      by_case.setdefault(case, {})[leaf] = arrays[key]
  return by_case


def _numbers(result):
  return {k: v for k, v in result.items()
          if k.split('/')[0] in ('stats', 'params', 'mean_input')}


@pytest.mark.parametrize('case,layout', SHARDED_CASES)
def test_sharded_training_matches_unsharded(results, case, layout):
  reference = results[f'{case}.unsharded']
  result = results[f'{case}.{layout}']
  assert 'error' not in reference, str(reference.get('error'))
  assert 'error' not in result, str(result.get('error'))
  assert str(result['layers']) == str(reference['layers'])
  expected = _numbers(reference)
  assert expected and set(_numbers(result)) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(result[key], value, rtol=0, atol=TOLERANCE,
                               err_msg=f'{case}.{layout} {key}')
  # The comparison could fail: training moved every parameter far beyond the
  # tolerance, and the statistics are not trivial.
  for key, value in expected.items():
    if key.startswith('params/'):
      initial = reference['initial/' + key[len('params/'):]]
      assert np.abs(value - initial).max() > 100 * TOLERANCE, key
    if key.startswith('mean_input/'):
      assert np.abs(value).max() > 1e-2, key


_TOY_LAYERS = [
    'attn/key dense', 'attn/out dense', 'attn/query dense',
    'attn/value attention_value', 'conv conv', 'down dense', 'head dense',
    'mix einsum', 'unmix einsum', 'up dense']
EXPECTED_LAYERS = {
    'linen_shard_map': ['down dense', 'head dense', 'mix einsum', 'up dense'],
    'linen': _TOY_LAYERS,
    'linen_multi_steps': _TOY_LAYERS,
    'nnx': _TOY_LAYERS,
    'nnx_multi_steps': _TOY_LAYERS,
    'gemma': [
        'attn/attn_vec_einsum einsum', 'attn/k_einsum einsum',
        'attn/q_einsum einsum', 'attn/v_einsum attention_value', 'down dense',
        'up dense'],
    'gemma_fused_qkv': [
        f'blocks/{i}/{name}' for i in (0, 1) for name in (
            'attn/attn_vec_einsum einsum', 'attn/qkv_einsum attention_qkv',
            'mlp/down_proj dense', 'mlp/gate_proj dense',
            'mlp/up_proj dense')],
    'gemma_heads_first': [
        f'blocks/{i}/{name}' for i in (0, 1) for name in (
            'attn/attn_vec_einsum einsum', 'attn/kv_einsum attention_qkv',
            'attn/q_einsum einsum', 'mlp/down_proj dense',
            'mlp/gate_proj dense', 'mlp/up_proj dense')],
}


@pytest.mark.parametrize('case', sorted(EXPECTED_LAYERS))
def test_every_kernel_is_preconditioned_under_the_mesh(results, case):
  """find_layers on the sharded model sees every kernel (but embeddings),
  value projections with the attention-aware statistic."""
  for layout in dict(worker.PLAN)[case]:
    result = results[f'{case}.{layout}']
    assert 'error' not in result, str(result.get('error'))
    kinds = sorted(' '.join(line.split()[:2])
                   for line in str(result['layers']).splitlines())
    assert kinds == sorted(EXPECTED_LAYERS[case]), (case, layout)


def test_state_sharding_is_what_jit_lays_out(results):
  """state_sharding as out_shardings: momentum like the FSDP+TP parameters,
  statistics replicated, and the jitted state has exactly those shardings."""
  for case, layout in SHARDED_CASES:
    if case in ('linen', 'linen_multi_steps'):
      result = results[f'{case}.{layout}']
      assert 'error' not in result, str(result.get('error'))
      assert bool(result['state_sharding_matches']), (case, layout)
      assert str(result['momentum_spec/up/kernel']) == "P('fsdp', 'tp')"


def _one_device_linear(x, sharded: bool):
  """The issue's minimal form: nnx.Linear(4, 2) on feature-sharded inputs,
  one MAC step (find_layers, capture, update), on a one-device mesh."""
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  if sharded:
    x = jax.sharding.reshard(x, P(None, 't'))
  layers = mac_optax.find_layers(model, x)
  tx = mac_optax.scale_by_mac(layers, damping=0.5, t_cov=1, t_inv=1)
  state = tx.init(nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, x, state):
    def loss_fn(model):
      outputs, stats = mac_optax.capture(model)(x)
      return jnp.sum(jnp.square(outputs - 1.0)), stats
    grads, stats = nnx.grad(loss_fn, has_aux=True)(model)
    return tx.update(grads, state, mac_stats=stats) + (stats,)

  updates, state, stats = step(model, x, state)
  return jax.device_get((updates, state.mean_input, stats))


def test_feature_sharded_linear_on_a_one_device_explicit_mesh():
  x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.4
  expected = _one_device_linear(x, sharded=False)
  mesh = jax.make_mesh((1,), ('t',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    got = _one_device_linear(x, sharded=True)
  mean = np.append(x.mean(axis=0), 1.0)  # the bias coordinate
  np.testing.assert_allclose(expected[2]['mean_input'], mean, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, expected)

