"""Trains the small ViT with MAC data-parallel, for test_distributed.py.

The tests start this file in subprocesses, with XLA_FLAGS forcing several CPU
devices in the environment (the flag must be set before jax starts):

  python parallel_worker.py devices OUT.npz
      every single-host mode on all local devices, plus the one-device run;
  python parallel_worker.py process PROCESS_ID PROCESSES PORT OUT.npz
      one process of a jax.distributed run on 127.0.0.1:PORT.

Results go to OUT.npz as '<mode>:<leaf path>' arrays. Importing this module
(pytest imports every module for doctests) has no side effects.
"""

from __future__ import annotations

import sys

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

import mac_optax
import small_vit

STEPS = 4
BATCH = 16
DATA_SEED = 3


def data():
  return small_vit.batches(STEPS, BATCH, DATA_SEED)


def setup():
  _, params, layers, apply_with_stats = small_vit.build(batch_size=BATCH)
  return params, layers, apply_with_stats


def one_device_run():
  """The reference: plain jit on the default (first) device."""
  initial, layers, apply_with_stats = setup()
  tx = small_vit.optimizer(layers)
  params, state = small_vit.train(tx, apply_with_stats, initial, data())
  results = {'params': params, 'stats': state[0].mean_input,
             'initial': initial}
  results['moment'] = mac_optax.input_second_moments(
      small_vit.SmallViT().apply, {'params': initial}, [x for x, _ in data()],
      layers=layers, progress=False)
  return results


def _mesh(axis, axis_type=jax.sharding.AxisType.Auto):
  return jax.make_mesh((jax.device_count(),), (axis,), axis_types=(axis_type,))


def _global(mesh, spec, local):
  """A global array from this process's rows (all of them on one process)."""
  return jax.make_array_from_process_local_data(
      NamedSharding(mesh, spec), np.asarray(local))


def _replicated(mesh, tree):
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda a: jax.make_array_from_callback(
          np.shape(a), sharding, lambda index: np.asarray(a)[index]),
      tree)


def _local_rows(batch):
  """This process's contiguous share of a global batch."""
  share = len(batch) // jax.process_count()
  return batch[jax.process_index() * share:(jax.process_index() + 1) * share]


def jit_sharded_run(axis_type=jax.sharding.AxisType.Auto):
  """jax.jit with a batch-sharded input: no MAC-specific code at all."""
  mesh = _mesh('data', axis_type)
  params, layers, apply_with_stats = setup()
  tx = small_vit.optimizer(layers)
  step = jax.jit(small_vit.train_step(tx, apply_with_stats))
  params = _replicated(mesh, params)
  # Explicit mesh axes need the mesh in context (for Flax's backward pass).
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    for x, y in data():
      x = _global(mesh, P('data'), _local_rows(x))
      y = _global(mesh, P('data'), _local_rows(y))
      params, state, _ = step(params, state, x, y)
  return {'params': params, 'stats': state[0].mean_input}


def jit_explicit_run():
  """jit_sharded_run on a mesh with Explicit axes (jax.make_mesh's default).

  Returns the error message instead if the step cannot be traced, so that
  the other modes still run and the test can report it.
  """
  try:
    return jit_sharded_run(jax.sharding.AxisType.Explicit)
  except Exception as error:  # pylint: disable=broad-exception-caught
    return {'error': np.asarray(f'{type(error).__name__}: {error}')}


def _per_device(tree):
  """A leading device axis, for outputs declared sharded over the devices."""
  return jax.tree.map(lambda a: a[None], tree)


def shard_map_run():
  """shard_map over the batch, MAC given axis_name='data'.

  Besides the replicated parameters and state, every device's copy of the
  preconditioner statistic comes out along a device axis, to show that the
  replicas agree.
  """
  mesh = _mesh('data')
  params, layers, apply_with_stats = setup()
  tx = small_vit.optimizer(layers, axis_name='data')
  local_step = small_vit.train_step(tx, apply_with_stats, shards=mesh.size)

  def step(*args):
    params, state, _ = local_step(*args)
    return params, state, _per_device(state[0].mean_input)

  step = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
      out_specs=(P(), P(), P('data'))))
  params = _replicated(mesh, params)
  state = jax.jit(tx.init)(params)
  for x, y in data():
    x = _global(mesh, P('data'), _local_rows(x))
    y = _global(mesh, P('data'), _local_rows(y))
    params, state, per_device = step(params, state, x, y)
  return {'params': params, 'stats': state[0].mean_input,
          'replicas': per_device}


