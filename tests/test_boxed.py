"""Boxed parameters: ``nn.with_logical_partitioning`` / ``nn.with_partitioning``.

lm1b-, MaxText- and t5x-style trainers keep their parameters boxed
(``nn.LogicallyPartitioned`` / ``nn.Partitioned``, pytree nodes around the
array) all through training. The oracle is the unboxed twin: the same model
and optimizer on ``nn.unbox(params)``, which must give the same numbers, while
the boxed run keeps its boxes and logical axis names.
"""

from flax import nnx
import flax.linen as nn
import flax.serialization
from flax.core import meta
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import mac_optax

STEPS = 4


def _logical(init, names):
  return nn.with_logical_partitioning(init, names)


class _BoxedMLP(nn.Module):
  """Logically partitioned kernels and biases, as in flax's lm1b example."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(
        6, kernel_init=_logical(nn.initializers.lecun_normal(),
                                ('embed', 'mlp')),
        bias_init=_logical(nn.initializers.normal(0.1), ('mlp',)))(x)
    x = nn.LayerNorm(scale_init=_logical(nn.initializers.ones, ('mlp',)),
                     bias_init=_logical(nn.initializers.zeros, ('mlp',)))(x)
    x = nn.relu(x)
    # nn.with_partitioning: mesh axis names instead of logical ones.
    return nn.Dense(
        3, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                            ('model', None)))(x)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    y = nn.Dense(4, kernel_init=_logical(nn.initializers.lecun_normal(),
                                         ('embed', 'mlp')),
                 bias_init=_logical(nn.initializers.normal(0.1), ('mlp',)))(x)
    return x + jnp.tanh(y), None


class _ScannedBoxed(nn.Module):
  """A MaxText-style scanned stack whose boxes gain a 'layers' axis name."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={'params': 0},
                    split_rngs={'params': True}, length=3,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = stack(name='stack')(x, None)
    return nn.Dense(2, name='head')(x)


def _data(features, steps=STEPS, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [(jnp.asarray(rng.normal(size=(batch, features)), jnp.float32),
           jnp.asarray(rng.normal(size=(batch,)), jnp.float32))
          for _ in range(steps)]


def _setup(model, features):
  data = _data(features)
  variables = model.init(jax.random.key(0), data[0][0])
  params = variables['params']
  layers = mac_optax.find_layers(model.apply, variables, data[0][0])
  return data, params, layers


def _train(model, tx, params, data):
  apply_with_stats = mac_optax.capture(model.apply)

  def loss_fn(params, x, y):
    out, stats = apply_with_stats({'params': params}, x)
    return jnp.mean((out.sum(-1) - y) ** 2), stats

  @jax.jit
  def step(params, state, x, y):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  for x, y in data:
    params, state, updates = step(params, state, x, y)
  return params, state, updates


def _assert_same_numbers(boxed, unboxed):
  plain = nn.unbox(boxed)
  assert jax.tree.structure(plain) == jax.tree.structure(unboxed)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      plain, unboxed)


def _boxes(tree):
  return [leaf for leaf in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
          if isinstance(leaf, meta.AxisMetadata)]


