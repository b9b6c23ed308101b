"""The presets: ``mac_adamw`` (MAC beside AdamW) and ``preconditioned``
(MAC's preconditioner before another optimizer).

Oracles: ``mac_adamw`` against the two optimizers run on every parameter and
picked leaf by leaf (no ``optax.partition``); ``preconditioned`` against a
float64 numpy formulation of the rank-one preconditioner followed by Adam;
the NNX model against its linen twin; gradient accumulation against one
large batch; a resumed checkpoint against an unbroken run.
"""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mac_optax
import small_vit

MAC = dict(momentum=0.9, weight_decay=1e-2, damping=0.5, stat_decay=0.9,
           t_cov=1, t_inv=2)


def _decays(params):
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def _mac_adamw(layers, **overrides):
  return mac_optax.mac_adamw(0.1, layers=layers, adam_learning_rate=3e-3,
                             adam_weight_decay=0.05,
                             weight_decay_mask=_decays, **{**MAC, **overrides})


@pytest.fixture(scope='module')
def vit():
  model, params, layers, apply_with_stats = small_vit.build(batch_size=8)
  return dict(model=model, params=params, layers=layers,
              apply=apply_with_stats, data=small_vit.batches(4, 8, seed=3))


def test_labels_put_the_found_layers_on_mac_and_the_rest_on_adamw(vit):
  labels = mac_optax.layer_labels(vit['layers'])(vit['params'])
  flat = {k: str(v) for k, v in small_vit.flat(labels).items()}
  mac = sorted(k for k, v in flat.items() if v == 'mac')
  rest = sorted(k for k, v in flat.items() if v == 'rest')
  assert rest == ['cls', 'ln1/bias', 'ln1/scale', 'ln2/bias', 'ln2/scale',
                  'pos']
  # Kernel and bias of the patch embedding, q/k/v/out, both MLP layers and
  # the head.
  modules = ['attn/key', 'attn/out', 'attn/query', 'attn/value', 'embed',
             'fc1', 'fc2', 'head']
  assert mac == sorted(f'{m}/{leaf}' for m in modules
                       for leaf in ('bias', 'kernel'))
  # summary says the same, row by row (between its header and totals lines).
  rows = mac_optax.summary(vit['layers'], vit['params']).splitlines()[1:-1]
  status = {r.split()[0]: 'not preconditioned' not in r for r in rows}
  assert status == {k: v == 'mac' for k, v in flat.items()}


def _picked(a_tree, b_tree, labels):
  return jax.tree.map(lambda a, b, label: a if label == 'mac' else b,
                      a_tree, b_tree, labels)


def test_mac_adamw_is_mac_on_the_layers_and_adamw_elsewhere(vit):
  """Both optimizers run on every parameter; the preset must equal MAC's
  update on the preconditioned leaves and AdamW's on the others."""
  layers, params = vit['layers'], vit['params']
  labels = mac_optax.layer_labels(layers)(params)
  preset = _mac_adamw(layers)
  mac = mac_optax.mac(0.1, layers=layers, weight_decay_mask=_decays, **MAC)
  adamw = optax.adamw(3e-3, weight_decay=0.05, mask=_decays)
  grad_fn = jax.jit(jax.grad(small_vit.loss_fn(vit['apply']), has_aux=True))
  states = [tx.init(params) for tx in (preset, mac, adamw)]
  updates_of = [jax.jit(tx.update) for tx in (preset, mac, adamw)]
  for x, y in vit['data']:
    grads, stats = grad_fn(params, x, y)
    outs = [update(grads, state, params, mac_stats=stats)
            for update, state in zip(updates_of, states)]
    states = [state for _, state in outs]
    (preset_updates, _), (mac_updates, _), (adamw_updates, _) = outs
    expected = _picked(mac_updates, adamw_updates, labels)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                         atol=1e-7),
                 preset_updates, expected)
    params = optax.apply_updates(params, preset_updates)
  # The two parts really differ on these leaves.
  assert not np.allclose(mac_updates['pos'], adamw_updates['pos'])


