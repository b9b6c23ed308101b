"""Captures that used to record the wrong thing, or nothing, without a word.

Wrappers of ``model.apply``, subclasses of known layers that change their
input, models whose training call needs a bound axis name, NNX's own
``nnx.capture`` around or inside MAC's, and models without a known layer.
Statistics are checked against numpy float64 means of what each kernel
multiplies.
"""

import warnings

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax

RTOL, ATOL = 2e-5, 2e-6


def _with_one(mean):
  return np.concatenate([mean, [1.0]])


def _row_mean(x):
  x = np.asarray(x, np.float64)
  return x.reshape(-1, x.shape[-1]).mean(axis=0)


def _assert_same_stats(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), RTOL, ATOL)


def _mlp():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  x = jax.random.normal(jax.random.key(1), (4, 3))
  variables = model.init(jax.random.key(0), x)
  return model, x, variables


def _mlp_oracle(variables, x):
  """float64 means of what each Dense kernel multiplies."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        variables['params'])
  x = np.asarray(x, np.float64)
  hidden = np.maximum(
      x @ params['layers_0']['kernel'] + params['layers_0']['bias'], 0.0)
  return {'layers_0': _with_one(_row_mean(x)),
          'layers_2': _with_one(_row_mean(hidden))}


# ---------------------------------------------------------------------------
# Wrappers of model.apply.


def test_a_wrapper_of_apply_is_captured_like_apply():
  model, x, variables = _mlp()

  def forward(variables, x, **kwargs):
    return model.apply(variables, x, **kwargs)

  def deeper(variables, x):  # through another function, no kwargs
    return 2.0 * forward(variables, x)

  direct_out, direct = mac_optax.capture(model.apply)(variables, x)
  oracle = _mlp_oracle(variables, x)
  for function in (forward, deeper, jax.jit(forward)):
    outputs, stats = jax.jit(mac_optax.capture(function))(variables, x)
    factor = 2.0 if function is deeper else 1.0
    np.testing.assert_allclose(outputs, factor * direct_out, RTOL, ATOL)
    _assert_same_stats(stats, direct)
    for name, mean in oracle.items():
      np.testing.assert_allclose(stats[name]['mean_input'], mean, RTOL, ATOL)
  layers = mac_optax.find_layers(forward, variables, x)
  assert dict(layers) == dict(mac_optax.find_layers(model.apply, variables, x))
  assert set(layers) == {('layers_0',), ('layers_2',)}


def test_a_wrapper_returns_what_apply_returns_with_mutable_state():
  model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
  x = jax.random.normal(jax.random.key(1), (6, 3))
  variables = model.init(jax.random.key(0), x)

  def forward(variables, x):
    return model.apply(variables, x, mutable=['batch_stats'])

  (outputs, state), stats = mac_optax.capture(forward)(variables, x)
  expected_outputs, expected_state = forward(variables, x)
  np.testing.assert_allclose(outputs, expected_outputs, RTOL, ATOL)
  _assert_same_stats(state, expected_state)
  np.testing.assert_allclose(stats['layers_0']['mean_input'],
                             _with_one(_row_mean(x)), RTOL, ATOL)


class _TiedHead(nn.Module):
  """Applies a Dense built on the fly through its own ``apply`` (BERT-style)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name='body')(x)
    embedding = self.param('embedding', nn.initializers.normal(), (5, 4))
    return nn.Dense(5, use_bias=False).apply(
        {'params': {'kernel': embedding.T}}, h)


def test_applies_nested_in_the_captured_one_pass_through_in_wrappers():
  model = _TiedHead()
  x = jax.random.normal(jax.random.key(1), (3, 2))
  variables = model.init(jax.random.key(0), x)
  _, stats = mac_optax.capture(lambda v, x: model.apply(v, x))(variables, x)
  assert list(stats) == ['body']
  np.testing.assert_allclose(stats['body']['mean_input'],
                             _with_one(_row_mean(x)), RTOL, ATOL)


def test_an_apply_inside_a_transformation_of_the_wrapper_raises():
  model, x, variables = _mlp()
  inner = jax.jit(lambda v, x: model.apply(v, x))

  def forward(variables, x):
    return inner(variables, x)

  with pytest.raises(ValueError, match='inside a JAX transformation'):
    mac_optax.capture(forward)(variables, x)
  inner(variables, x)  # now its trace is cached: the model never runs
  with pytest.raises(ValueError, match='no flax Module.apply ran'):
    mac_optax.capture(forward)(variables, x)
  _, stats = mac_optax.capture(forward, allow_empty=True)(variables, x)
  assert not stats
  assert nn.Module.apply is mac_optax._capture.module_apply.ORIGINAL_APPLY  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# No statistics although the model has kernels.