def _box_names(tree):
  return {jax.tree_util.keystr(path): (type(leaf).__name__, leaf.names)
          for path, leaf in jax.tree_util.tree_leaves_with_path(
              tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
          if isinstance(leaf, meta.AxisMetadata)}


def _optimizer(layers):
  return mac_optax.mac(0.05, layers=layers, damping=0.5, t_cov=1, t_inv=2)


@pytest.mark.parametrize('model, features', [(_BoxedMLP(), 5),
                                             (_ScannedBoxed(), 4)])
def test_boxed_training_equals_the_unboxed_twin(model, features):
  data, params, layers = _setup(model, features)
  assert _boxes(params)  # the model really is boxed
  unboxed = nn.unbox(params)
  twin_layers = mac_optax.find_layers(model.apply, {'params': unboxed},
                                      data[0][0])
  assert dict(layers) == dict(twin_layers)
  assert len(layers) >= 2

  new_params, state, updates = _train(model, _optimizer(layers), params, data)
  twin_params, twin_state, twin_updates = _train(
      model, _optimizer(twin_layers), unboxed, data)
  _assert_same_numbers(new_params, twin_params)
  _assert_same_numbers(updates, twin_updates)
  # MAC's own state is not boxed; the momentum is, like the params.
  _assert_same_numbers(state, twin_state)
  # Boxes and their axis names survive the updates and the step.
  assert _box_names(updates) == _box_names(params)
  assert _box_names(new_params) == _box_names(params)
  assert _box_names(state[1].trace) == _box_names(params)


def test_summary_names_the_parameters_not_their_boxes():
  data, params, layers = _setup(_BoxedMLP(), 5)
  text = mac_optax.summary(layers, params)
  assert '/value' not in text
  rows = {line.split()[0]: line.split(None, 1)[1] for line in
          text.splitlines()[1:] if '/' in line.split()[0]}
  assert rows['Dense_0/kernel'].startswith('(5, 6)')
  assert 'preconditioned: dense (Dense), d=6' in rows['Dense_0/kernel']
  assert rows['Dense_1/kernel'].startswith('(6, 3)')
  # The same table as for the unboxed parameters.
  assert text == mac_optax.summary(layers, nn.unbox(params))
  del data


def test_precondition_mask_masks_the_boxed_tree():
  data, params, layers = _setup(_BoxedMLP(), 5)
  mask = mac_optax.precondition_mask(layers, params)
  # One bool per box.
  assert mask['Dense_0'] == {'kernel': True, 'bias': True}
  assert mask['LayerNorm_0'] == {'scale': False, 'bias': False}
  twin_mask = mac_optax.precondition_mask(layers, nn.unbox(params))
  assert mask == twin_mask

  def optimizer(mask):
    return optax.chain(
        optax.masked(mac_optax.scale_by_mac(layers, damping=0.5, t_cov=1,
                                            t_inv=1), mask),
        optax.masked(optax.scale_by_adam(),
                     jax.tree.map(lambda m: not m, mask)),
        optax.scale(-0.01))

  new_params, _, updates = _train(_BoxedMLP(), optimizer(mask), params, data)
  twin_params, _, twin_updates = _train(
      _BoxedMLP(), optimizer(twin_mask), nn.unbox(params), data)
  _assert_same_numbers(new_params, twin_params)
  _assert_same_numbers(updates, twin_updates)
  assert _box_names(new_params) == _box_names(params)

  # The same mask as optax.partition labels.
  def partitioned(mask):
    labels = jax.tree.map(lambda m: 'mac' if m else 'adam', mask)
    return optax.partition({'mac': _optimizer(layers),
                            'adam': optax.adam(1e-3)}, labels)

  new_params, _, _ = _train(_BoxedMLP(), partitioned(mask), params, data)
  twin_params, _, _ = _train(_BoxedMLP(), partitioned(twin_mask),
                             nn.unbox(params), data)
  _assert_same_numbers(new_params, twin_params)
  assert _box_names(new_params) == _box_names(params)


def test_state_sharding_of_boxed_params():
  data, params, layers = _setup(_BoxedMLP(), 5)
  tx = _optimizer(layers)
  # As lm1b does: the specs of the boxes' names (logical here).
  specs = nn.get_partition_spec(params)
  shardings = mac_optax.state_sharding(tx, params, specs)
  state = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  # The momentum's boxes carry the parameters' specs.
  trace = shardings[1].trace
  assert trace['Dense_0']['kernel'].value == P('embed', 'mlp')
  assert trace['Dense_0']['kernel'].names == ('embed', 'mlp')
  assert trace['Dense_1']['kernel'].value == P('model', None)
  assert trace['Dense_1']['bias'] == P()  # unboxed: the default spec
  assert shardings[0].mean_input['Dense_0'] == P()
  # Boxed param_sharding (a tree like params) gives the same.
  assert mac_optax.state_sharding(
      tx, params, jax.tree.map(
          lambda box, spec: box.replace_boxed(spec) if isinstance(
              box, meta.AxisMetadata) else spec,
          params, specs,
          is_leaf=lambda x: isinstance(x, meta.AxisMetadata))) == shardings
  del data


def test_boxed_state_checkpoints_round_trip(tmp_path):
  data, params, layers = _setup(_BoxedMLP(), 5)
  tx = _optimizer(layers)
  params, state, _ = _train(_BoxedMLP(), tx, params, data[:2])
  target = tx.init(params)

  restored = flax.serialization.from_bytes(
      target, flax.serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', {'params': params, 'opt_state': state})
  checkpointer.wait_until_finished()
  abstract = jax.eval_shape(lambda: {'params': params, 'opt_state': state})
  loaded = checkpointer.restore(tmp_path / 'ckpt', abstract)
  assert jax.tree.structure(loaded) == jax.tree.structure(abstract)
  jax.tree.map(np.testing.assert_array_equal, loaded['opt_state'], state)
  assert _box_names(loaded['params']) == _box_names(params)
  del data


class _NNXModel(nnx.Module):

  def __init__(self, rngs, annotated):
    def init(base, names):
      return nnx.with_partitioning(base, names) if annotated else base

    self.up = nnx.Linear(
        3, 4, rngs=rngs,
        kernel_init=init(nnx.initializers.lecun_normal(), ('embed', 'mlp')),
        bias_init=init(nnx.initializers.zeros_init(), ('mlp',)))
    self.down = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


def test_nnx_variables_with_sharding_metadata_train_like_plain_ones():
  data = _data(3)
  mesh = jax.make_mesh((1, 1), ('embed', 'mlp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  results = []
  for annotated in (True, False):
    with jax.set_mesh(mesh):
      model = _NNXModel(nnx.Rngs(0), annotated)
      layers = mac_optax.find_layers(model, data[0][0])
      optimizer = nnx.Optimizer(model, _optimizer(layers), wrt=nnx.Param)

      @nnx.jit
      def step(model, optimizer, x, y):
        def loss_fn(model):
          out, stats = mac_optax.capture(model)(x)
          return jnp.mean((out.sum(-1) - y) ** 2), stats

        (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads, mac_stats=stats)

      for x, y in data:
        step(model, optimizer, x, y)
      params = nnx.state(model, nnx.Param)
      results.append(jax.tree.leaves(jax.tree.map(np.asarray, params)))
      if annotated:
        assert model.up.kernel.get_metadata()['out_sharding'] == ('embed',
                                                                  'mlp')
        mask = mac_optax.precondition_mask(layers, params)
        assert mask['up']['kernel'] is True
        assert '/value' not in mac_optax.summary(layers, params)
  assert len(results[0]) == len(results[1]) == 4
  for annotated, plain in zip(*results):
    np.testing.assert_allclose(annotated, plain, rtol=1e-6, atol=1e-7)