def test_rest_replaces_adamw(vit):
  layers, params = vit['layers'], vit['params']
  labels = mac_optax.layer_labels(layers)(params)
  preset = mac_optax.mac_adamw(0.1, layers=layers, rest=optax.sgd(0.5),
                               **MAC)
  x, y = vit['data'][0]
  grads, stats = jax.grad(small_vit.loss_fn(vit['apply']), has_aux=True)(
      params, x, y)
  updates, _ = preset.update(grads, preset.init(params), params,
                             mac_stats=stats)
  mac_updates, _ = mac_optax.mac(0.1, layers=layers, **MAC).update(
      grads, mac_optax.mac(0.1, layers=layers, **MAC).init(params), params,
      mac_stats=stats)
  expected = _picked(mac_updates, jax.tree.map(lambda g: -0.5 * g, grads),
                     labels)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               updates, expected)


def test_mac_adamw_says_what_is_missing(vit):
  with pytest.raises(ValueError, match='needs adam_learning_rate'):
    mac_optax.mac_adamw(0.1, layers=vit['layers'])
  with pytest.raises(ValueError, match='`rest` replaces it'):
    mac_optax.mac_adamw(0.1, layers=vit['layers'], rest=optax.sgd(0.1),
                        adam_learning_rate=1e-3)


class _TwoDense(nn.Module):

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(5, name='first')(x))
    return nn.Dense(3, name='second')(hidden)


def test_preconditioned_adam_matches_numpy_rank_one_then_adam():
  """Every step refreshes the preconditioner from this batch (t_cov = t_inv
  = 1, stat_decay 0): Adam must see G (I - â âᵀ / (λ + ‖â‖²)) with â the
  mean layer input (and 1 for the bias), computed here in float64."""
  model = _TwoDense()
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(6, 4)).astype(np.float32) + 0.5 for _ in range(3)]
  targets = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(3)]
  params = model.init(jax.random.key(0), xs[0])['params']
  layers = mac_optax.find_layers(model.apply, {'params': params}, xs[0])
  damping, lr, b1, b2, eps = 0.7, 0.01, 0.9, 0.999, 1e-8
  tx = mac_optax.preconditioned(optax.adam(lr, b1=b1, b2=b2, eps=eps),
                                layers=layers, damping=damping,
                                stat_decay=0.0, t_cov=1, t_inv=1)
  apply_with_stats = mac_optax.capture(model.apply)

  def loss(params, x, t):
    out, stats = apply_with_stats({'params': params}, x)
    return jnp.mean((out - t) ** 2), stats

  state = tx.init(params)
  theta = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  m = jax.tree.map(np.zeros_like, theta)
  v = jax.tree.map(np.zeros_like, theta)
  for step, (x, t) in enumerate(zip(xs, targets), start=1):
    grads, stats = jax.grad(loss, has_aux=True)(params, x, t)
    updates, state = tx.update(grads, state, params, mac_stats=stats)
    # The oracle: inputs of each layer from the float64 forward pass.
    x64 = x.astype(np.float64)
    hidden = np.maximum(x64 @ theta['first']['kernel']
                        + theta['first']['bias'], 0)
    g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
    for name, inputs in (('first', x64), ('second', hidden)):
      mean = np.append(inputs.mean(0), 1.0)
      stacked = np.vstack([g[name]['kernel'], g[name]['bias'][None]])
      stacked = stacked - np.outer(mean, mean @ stacked) / (damping
                                                            + mean @ mean)
      g[name] = {'kernel': stacked[:-1], 'bias': stacked[-1]}
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
    expected = jax.tree.map(
        lambda m, v: -lr * (m / (1 - b1**step))
        / (np.sqrt(v / (1 - b2**step)) + eps), m, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                         atol=1e-7),
                 updates, expected)
    params = optax.apply_updates(params, updates)
    theta = jax.tree.map(lambda p: np.asarray(p, np.float64), params)


def test_multi_steps_of_the_preset_is_one_large_batch(vit):
  """Two micro-batches of 4 accumulated = one batch of 8, for both parts."""
  layers, apply_with_stats = vit['layers'], vit['apply']
  params = vit['params']
  big = _mac_adamw(layers)
  x0 = vit['data'][0][0]
  example_stats = jax.eval_shape(apply_with_stats, {'params': params},
                                 x0[:4])[1]
  accumulated = mac_optax.multi_steps(_mac_adamw(layers), 2,
                                      example_stats=example_stats)
  step_big = jax.jit(small_vit.train_step(big, apply_with_stats))
  step_micro = jax.jit(small_vit.train_step(accumulated, apply_with_stats))
  p_big, s_big = params, big.init(params)
  p_micro, s_micro = params, accumulated.init(params)
  for x, y in vit['data'][:3]:
    p_big, s_big, _ = step_big(p_big, s_big, x, y)
    for half in (slice(0, 4), slice(4, 8)):
      p_micro, s_micro, _ = step_micro(p_micro, s_micro, x[half], y[half])
  assert small_vit.max_difference(p_big, p_micro) < 2e-5
  assert small_vit.max_difference(p_big, params) > 1e-3


