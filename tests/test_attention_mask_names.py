"""``register_attention(mask='<argument name>')``: the name form of the mask.

A named argument of shape ``(batch, keys)`` is a key-padding mask, as Hugging
Face models pass ``attention_mask``; it must give the same statistic as the
explicit callable ``args['attention_mask'][:, None, None, :] > 0`` and the
float64 oracle, whether the batch size equals the length or not (when it
does, broadcasting it as a ``(queries, keys)`` mask would silently be
wrong). A mask that fits neither form raises, naming the module.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
import oracles

RTOL, ATOL = 2e-5, 2e-6
HEADS, WIDTH = 2, 4


class PaddedAttention(nn.Module):
  """Separate Dense projections, heads by reshaping, a (B, T) padding mask."""

  @nn.compact
  def __call__(self, hidden, attention_mask):
    batch, length, width = hidden.shape
    split = lambda t: t.reshape(batch, length, HEADS, width // HEADS)
    query = split(nn.Dense(width, name='query')(hidden))
    key = split(nn.Dense(width, name='key')(hidden))
    value = split(nn.Dense(width, name='value')(hidden))
    weights = self.weights(query, key, attention_mask)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    return context.reshape(batch, length, width)

  def weights(self, query, key, attention_mask):
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e10)
    return nn.dot_product_attention_weights(query, key, bias=bias)


class ByName(PaddedAttention):
  pass


class ByCallable(PaddedAttention):
  pass


class CausalByName(PaddedAttention):
  """The same under a causal mask too (applied by MAC from ``causal=``)."""

  def weights(self, query, key, attention_mask):
    batch, length = attention_mask.shape
    mask = nn.combine_masks(attention_mask[:, None, None, :] > 0,
                            nn.make_causal_mask(jnp.ones((batch, length))))
    return nn.dot_product_attention_weights(query, key, mask=mask)


mac_optax.register_attention(ByName, num_heads=HEADS, mask='attention_mask')
mac_optax.register_attention(
    ByCallable, num_heads=HEADS,
    mask=lambda module, args: args['attention_mask'][:, None, None, :] > 0)
mac_optax.register_attention(CausalByName, num_heads=HEADS,
                             mask='attention_mask', causal=True)


def _value_stat(model, hidden, attention_mask):
  variables = model.init(jax.random.key(0), hidden, attention_mask)
  layers = mac_optax.find_layers(model.apply, variables, hidden,
                                 attention_mask)
  assert layers['value',].kind == 'attention_value'
  _, stats = jax.jit(mac_optax.capture(model.apply))(variables, hidden,
                                                      attention_mask)
  return variables, stats['value']['mean_input']


def _oracle(variables, hidden, padding, causal=False):
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        variables['params'])
  x = np.asarray(hidden, np.float64)
  project = lambda name: (x @ params[name]['kernel'] + params[name]['bias'])
  split = lambda t: t.reshape(t.shape[:2] + (HEADS, -1))
  length = x.shape[1]
  mask = np.broadcast_to((np.asarray(padding) > 0)[:, None, None, :],
                         (x.shape[0], 1, length, length))
  if causal:
    mask = mask & np.tril(np.ones((length, length), bool))
  probs = oracles.attention_probs(split(project('query')),
                                  split(project('key')), mask)
  return oracles.attention_value_mean(probs, x, True, mask)


# Batch size 3 == length 3, and batch size 2 != length 5; some keys padded.
MASKS = {
    'batch==length': np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]]),
    'batch!=length': np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
}


@pytest.mark.parametrize('name', list(MASKS))
def test_name_and_callable_forms_agree_with_the_oracle(name):
  padding = jnp.asarray(MASKS[name])
  hidden = jax.random.normal(jax.random.key(1),
                             padding.shape + (WIDTH,)) + 0.5
  variables, by_name = _value_stat(ByName(), hidden, padding)
  _, by_callable = _value_stat(ByCallable(), hidden, padding)
  expected = _oracle(variables, hidden, padding)
  np.testing.assert_allclose(by_name, expected, RTOL, ATOL)
  np.testing.assert_allclose(by_callable, expected, RTOL, ATOL)
  if padding.shape[0] == padding.shape[1]:
    # Broadcast as a (queries, keys) mask instead, the statistic differs.
    params = variables['params']
    x = np.asarray(hidden, np.float64)
    split = lambda t: t.reshape(t.shape[:2] + (HEADS, -1))
    project = lambda n: split(x @ np.asarray(params[n]['kernel'], np.float64)
                              + np.asarray(params[n]['bias'], np.float64))
    as_queries_keys = np.asarray(padding, bool)[None, None]
    wrong = oracles.attention_value_mean(
        oracles.attention_probs(project('query'), project('key'),
                                as_queries_keys), x, True, as_queries_keys)
    assert not np.allclose(by_name, wrong, RTOL, 1e-3)


@pytest.mark.parametrize('name', list(MASKS))
def test_name_form_with_causal(name):
  padding = jnp.asarray(MASKS[name])
  hidden = jax.random.normal(jax.random.key(2),
                             padding.shape + (WIDTH,)) - 0.3
  variables, by_name = _value_stat(CausalByName(), hidden, padding)
  np.testing.assert_allclose(
      by_name, _oracle(variables, hidden, padding, causal=True), RTOL, ATOL)


class ExtraMask(PaddedAttention):
  """Computes under ``attention_mask``; its rule reads the mask ``extra``."""

  @nn.compact
  def __call__(self, hidden, attention_mask, extra):
    del extra
    return super().__call__(hidden, attention_mask)


mac_optax.register_attention(ExtraMask, num_heads=HEADS, mask='extra')


@pytest.mark.parametrize('shape', [(2, 4), (2, 5, 5, 5), (3, 1, 5, 5)],
                         ids=['wrong-length', 'wrong-heads', 'wrong-batch'])
def test_a_mask_that_does_not_fit_raises_naming_the_module(shape):
  hidden = jnp.ones((2, 5, WIDTH))
  padding = jnp.ones((2, 5))

  class Model(nn.Module):

    @nn.compact
    def __call__(self, hidden, extra):
      return ExtraMask(name='attention')(hidden, padding, extra)

  model = Model()
  variables = model.init(jax.random.key(0), hidden, padding)
  with pytest.raises(ValueError, match=r'attention attention \(ExtraMask\):'
                     r' its mask has shape'):
    mac_optax.find_layers(model.apply, variables, hidden, jnp.ones(shape))