class _TransposedConv1D(nn.Module):
  """A GPT-2-style projection with a ``(out, in)`` kernel and no rule."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.normal(),
                        (self.features, x.shape[-1]))
    return x @ kernel.T


class _Mixed(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='head')(_TransposedConv1D(4, name='proj')(x))


def test_no_known_layer_is_an_error_unless_allowed():
  model = _TransposedConv1D(4)
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError,
                     match=r'<root> \(_TransposedConv1D\).*register_layer'):
    mac_optax.capture(model.apply)(variables, x)
  with pytest.raises(ValueError, match=r'_TransposedConv1D.*register_layer'):
    mac_optax.find_layers(model.apply, variables, x)
  _, stats = mac_optax.capture(model.apply, allow_empty=True)(variables, x)
  assert not stats

  def hf_style(inputs, params):  # the params are not the first argument
    return model.apply({'params': params}, inputs)

  with pytest.raises(ValueError, match=r'<root> \(_TransposedConv1D\)'):
    mac_optax.capture(hf_style)(x, variables['params'])
  layers = mac_optax.find_layers(model.apply, variables, x, allow_empty=True)
  assert not layers and layers.allow_empty


def test_a_kernel_without_a_rule_beside_known_layers_warns():
  model = _Mixed()
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match=r'proj \(_TransposedConv1D\)'):
    layers = mac_optax.find_layers(model.apply, variables, x)
  assert set(layers) == {('head',)} and not layers.allow_empty
  model, x, variables = _mlp()
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # every kernel has a rule: no warning
    mac_optax.find_layers(model.apply, variables, x)


class _NNXTransposed(nnx.Module):

  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

  def __call__(self, x):
    return x @ self.kernel.T


def test_nnx_without_a_known_layer_is_an_error_unless_allowed():
  model = _NNXTransposed(nnx.Rngs(0))
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r'_NNXTransposed.*register_layer'):
    mac_optax.capture(model)(x)
  with pytest.raises(ValueError, match=r'_NNXTransposed.*register_layer'):
    mac_optax.find_layers(model, x)
  assert not mac_optax.capture(model, allow_empty=True)(x)[1]
  assert mac_optax.find_layers(model, x, allow_empty=True).allow_empty


def test_with_stats_says_the_model_was_called_but_no_layer_had_a_rule():
  model = _TransposedConv1D(4)
  x = jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)['params']

  @mac_optax.with_stats
  def loss_fn(params):
    return jnp.sum(model.apply({'params': params}, x))

  with pytest.raises(ValueError) as error:
    loss_fn(params)
  message = str(error.value)
  assert 'called linen models through Module.apply' in message
  assert '<root> (_TransposedConv1D)' in message
  assert 'register_layer' in message
  assert 'call linen models through' not in message

  @mac_optax.with_stats
  def calls_nothing(params):
    return jnp.sum(params['kernel'])

  with pytest.raises(ValueError, match='called no linen Module.apply'):
    calls_nothing(params)

  nnx_model = _NNXTransposed(nnx.Rngs(0))

  @mac_optax.with_stats
  def nnx_loss(model):
    return jnp.sum(model(x))

  with pytest.raises(ValueError, match=r'got 1 NNX model.*_NNXTransposed'):
    nnx_loss(nnx_model)


# ---------------------------------------------------------------------------
# Subclasses of known layers that change their input.


class _ScaledDense(nn.Dense):

  def __call__(self, x):
    return super().__call__(2.0 * x)


class _SumDense(nn.Dense):

  def __call__(self, a, b):
    return super().__call__(a + b)


class _TwiceDense(nn.Dense):
  """Calls its own kernel on two inputs: both calls' rows count."""

  def __call__(self, x):
    return super().__call__(x) + super().__call__(x ** 2)


class _GatedDense(nn.Dense):
  """Calls another known layer inside itself, then its own kernel."""

  gate: nn.Module | None = None

  def __call__(self, x):
    return super().__call__(x * self.gate(x))


class _Gated(nn.Module):

  def setup(self):
    self.gate = nn.Dense(3)
    self.gated = _GatedDense(2, gate=self.gate)

  def __call__(self, x):
    return self.gated(x)