def _run(tx, vit, params, state, data):
  step = jax.jit(small_vit.train_step(tx, vit['apply']))
  for x, y in data:
    params, state, _ = step(params, state, x, y)
  return params, state


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('preset', ['mac_adamw', 'preconditioned_muon'])
def test_checkpoint_round_trip_resumes_bit_identically(vit, preset, tmp_path):
  def make():
    if preset == 'mac_adamw':
      return _mac_adamw(vit['layers'])
    return mac_optax.preconditioned(optax.contrib.muon(0.02),
                                    layers=vit['layers'], **{
                                        k: MAC[k] for k in ('damping',
                                                            'stat_decay',
                                                            't_cov', 't_inv')})
  tx = make()
  params = vit['params']
  saved = _run(tx, vit, params, tx.init(params), vit['data'][:2])
  final = _run(tx, vit, *saved, vit['data'][2:])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', {'params': saved[0], 'opt': saved[1]})
  checkpointer.wait_until_finished()
  fresh = make()
  target = {'params': jax.eval_shape(lambda: params),
            'opt': jax.eval_shape(fresh.init, params)}
  restored = checkpointer.restore(tmp_path / 'ckpt', target)
  _assert_identical((restored['params'], restored['opt']), saved)
  resumed = _run(fresh, vit, restored['params'], restored['opt'],
                 vit['data'][2:])
  _assert_identical(resumed, final)
  data = flax.serialization.to_bytes({'opt': saved[1]})
  back = flax.serialization.from_bytes({'opt': fresh.init(params)}, data)
  _assert_identical(back['opt'], saved[1])


class _NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.first = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.second = nnx.Linear(8, 3, rngs=rngs)
    self.offset = nnx.Param(jnp.linspace(-0.5, 0.5, 3))

  def __call__(self, x):
    return self.second(nnx.relu(self.norm(self.first(x)))) + self.offset


class _LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.LayerNorm(name='norm')(nn.Dense(8, name='first')(x)))
    offset = self.param('offset', nn.initializers.zeros, (3,))
    return nn.Dense(3, name='second')(hidden) + offset


def test_nnx_optimizer_with_mac_adamw_matches_the_linen_twin():
  rng = np.random.default_rng(1)
  data = [(jnp.asarray(rng.normal(size=(6, 4)) + 0.3, jnp.float32),
           jnp.asarray(rng.normal(size=(6, 3)), jnp.float32))
          for _ in range(3)]

  def preset(layers):
    return mac_optax.mac_adamw(0.2, layers=layers, adam_learning_rate=0.01,
                               **MAC)

  model = _NnxNet(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  layers = mac_optax.find_layers(model, data[0][0])
  optimizer = nnx.Optimizer(model, preset(layers), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, t):
    def loss_fn(model):
      out, stats = mac_optax.capture(model)(x)
      return jnp.mean((out - t) ** 2), stats
    (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, mac_stats=stats)

  for x, t in data:
    nnx_step(model, optimizer, x, t)
  nnx_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  twin = _LinenNet()
  linen_layers = mac_optax.find_layers(twin.apply, {'params': params},
                                       data[0][0])
  tx = preset(linen_layers)
  apply_with_stats = mac_optax.capture(twin.apply)

  @jax.jit
  def linen_step(params, state, x, t):
    def loss_fn(params):
      out, stats = apply_with_stats({'params': params}, x)
      return jnp.mean((out - t) ** 2), stats
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for x, t in data:
    params, state = linen_step(params, state, x, t)
  assert small_vit.max_difference(nnx_params, params) < 1e-5
  # The norm and offset took AdamW's steps: ~ lr per step, not MAC's.
  start = nnx.to_pure_dict(nnx.state(_NnxNet(nnx.Rngs(0)), nnx.Param))
  moved = np.abs(np.asarray(params['offset']) - np.asarray(start['offset']))
  assert np.all(moved > 0.005) and np.all(moved < 0.031)