def replicas_without_axis_name():
  """Every device's statistic after one shard_map step without axis_name.

  The gradients are averaged as in shard_map_run; only MAC's axis_name is
  missing, so each device preconditions with its own shard's statistics.
  """
  mesh = _mesh('data')
  params, layers, apply_with_stats = setup()
  tx = small_vit.optimizer(layers)
  step = small_vit.train_step(tx, apply_with_stats, shards=mesh.size)
  per_device = jax.jit(jax.shard_map(
      lambda *args: _per_device(step(*args)[1][0].mean_input),
      mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
      out_specs=P('data')))
  x, y = data()[0]
  return per_device(params, tx.init(params), x, y)


def pmap_run():
  """pmap over the batch, MAC given axis_name='data'."""
  devices = jax.local_device_count()
  params, layers, apply_with_stats = setup()
  tx = small_vit.optimizer(layers, axis_name='data')
  local_step = small_vit.train_step(tx, apply_with_stats, pmean_axis='data')
  step = jax.pmap(lambda *args: local_step(*args)[:2], axis_name='data')
  stack = lambda tree: jax.tree.map(
      lambda a: np.broadcast_to(np.asarray(a), (devices,) + np.shape(a)), tree)
  params, state = stack(params), stack(tx.init(params))
  for x, y in data():
    split = lambda a: a.reshape((devices, -1) + a.shape[1:])
    params, state = step(params, state, split(x), split(y))
  return {'params': params, 'stats': state[0].mean_input}


def _fsdp_spec(shape, devices):
  """Shard the first axis that splits evenly over the devices."""
  for axis, size in enumerate(shape):
    if size % devices == 0:
      return P(*([None] * axis + ['fsdp']))
  return P()


def fsdp_run():
  """Parameters and optimizer state sharded over the same axis as the batch."""
  mesh = _mesh('fsdp')
  params, layers, apply_with_stats = setup()
  tx = small_vit.optimizer(layers)
  param_specs = jax.tree.map(
      lambda a: _fsdp_spec(a.shape, mesh.size), params)
  param_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
  state_sharding = mac_optax.state_sharding(tx, params, param_sharding)
  batch_sharding = NamedSharding(mesh, P('fsdp'))
  step = jax.jit(
      small_vit.train_step(tx, apply_with_stats),
      in_shardings=(param_sharding, state_sharding, batch_sharding,
                    batch_sharding),
      out_shardings=(param_sharding, state_sharding, None))
  params = jax.device_put(params, param_sharding)
  state = jax.jit(tx.init, out_shardings=state_sharding)(params)
  for x, y in data():
    params, state, _ = step(params, state, x, y)
  specs = {
      'momentum': state[1].trace['fc1']['kernel'].sharding.spec,
      'param': params['fc1']['kernel'].sharding.spec,
      'statistic': state[0].mean_input['fc1'].sharding.spec,
  }
  return {'params': params, 'stats': state[0].mean_input,
          'specs': {k: np.asarray(str(v)) for k, v in specs.items()}}


def sharded_moment_run():
  """input_second_moments on a batch sharded over devices (or processes)."""
  mesh = _mesh('data')
  params, layers, _ = setup()
  model = small_vit.SmallViT()
  moment = mac_optax.input_second_moments(
      model.apply, _replicated(mesh, {'params': params}),
      [_local_rows(x) for x, _ in data()], layers=layers,
      sharding=NamedSharding(mesh, P('data')), progress=False)
  return {'moment': moment}


def _fetch(tree):
  """Host copies; replicated global arrays are read from a local shard."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)
  return jax.tree.map(get, tree)


def _save(path, results):
  arrays = {}
  for mode, tree in results.items():
    for key, value in small_vit.flat(_fetch(tree)).items():
      arrays[f'{mode}:{key}'] = value
  np.savez(path, **arrays)


def main(argv):
  if argv[1] == 'devices':
    assert jax.device_count() == 8, jax.devices()
    results = {
        'one_device': one_device_run(),
        'jit_sharded': jit_sharded_run(),
        'jit_explicit': jit_explicit_run(),
        'shard_map': shard_map_run(),
        'pmap': pmap_run(),
        'fsdp': fsdp_run(),
        'sharded_moment': sharded_moment_run(),
        'replicas_without_axis_name': {
            'stats': replicas_without_axis_name()},
    }
    _save(argv[2], results)
  elif argv[1] == 'process':
    process_id, processes, port, out = argv[2:6]
    jax.distributed.initialize(
        coordinator_address=f'127.0.0.1:{port}',
        num_processes=int(processes), process_id=int(process_id))
    results = {
        'jit_sharded': jit_sharded_run(),
        'shard_map': shard_map_run(),
        'sharded_moment': sharded_moment_run(),
        'devices': {'count': np.asarray([jax.process_count(),
                                         jax.device_count()])},
    }
    _save(out, results)
    jax.distributed.shutdown()
  else:
    raise SystemExit(__doc__)


if __name__ == '__main__':
  main(sys.argv)