def test_linen_subclass_statistic_is_what_the_kernel_multiplies():
  x = jnp.ones((4, 3))
  model = _ScaledDense(2)
  variables = model.init(jax.random.key(0), x)
  _, stats = mac_optax.capture(model.apply)(variables, x)
  np.testing.assert_allclose(stats['mean_input'], [2.0, 2.0, 2.0, 1.0],
                             RTOL, ATOL)

  a = jax.random.normal(jax.random.key(1), (5, 3))
  b = jax.random.normal(jax.random.key(2), (5, 3))
  model = _SumDense(2)
  variables = model.init(jax.random.key(0), a, b)
  _, stats = jax.jit(mac_optax.capture(model.apply))(variables, a, b)
  np.testing.assert_allclose(
      stats['mean_input'],
      _with_one(_row_mean(np.asarray(a, np.float64) + np.asarray(b))),
      RTOL, ATOL)

  model = _TwiceDense(2)
  variables = model.init(jax.random.key(0), a)
  _, stats = mac_optax.capture(model.apply)(variables, a)
  both = np.concatenate([np.asarray(a, np.float64), np.asarray(a) ** 2.0])
  np.testing.assert_allclose(stats['mean_input'], _with_one(_row_mean(both)),
                             RTOL, ATOL)
  np.testing.assert_allclose(stats['rows'], 10.0)

  model = _Gated()
  variables = model.init(jax.random.key(0), a)
  _, stats = mac_optax.capture(model.apply)(variables, a)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64),
                        variables['params'])
  a64 = np.asarray(a, np.float64)
  gate = a64 @ params['gate']['kernel'] + params['gate']['bias']
  np.testing.assert_allclose(stats['gate']['mean_input'],
                             _with_one(_row_mean(a64)), RTOL, ATOL)
  np.testing.assert_allclose(stats['gated']['mean_input'],
                             _with_one(_row_mean(a64 * gate)), RTOL, ATOL)
  layers = mac_optax.find_layers(model.apply, variables, a)
  assert set(layers) == {('gated',), ('gate',)}


class _NNXScaled(nnx.Linear):

  def __call__(self, x):
    return super().__call__(2.0 * x)


class _NNXSum(nnx.Linear):

  def __call__(self, a, b):
    return super().__call__(a + b)


class _NNXPair(nnx.Module):

  def __init__(self, rngs):
    self.scaled = _NNXScaled(3, 4, rngs=rngs)
    self.summed = _NNXSum(4, 2, rngs=rngs)

  def __call__(self, x):
    h = self.scaled(x)
    return self.summed(h, jnp.tanh(h))


