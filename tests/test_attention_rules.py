"""Attention written by hand, declared once per class with register_attention.

Hugging Face-style separate projections under a padding mask, fused qkv
projections in both layouts under a causal mask, einsum projections with
explicit head axes, and probabilities the module exposes itself. Oracles
recompute the attention in float64 numpy from the recorded projections and
apply the dense reference preconditioner per output block.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax
import oracles

RTOL, ATOL = 2e-5, 2e-6
HEADS, WIDTH = 2, 8


class HFSelfAttention(nn.Module):
  """Like Hugging Face's Flax BERT: three Dense, heads by reshaping."""

  num_heads: int = HEADS

  @nn.compact
  def __call__(self, hidden, attention_mask):
    batch, length, width = hidden.shape
    head_dim = width // self.num_heads
    split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
    query = split(nn.Dense(width, name='query')(hidden))
    key = split(nn.Dense(width, name='key')(hidden))
    value = split(nn.Dense(width, name='value')(hidden))
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e10)
    weights = nn.dot_product_attention_weights(query, key, bias=bias)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    return nn.Dense(width, name='output')(context.reshape(batch, length, -1))


class FusedCausalAttention(nn.Module):
  """Like GPT-2: one Dense produces q, k and v; causal softmax."""

  layout: str = 'qkv'
  num_heads: int = HEADS

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    qkv = nn.Dense(3 * width, name='c_attn')(x)
    if self.layout == 'qkv':
      parts = qkv.reshape(batch, length, 3, self.num_heads, -1)
      query, key, value = parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]
    else:
      parts = qkv.reshape(batch, length, self.num_heads, 3, -1)
      query, key, value = parts[..., 0, :], parts[..., 1, :], parts[..., 2, :]
    mask = nn.make_causal_mask(jnp.ones((batch, length)))
    weights = nn.dot_product_attention_weights(query, key, mask=mask)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    return nn.Dense(width, name='c_proj')(context.reshape(batch, length, -1))


class FusedHeadsAttention(FusedCausalAttention):
  layout: str = 'heads'


class EinsumAttention(nn.Module):
  """Projections as Einsum with explicit head axes; sows its probabilities."""

  @nn.compact
  def __call__(self, x, mask):
    project = lambda name: nn.Einsum(
        (WIDTH, HEADS, WIDTH // HEADS), 'btd,dhk->bthk', name=name)(x)
    query, key, value = project('q'), project('k'), project('v')
    weights = nn.dot_product_attention_weights(query, key, mask=mask)
    self.sow('intermediates', 'probabilities', weights)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, value)
    return nn.Einsum((HEADS, WIDTH // HEADS, WIDTH), 'bthk,hkd->btd',
                     name='o')(context)


mac_optax.register_attention(
    HFSelfAttention,
    num_heads=lambda module: module.num_heads,
    mask=lambda module, args: args['attention_mask'][:, None, None, :] > 0,
)
for _cls, _layout in ((FusedCausalAttention, 'qkv'),
                      (FusedHeadsAttention, 'heads')):
  mac_optax.register_attention(
      _cls, qkv='c_attn', qkv_layout=_layout, causal=True,
      num_heads=lambda module: module.num_heads, mask=None)
mac_optax.register_attention(
    EinsumAttention, query='q', key='k', value='v',
    probabilities=lambda module, args, outputs: module.get_variable(
        'intermediates', 'probabilities')[-1],
)


class Wrapped(nn.Module):
  """A Dense in front, so the attention input is not the model input."""

  attention: nn.Module

  @nn.compact
  def __call__(self, x, *args):
    return self.attention(nn.Dense(WIDTH, name='embed')(x), *args)


def _run(attention, x, *args, value_stat='reference'):
  model = Wrapped(attention)
  variables = model.init(jax.random.key(0), x, *args)
  apply_with_stats = mac_optax.capture(model.apply, value_stat=value_stat)
  _, stats = jax.jit(apply_with_stats)(variables, x, *args)
  layers = mac_optax.find_layers(apply_with_stats, variables, x, *args)
  _, _, raw = oracles.apply_recording(model, variables, x, *args)
  return variables['params'], stats, layers, raw


def _inputs(shape=(3, 5, 4)):
  return jax.random.normal(jax.random.key(1), shape) + 0.5


@pytest.mark.parametrize('per_head', [False, True])
def test_hugging_face_style_attention_under_padding(per_head):
  x = _inputs()
  attention_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0],
                              [1, 1, 0, 0, 0]])
  params, stats, layers, raw = _run(
      HFSelfAttention(), x, attention_mask,
      value_stat='per_head' if per_head else 'reference')
  attention = raw['attention']
  split = lambda t: t.reshape(t.shape[:2] + (HEADS, -1))
  mask = (np.asarray(attention_mask) > 0)[:, None, None, :]
  probs = oracles.attention_probs(split(attention['query']['outputs'][0]),
                                  split(attention['key']['outputs'][0]), mask)
  expected = oracles.attention_value_mean(
      probs, attention['value']['inputs'][0], True, mask, per_head)
  value = stats['attention']['value']['mean_input']
  np.testing.assert_allclose(value, expected, RTOL, ATOL)
  plain = oracles.dense_mean(attention['query']['inputs'][0], 1, True)
  for name in ('query', 'key', 'output'):
    assert layers[('attention', name)].kind == 'dense'
  np.testing.assert_allclose(stats['attention']['query']['mean_input'],
                             plain, RTOL, ATOL)
  spec = layers[('attention', 'value')]
  assert (spec.kind, spec.blocks) == ('attention_value',
                                      HEADS if per_head else 1)
  table = mac_optax.summary(layers, params)
  value_rows = [r for r in table.splitlines()
                if r.startswith('attention/value/')]
  assert all('recomputed probabilities of attention' in r
             for r in value_rows), value_rows
  _check_update(params['attention']['value'], stats['attention']['value'],
                layers[('attention', 'value')],
                np.reshape(expected, (-1, expected.shape[-1])))


