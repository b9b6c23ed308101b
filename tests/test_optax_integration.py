"""mac_optax inside optax's combinators and under jit."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name='fc1')(x))
    x = nn.LayerNorm(name='norm')(x)
    return nn.Dense(3, name='fc2')(x)


@pytest.fixture(scope='module')
def problem():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (16, 5)) + 1.0
  y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  variables = model.init(jax.random.key(2), x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  apply_with_stats = mac_optax.capture(model.apply)

  def loss_fn(params):
    logits, stats = apply_with_stats({'params': params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, stats

  return variables['params'], layers, jax.value_and_grad(loss_fn, has_aux=True)


def _run(tx, problem, steps=4, **extra):
  params, _, grad_fn = problem
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    (loss, stats), grads = grad_fn(params)
    updates, state = tx.update(grads, state, params, mac_stats=stats, **extra)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert len(traces) == 1, 'the step recompiled'
  return params, state, losses


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  # chex also checks that the structures and leaf shapes agree.
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def test_mac_alias_equals_its_optax_chain_and_trains(problem):
  _, layers, _ = problem
  kwargs = dict(damping=0.5, stat_decay=0.9, t_cov=2, t_inv=3)
  alias = mac_optax.mac(0.1, layers=layers, momentum=0.8, weight_decay=1e-3,
                        **kwargs)
  chain = optax.chain(
      mac_optax.scale_by_mac(layers, **kwargs),
      optax.trace(decay=0.8),
      optax.add_decayed_weights(1e-3),
      optax.scale(-0.1),
  )
  params_alias, _, losses = _run(alias, problem, steps=6)
  params_chain, _, _ = _run(chain, problem, steps=6)
  _assert_trees_close(params_alias, params_chain)
  assert losses[-1] < losses[0]


def test_unknown_extra_args_are_ignored_without_recompiling(problem):
  _, layers, _ = problem
  _run(mac_optax.mac(0.1, layers=layers), problem,
       unexpected_extra_args_your_optimizer_doesnt_expect=1)


def test_learning_rate_schedule(problem):
  _, layers, _ = problem
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  scheduled, _, _ = _run(mac_optax.mac(schedule, layers=layers), problem)
  constant, _, _ = _run(mac_optax.mac(0.1, layers=layers), problem)
  first, _, _ = _run(mac_optax.mac(0.1, layers=layers), problem, steps=1)
  first_scheduled, _, _ = _run(mac_optax.mac(schedule, layers=layers),
                               problem, steps=1)
  _assert_trees_close(first, first_scheduled)
  assert not np.allclose(scheduled['fc1']['kernel'], constant['fc1']['kernel'])


def test_inject_hyperparams(problem):
  params, layers, _ = problem
  injected = optax.inject_hyperparams(mac_optax.mac)(
      learning_rate=0.1, layers=layers, damping=2.0, stat_decay=0.9,
      t_inv=2)
  plain = mac_optax.mac(0.1, layers=layers, damping=2.0, stat_decay=0.9,
                        t_inv=2)
  params_injected, state, _ = _run(injected, problem)
  params_plain, plain_state, _ = _run(plain, problem)
  _assert_trees_close(params_injected, params_plain)
  _assert_trees_close(state.inner_state, plain_state)
  # A changed injected damping acts like constructing with that damping.
  state = injected.init(params)
  state.hyperparams['damping'] = jnp.asarray(0.25)
  state.hyperparams['learning_rate'] = jnp.asarray(0.05)
  _, _, grad_fn = problem
  (_, stats), grads = grad_fn(params)
  updates, _ = injected.update(grads, state, params, mac_stats=stats)
  other = mac_optax.mac(0.05, layers=layers, damping=0.25, stat_decay=0.9,
                        t_inv=2)
  expected, _ = other.update(grads, other.init(params), params,
                             mac_stats=stats)
  _assert_trees_close(updates, expected)


def test_masked_only_preconditions_selected_layers(problem):
  params, layers, grad_fn = problem
  mask = {'fc1': {'kernel': True, 'bias': True},
          'fc2': {'kernel': False, 'bias': False},
          'norm': {'scale': False, 'bias': False}}
  tx = optax.masked(mac_optax.scale_by_mac(layers), mask)
  state = tx.init(params)
  assert set(state.inner_state.mean_input_ema) == {'fc1'}
  (_, stats), grads = grad_fn(params)
  updates, _ = jax.jit(tx.update)(grads, state, params, mac_stats=stats)
  full = mac_optax.scale_by_mac(layers)
  expected, _ = full.update(grads, full.init(params), params, mac_stats=stats)
  _assert_trees_close(updates['fc1'], expected['fc1'])
  _assert_trees_close(updates['fc2'], grads['fc2'], rtol=0, atol=0)
  assert not np.allclose(updates['fc2']['kernel'], expected['fc2']['kernel'])


def test_partition_mac_layers_and_adamw_for_the_rest(problem):
  params, layers, grad_fn = problem
  labels = jax.tree.map(lambda p: 'mac' if p else 'other',
                        mac_optax.precondition_mask(layers, params))
  assert labels['norm'] == {'scale': 'other', 'bias': 'other'}
  assert labels['fc1'] == {'kernel': 'mac', 'bias': 'mac'}
  tx = optax.partition(
      {'mac': mac_optax.mac(0.1, layers=layers), 'other': optax.adamw(1e-3)},
      labels)
  params_partition, _, losses = _run(tx, problem)
  assert losses[-1] < losses[0]
  (_, stats), grads = grad_fn(params)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  mac_only = mac_optax.mac(0.1, layers=layers)
  expected, _ = mac_only.update(grads, mac_only.init(params), params,
                                mac_stats=stats)
  _assert_trees_close(updates['fc2'], expected['fc2'])
  adamw = optax.adamw(1e-3)
  expected_norm, _ = adamw.update(grads, adamw.init(params), params)
  _assert_trees_close(updates['norm'], expected_norm['norm'])
  # Over several steps: the twin runs MAC and AdamW on the whole tree and
  # takes each leaf's update from the optimizer its label names.
  def twin_update(grads, state, params, mac_stats):
    mac_updates, mac_state = mac_only.update(grads, state[0], params,
                                             mac_stats=mac_stats)
    adamw_updates, adamw_state = adamw.update(grads, state[1], params)
    updates = jax.tree.map(lambda label, m, a: m if label == 'mac' else a,
                           labels, mac_updates, adamw_updates)
    return updates, (mac_state, adamw_state)

  twin = optax.GradientTransformationExtraArgs(
      lambda params: (mac_only.init(params), adamw.init(params)), twin_update)
  params_twin, _, twin_losses = _run(twin, problem)
  _assert_trees_close(params_partition, params_twin)
  np.testing.assert_allclose(losses, twin_losses, rtol=1e-6)


def test_apply_if_finite_skips_nonfinite_steps(problem):
  params, layers, grad_fn = problem
  tx = optax.apply_if_finite(mac_optax.mac(0.1, layers=layers), 2)
  state = tx.init(params)
  (_, stats), grads = grad_fn(params)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  updates, state = tx.update(bad, state, params, mac_stats=stats)
  assert int(state.notfinite_count) == 1
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)
  assert int(state.inner_state[0].count) == 0
  updates, state = tx.update(grads, state, params, mac_stats=stats)
  assert int(state.inner_state[0].count) == 1
  assert np.all(np.isfinite(updates['fc1']['kernel']))


def test_weight_decay_mask(problem):
  params, layers, grad_fn = problem
  mask = jax.tree.map(lambda p: p.ndim > 1, params)
  tx = mac_optax.mac(0.1, layers=layers, momentum=0.0, weight_decay=0.5,
                     weight_decay_mask=mask)
  no_decay = mac_optax.mac(0.1, layers=layers, momentum=0.0, weight_decay=0.0)
  (_, stats), grads = grad_fn(params)
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  plain, _ = no_decay.update(grads, no_decay.init(params), params,
                             mac_stats=stats)
  _assert_trees_close(updates['fc1']['bias'], plain['fc1']['bias'])
  np.testing.assert_allclose(
      updates['fc1']['kernel'],
      plain['fc1']['kernel'] - 0.1 * 0.5 * params['fc1']['kernel'],
      rtol=1e-5, atol=1e-7)


def test_state_is_a_plain_pytree_of_arrays(problem):
  params, layers, _ = problem
  state = mac_optax.mac(0.1, layers=layers).init(params)
  mac_state = optax.tree.get(state, 'mean_input_ema')
  assert set(mac_state) == {'fc1', 'fc2'}
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array)
  abstract = jax.eval_shape(mac_optax.mac(0.1, layers=layers).init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_map_params_reaches_only_param_shaped_state(problem):
  params, layers, _ = problem
  tx = mac_optax.mac(0.1, layers=layers)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda p: p.astype(jnp.bfloat16), state,
                                 transform_non_params=lambda x: x)
  trace_state = mapped[1]
  assert trace_state.trace['fc1']['kernel'].dtype == jnp.bfloat16
  assert mapped[0].mean_input_ema['fc1'].dtype == jnp.float32