def test_nnx_subclass_statistic_is_what_the_kernel_multiplies():
  model = _NNXPair(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  _, stats = nnx.jit(lambda m, x: mac_optax.capture(m)(x))(model, x)
  x64 = np.asarray(x, np.float64)
  kernel = np.asarray(model.scaled.kernel.get_value(), np.float64)
  h = 2.0 * x64 @ kernel + np.asarray(model.scaled.bias.get_value())
  np.testing.assert_allclose(stats['scaled']['mean_input'],
                             _with_one(_row_mean(2.0 * x64)), RTOL, ATOL)
  np.testing.assert_allclose(stats['summed']['mean_input'],
                             _with_one(_row_mean(h + np.tanh(h))), RTOL, ATOL)
  # No wrapper stays on the classes.
  assert '__call__' not in vars(nnx.Linear) or not hasattr(
      vars(nnx.Linear)['__call__'], 'mac_optax_original')
  assert not hasattr(vars(_NNXScaled)['__call__'], 'mac_optax_original')


# ---------------------------------------------------------------------------
# A training call that needs a bound axis name (imagenet's BatchNorm).


class _ImagenetStyle(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), padding='VALID', use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name='batch')(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(3)(x)


def test_find_layers_binds_the_batch_norm_axis_name():
  model = _ImagenetStyle()
  x = jnp.ones((2, 6, 6, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  with pytest.raises(NameError):  # what the model does outside pmap
    model.apply(variables, x, train=True, mutable=['batch_stats'])
  layers = mac_optax.find_layers(model.apply, variables, x, train=True,
                                 mutable=['batch_stats'])
  assert dict(layers) == dict(
      mac_optax.find_layers(model.apply, variables, x, train=False))
  assert layers[('Conv_0',)].dim == 3 * 3 * 3
  assert layers[('Dense_0',)].dim == 4 + 1
  # The per-device training step under pmap captures the same layers.
  stats = jax.pmap(
      lambda v, x: mac_optax.capture(model.apply)(
          v, x, train=True, mutable=['batch_stats'])[1],
      axis_name='batch')(jax.tree.map(lambda a: a[None], variables), x[None])
  assert {k for k in stats} == {'Conv_0', 'Dense_0'}
  np.testing.assert_allclose(stats['Conv_0']['mean_input'][0],
                             np.ones(27), RTOL, ATOL)


class _NNXBatchNormed(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, axis_name='batch', rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm(self.lin(x)))


def test_find_layers_binds_the_axis_name_of_an_nnx_batch_norm():
  model = _NNXBatchNormed(nnx.Rngs(0))
  x = jnp.ones((2, 3))
  with pytest.raises(NameError):
    model(x)
  layers = mac_optax.find_layers(model, x)
  assert set(layers) == {('lin',), ('out',)}
  assert layers[('lin',)].dim == 4 and layers[('out',)].dim == 5


# ---------------------------------------------------------------------------
# NNX's own nnx.capture with MAC's capture, both ways round.


class _Sowing(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = self.lin(x)
    self.sow(nnx.Intermediate, 'hidden', h)
    return self.out(jax.nn.relu(h))

  def with_capture(self, x):  # Gemma-style: the model captures its own
    return nnx.capture(self, nnx.Intermediate)(x)


def _sowing_oracle(model, x):
  x64 = np.asarray(x, np.float64)
  h = (x64 @ np.asarray(model.lin.kernel.get_value(), np.float64)
       + np.asarray(model.lin.bias.get_value()))
  return h, {'lin': _with_one(_row_mean(x64)),
             'out': _with_one(_row_mean(np.maximum(h, 0.0)))}


def _check_sowing(model, x, outputs, intermediates, stats):
  hidden, oracle = _sowing_oracle(model, x)
  expected = (np.maximum(hidden, 0.0)
              @ np.asarray(model.out.kernel.get_value(), np.float64)
              + np.asarray(model.out.bias.get_value()))
  np.testing.assert_allclose(outputs, expected, RTOL, ATOL)
  np.testing.assert_allclose(intermediates['hidden'][0], hidden, RTOL, ATOL)
  for name, mean in oracle.items():
    np.testing.assert_allclose(stats[name]['mean_input'], mean, RTOL, ATOL)


def test_mac_capture_inside_nnx_capture():
  model = _Sowing(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))

  def forward(model, x):
    return mac_optax.capture(model)(x)

  (outputs, stats), intermediates = nnx.jit(
      nnx.capture(forward, nnx.Intermediate))(model, x)
  _check_sowing(model, x, outputs, intermediates, stats)


def test_nnx_capture_inside_mac_capture():
  model = _Sowing(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  (outputs, intermediates), stats = nnx.jit(
      lambda m, x: mac_optax.capture(m.with_capture)(x))(model, x)
  _check_sowing(model, x, outputs, intermediates, stats)

  @mac_optax.with_stats(has_aux=True)
  def loss_fn(model, x):
    outputs, intermediates = nnx.capture(model, nnx.Intermediate)(x)
    return jnp.sum(outputs), (outputs, intermediates)

  _, ((outputs, intermediates), stats) = loss_fn(model, x)
  _check_sowing(model, x, outputs, intermediates, stats)
  assert set(mac_optax.find_layers(loss_fn, model, x)) == {('lin',), ('out',)}


def test_hugging_face_call_is_captured_like_its_module_apply():
  """``model(ids, params=...)`` calls ``module.apply`` (and BERT's tied
  decoder applies the word embedding through a nested ``apply``)."""
  transformers = pytest.importorskip('transformers')
  if not hasattr(transformers, 'FlaxBertForMaskedLM'):
    pytest.skip('this transformers has no Flax models (4.x has them)')
  config = transformers.BertConfig(
      vocab_size=32, hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=32, max_position_embeddings=8)
  model = transformers.FlaxBertForMaskedLM(config, seed=0)
  ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 5), 0, 32))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)

  def forward(params, ids):
    return model(ids, attention_mask=mask, params=params).logits

  logits, stats = jax.jit(mac_optax.capture(forward))(model.params, ids)
  args = (ids, mask, np.zeros_like(ids),
          np.broadcast_to(np.arange(5), ids.shape), None)
  expected_out, expected = mac_optax.capture(model.module.apply)(
      {'params': model.params}, *args)
  np.testing.assert_allclose(logits, expected_out.logits, 1e-5, 1e-5)
  _assert_same_stats(stats, expected)
  owners = {tuple(k.key for k in keys[:-1])
            for keys, _ in jax.tree_util.tree_flatten_with_path(
                model.params)[0] if keys[-1].key == 'kernel'}
  layers = mac_optax.find_layers(forward, model.params, ids)
  assert set(layers) == owners