def _check_update(params, node, spec, block_means):
  """scale_by_mac on one layer against the per-block dense reference."""
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  kernel, bias = mac_optax.precondition(
      grads['kernel'], grads['bias'], node['mean_input'], spec, 0.3)
  expected_kernel, expected_bias = oracles.precondition_layer(
      grads['kernel'], grads['bias'], block_means, 0.3, 'dense',
      len(spec.in_shape))
  np.testing.assert_allclose(kernel, expected_kernel, RTOL, ATOL)
  np.testing.assert_allclose(bias, expected_bias, RTOL, ATOL)


@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('attention', [FusedCausalAttention(),
                                       FusedHeadsAttention()],
                         ids=['qkv-layout', 'heads-layout'])
def test_fused_qkv_projection_gets_value_statistic_on_value_blocks(
    attention, per_head):
  x = _inputs((2, 6, 4))
  params, stats, layers, raw = _run(
      attention, x, value_stat='per_head' if per_head else 'reference')
  fused = raw['attention']['c_attn']
  inputs, outputs = fused['inputs'][0], fused['outputs'][0]
  if attention.layout == 'qkv':
    parts = outputs.reshape(outputs.shape[:2] + (3, HEADS, -1))
    query, key = parts[:, :, 0], parts[:, :, 1]
  else:
    parts = outputs.reshape(outputs.shape[:2] + (HEADS, 3, -1))
    query, key = parts[..., 0, :], parts[..., 1, :]
  causal = np.tril(np.ones((6, 6), bool))[None, None]
  probs = oracles.attention_probs(query, key, causal)
  value = np.reshape(oracles.attention_value_mean(
      probs, inputs, True, causal, per_head), (-1, WIDTH + 1))
  plain = oracles.dense_mean(inputs, 1, True)
  if attention.layout == 'qkv':
    value_rows = value if per_head else value[:1]
    plain_rows = np.repeat(plain[None], len(value_rows), 0)
    expected = np.concatenate([plain_rows, plain_rows, value_rows])
  else:
    expected = np.stack([
        row for h in range(HEADS)
        for row in (plain, plain, value[h if per_head else 0])])
  spec = layers[('attention', 'c_attn')]
  assert (spec.kind, spec.blocks) == ('attention_qkv', len(expected))
  node = stats['attention']['c_attn']
  np.testing.assert_allclose(node['mean_input'], expected, RTOL, ATOL)
  _check_update(params['attention']['c_attn'], node, spec, expected)


def test_einsum_projections_with_exposed_probabilities():
  x = _inputs()
  mask = np.asarray(
      np.arange(5)[None, None, None, :] < np.array([5, 4, 2])[:, None, None,
                                                              None])
  mask = np.broadcast_to(mask, (3, 1, 5, 5)) & np.tril(
      np.ones((5, 5), bool))[None, None]
  params, stats, layers, raw = _run(EinsumAttention(), x, mask)
  attention = raw['attention']
  probs = oracles.attention_probs(attention['q']['outputs'][0],
                                  attention['k']['outputs'][0], mask)
  expected = oracles.attention_value_mean(
      probs, attention['v']['inputs'][0], True, mask)
  np.testing.assert_allclose(stats['attention']['v']['mean_input'], expected,
                             RTOL, ATOL)
  assert layers[('attention', 'v')].kind == 'attention_value'
  assert layers[('attention', 'o')].in_shape == (HEADS, WIDTH // HEADS)
  sources = layers.value_sources[('attention', 'v')]
  assert 'model probabilities' in sources
  del params


def test_split_batches_of_a_fused_projection_merge_exactly():
  attention = FusedHeadsAttention()
  model = Wrapped(attention)
  x = _inputs((4, 6, 4))
  variables = model.init(jax.random.key(0), x)
  apply_with_stats = jax.jit(mac_optax.capture(model.apply))
  _, full = apply_with_stats(variables, x)
  parts = [apply_with_stats(variables, x[s])[1]
           for s in (slice(0, 1), slice(1, 4))]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, RTOL, ATOL),
               mac_optax.merge_stats(parts), full)


def test_attention_rule_with_missing_projection_names_the_module():
  class Unnamed(nn.Module):

    @nn.compact
    def __call__(self, x):
      q = nn.Dense(WIDTH)(x).reshape(x.shape[:2] + (HEADS, -1))
      v = nn.Dense(WIDTH, name='value')(x).reshape(x.shape[:2] + (HEADS, -1))
      weights = nn.dot_product_attention_weights(q, q)
      return jnp.einsum('bhqk,bkhd->bqhd', weights, v).sum()

  mac_optax.register_attention(Unnamed, num_heads=HEADS, mask=None)
  model = Wrapped(Unnamed())
  x = _inputs()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='attention attention: its query and'
                     ' key projection was not seen'):
    mac_optax.capture(model.apply)(variables, x)
