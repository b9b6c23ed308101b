"""Hugging Face transformers' Flax models, tiny configs, no downloads.

BERT (masked LM), GPT-2 (LM), ViT (classification) and T5 (seq2seq) are
trained through their linen module, as a user would write it. Every kernel
of the model must be preconditioned (embeddings are not kernels), every
attention's value projection must get the attention-aware statistic, the
captured statistics must equal float64 numpy oracles (a dense input mean and
an attention value statistic built from the model's own attention weights,
returned with ``output_attentions=True``, and the mask), and a few MAC steps
must lower the loss.

Needs the ``transformers`` extra (``pip install mac-optax[transformers]``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mac_optax
import oracles

transformers = pytest.importorskip(
    'transformers',
    reason='transformers is not installed (pip install mac-optax[transformers]'
    ' for the Flax model tests)')
if not hasattr(transformers, 'FlaxGPT2LMHeadModel'):
  pytest.skip('this transformers has no Flax models (4.x has them)',
              allow_module_level=True)

from transformers.models.gpt2 import modeling_flax_gpt2  # pylint: disable=g-import-not-at-top

RTOL, ATOL = 1e-4, 1e-5
# Right-padded batch, batch size != length.
PADDING = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 0, 0, 0]], np.int32)
BATCH, LENGTH = PADDING.shape


def _tokens(seed, vocab, shape=(BATCH, LENGTH)):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 1, vocab),
                    np.int32)


def _recorded(apply_fn, variables, *args, **kwargs):
  """Runs ``apply_fn`` eagerly; also returns each projection's input/output.

  Keyed by module path, in float64, for ``nn.Dense`` and GPT-2's
  ``FlaxConv1D``; a plain interceptor of this test, not MAC's.
  """
  calls = {}

  def interceptor(next_fun, args_, kwargs_, context):
    outputs = next_fun(*args_, **kwargs_)
    module = context.module
    if (context.method_name == '__call__' and isinstance(
        module, (nn.Dense, modeling_flax_gpt2.FlaxConv1D))):
      calls[tuple(module.path)] = (np.asarray(args_[0], np.float64),
                                   np.asarray(outputs, np.float64))
    return outputs

  with nn.intercept_methods(interceptor):
    outputs = apply_fn(variables, *args, **kwargs)
  return outputs, calls


def _augment(rows):
  return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], -1)


def _dense_mean(inputs, has_bias):
  rows = inputs.reshape(-1, inputs.shape[-1])
  return (_augment(rows) if has_bias else rows).mean(0)


def _value_mean(probabilities, value_inputs, mask, has_bias):
  """Reference ``v = Σ_j p̄_j x̄_j``: ``p̄`` over unmasked queries."""
  probabilities = np.asarray(probabilities, np.float64)
  valid = np.broadcast_to(mask.any(-1)[:, None], probabilities.shape[:-1])
  p_bar = np.einsum('bhqk,bhq->k', probabilities, valid) / valid.sum()
  x = _augment(value_inputs) if has_bias else value_inputs
  return p_bar @ x.mean(0)


def _masks(padding, queries, causal):
  """``(batch, queries, keys)`` bool mask of a key-padding mask."""
  mask = np.broadcast_to(padding[:, None, :] > 0,
                         (padding.shape[0], queries, padding.shape[1]))
  if causal:
    mask = mask & np.tril(np.ones((queries, padding.shape[1]), bool))
  return mask


def _kernel_owners(params):
  return {tuple(k.key for k in keys[:-1])
          for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]
          if keys[-1].key == 'kernel'}


def _node(stats, path):
  for key in path:
    stats = stats[key]
  return stats


def _check_coverage(layers, params, attention_values, value_kind):
  """Every kernel preconditioned; every attention value attention-aware."""
  owners = _kernel_owners(params)
  assert set(layers) == owners
  table = mac_optax.summary(layers, params)
  assert table.splitlines()[-1].startswith(
      f'preconditioned kernels: {len(owners)} of {len(owners)};'), table
  assert 'looks like attention' not in table
  assert 'unknown layer' not in table
  assert attention_values
  for path in attention_values:
    assert layers[path].kind == value_kind, path
    assert 'value statistic from' in layers.value_sources[path]
  others = owners - set(attention_values)
  assert all(layers[p].kind in ('dense', 'conv') for p in others)


def _train(apply_with_stats, layers, params, loss_of, steps=4,
           learning_rate=0.1):
  """A few MAC steps; returns the losses before each step and after."""
  tx = mac_optax.mac(learning_rate, layers=layers, t_cov=1, t_inv=1)

  def loss_fn(params):
    outputs, stats = apply_with_stats({'params': params})
    return loss_of(outputs), stats

  @jax.jit
  def step(params, opt_state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  losses.append(float(jax.jit(loss_fn)(params)[0]))
  return losses


def _cross_entropy(logits, labels, weights=None):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if weights is None:
    return losses.mean()
  return (losses * weights).sum() / weights.sum()


# --------------------------------------------------------------------------


def test_gpt2_conv1d_and_fused_attention():
  config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2,
                                   vocab_size=64, n_positions=16)
  model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
  params = model.params
  ids = _tokens(0, 64)
  positions = np.broadcast_to(np.arange(LENGTH), ids.shape)
  args = (ids, PADDING, positions)

  # The lines a user writes.
  layers = mac_optax.find_layers(model.module.apply, {'params': params},
                                 *args)
  apply_with_stats = mac_optax.capture(model.module.apply)

  attention = [('transformer', 'h', str(i), 'attn', 'c_attn')
               for i in range(2)]
  _check_coverage(layers, params, attention, 'attention_qkv')
  # FlaxConv1D stores its kernel (features, in_features).
  spec = layers['transformer', 'h', '0', 'mlp', 'c_fc']
  assert spec.kernel_shape == (128, 32) and spec.in_shape == (32,)

  (outputs, stats) = jax.jit(apply_with_stats)({'params': params}, *args)
  expected, calls = _recorded(model.module.apply, {'params': params}, *args,
                              output_attentions=True)
  np.testing.assert_allclose(outputs.logits, expected.logits, 1e-5, 1e-5)
  mlp = ('transformer', 'h', '1', 'mlp', 'c_fc')
  np.testing.assert_allclose(_node(stats, mlp)['mean_input'],
                             _dense_mean(calls[mlp][0], True), RTOL, ATOL)
  for layer, path in enumerate(attention):
    inputs, _ = calls[path]
    value = _value_mean(expected.attentions[layer], inputs,
                        _masks(PADDING, LENGTH, causal=True), True)
    node = _node(stats, path)
    # Blocks: query and key keep the plain statistic, value the weighted one.
    np.testing.assert_allclose(node['mean_input'][2], value, RTOL, ATOL)
    np.testing.assert_allclose(node['mean_input'][0],
                               _dense_mean(inputs, True), RTOL, ATOL)
    assert not np.allclose(value, _dense_mean(inputs, True), 1e-3)

  # The preconditioned gradient of the transposed kernel is the reference's
  # (out, in) one, per q/k/v block: FlaxConv1D's layout is PyTorch's.
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape),
                       _node(params, attention[0]))
  kernel, bias = mac_optax.precondition(
      grads['kernel'], grads['bias'], _node(stats, attention[0])['mean_input'],
      layers[attention[0]], 0.3)
  rows = 32
  for block, mean in enumerate(np.asarray(
      _node(stats, attention[0])['mean_input'], np.float64)):
    part = slice(block * rows, (block + 1) * rows)
    want_kernel, want_bias = oracles.precondition_torch(
        np.asarray(grads['kernel'][part], np.float64),
        np.asarray(grads['bias'][part], np.float64), mean, 0.3)
    np.testing.assert_allclose(kernel[part], want_kernel, RTOL, ATOL)
    np.testing.assert_allclose(bias[part], want_bias, RTOL, ATOL)

  labels, weights = ids[:, 1:], PADDING[:, 1:]
  losses = _train(
      lambda variables: apply_with_stats(variables, *args), layers, params,
      lambda out: _cross_entropy(out.logits[:, :-1], labels, weights))
  assert losses[-1] < 0.9 * losses[0], losses


def test_gpt2_through_its_own_call_with_stats():
  """``model(ids, params=...)`` inside a with_stats loss: same statistics."""
  config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
                                   vocab_size=32, n_positions=8)
  model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
  ids = _tokens(2, 32, (2, 5))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)

  def forward(params):
    return model(ids, attention_mask=mask, params=params).logits

  layers = mac_optax.find_layers(mac_optax.with_stats(forward), model.params,
                                 params=model.params)
  assert set(layers) == _kernel_owners(model.params)
  _, stats = mac_optax.with_stats(forward)(model.params)
  positions = np.broadcast_to(np.arange(5), ids.shape)
  _, expected = mac_optax.capture(model.module.apply)(
      {'params': model.params}, ids, mask, positions)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, 1e-6, 1e-6),
               stats, expected)


def test_bert_masked_lm_padding_mask():
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=16)
  model = transformers.FlaxBertForMaskedLM(config, seed=0)
  params = model.params
  ids = _tokens(3, 64)
  zeros = np.zeros_like(ids)
  positions = np.broadcast_to(np.arange(LENGTH), ids.shape)
  args = (ids, PADDING, zeros, positions, None)

  layers = mac_optax.find_layers(model.module.apply, {'params': params},
                                 *args)
  apply_with_stats = mac_optax.capture(model.module.apply)

  attention = [('bert', 'encoder', 'layer', str(i), 'attention', 'self',
                'value') for i in range(2)]
  _check_coverage(layers, params, attention, 'attention_value')

  _, stats = jax.jit(apply_with_stats)({'params': params}, *args)
  expected, calls = _recorded(model.module.apply, {'params': params}, *args,
                              output_attentions=True)
  dense = ('bert', 'encoder', 'layer', '0', 'intermediate', 'dense')
  np.testing.assert_allclose(_node(stats, dense)['mean_input'],
                             _dense_mean(calls[dense][0], True), RTOL, ATOL)
  for layer, path in enumerate(attention):
    value = _value_mean(expected.attentions[layer], calls[path][0],
                        _masks(PADDING, LENGTH, causal=False), True)
    np.testing.assert_allclose(_node(stats, path)['mean_input'], value, RTOL,
                               ATOL)
    assert not np.allclose(value, _dense_mean(calls[path][0], True), 1e-3)

  labels = _tokens(4, 64)
  losses = _train(
      lambda variables: apply_with_stats(variables, *args), layers, params,
      lambda out: _cross_entropy(out.logits, labels, PADDING))
  assert losses[-1] < 0.9 * losses[0], losses


def test_vit_classification():
  config = transformers.ViTConfig(
      image_size=8, patch_size=4, num_channels=3, hidden_size=32,
      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      num_labels=3, initializer_range=0.2)  # else logits start near 0
  model = transformers.FlaxViTForImageClassification(config, seed=0)
  params = model.params
  # The linen module takes NHWC pixels (the model's __call__ transposes).
  pixels = np.asarray(jax.random.normal(jax.random.key(5), (4, 8, 8, 3)))

  layers = mac_optax.find_layers(model.module.apply, {'params': params},
                                 pixels)
  apply_with_stats = mac_optax.capture(model.module.apply)

  attention = [('vit', 'encoder', 'layer', str(i), 'attention', 'attention',
                'value') for i in range(2)]
  _check_coverage(layers, params, attention, 'attention_value')
  patches = ('vit', 'embeddings', 'patch_embeddings', 'projection')
  assert layers[patches].kind == 'conv'

  _, stats = jax.jit(apply_with_stats)({'params': params}, pixels)
  expected, calls = _recorded(model.module.apply, {'params': params}, pixels,
                              output_attentions=True)
  head = ('classifier',)
  np.testing.assert_allclose(_node(stats, head)['mean_input'],
                             _dense_mean(calls[head][0], True), RTOL, ATOL)
  # Non-overlapping 4x4 patches: the mean patch is the mean of the blocks.
  blocks = pixels.reshape(4, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  np.testing.assert_allclose(
      _node(stats, patches)['mean_input'],
      _dense_mean(blocks.reshape(-1, 48).astype(np.float64), True), RTOL,
      ATOL)
  tokens = calls[attention[0]][0].shape[1]
  for layer, path in enumerate(attention):
    value = _value_mean(expected.attentions[layer], calls[path][0],
                        np.ones((4, tokens, tokens), bool), True)
    np.testing.assert_allclose(_node(stats, path)['mean_input'], value, RTOL,
                               ATOL)

  labels = np.array([0, 1, 2, 1])
  losses = _train(
      lambda variables: apply_with_stats(variables, pixels), layers, params,
      lambda out: _cross_entropy(out.logits, labels))
  assert losses[-1] < 0.9 * losses[0], losses


def _clip(original):
  """``jnp.clip`` that also takes ``a_min``/``a_max``, removed from jax.

  transformers 4.57's T5 relative position buckets still call
  ``jnp.clip(..., a_max=...)``, which the jax this project supports rejects.
  """

  def clip(x, min=None, max=None, *, a_min=None, a_max=None):  # pylint: disable=redefined-builtin
    return original(x, a_min if min is None else min,
                    a_max if max is None else max)

  return clip


def test_t5_relative_position_bias(monkeypatch):
  monkeypatch.setattr(jnp, 'clip', _clip(jnp.clip))
  config = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2,
      num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=16, decoder_start_token_id=0)
  model = transformers.FlaxT5ForConditionalGeneration(config, seed=0)
  params = model.params
  ids = _tokens(6, 64)
  targets = _tokens(7, 64, (BATCH, 4))
  decoder_ids = np.concatenate([np.zeros((BATCH, 1), np.int32),
                                targets[:, :-1]], axis=1)
  decoder_mask = np.ones_like(decoder_ids)
  args = (ids, PADDING, decoder_ids, decoder_mask)

  layers = mac_optax.find_layers(model.module.apply, {'params': params},
                                 *args)
  apply_with_stats = mac_optax.capture(model.module.apply)

  def attention_path(stack, block, layer, name):
    return (stack, 'block', str(block), 'layer', str(layer), name, 'v')

  encoder_self = [attention_path('encoder', b, 0, 'SelfAttention')
                  for b in range(2)]
  decoder_self = [attention_path('decoder', b, 0, 'SelfAttention')
                  for b in range(2)]
  cross = [attention_path('decoder', b, 1, 'EncDecAttention')
           for b in range(2)]
  _check_coverage(layers, params, encoder_self + decoder_self + cross,
                  'attention_value')

  _, stats = jax.jit(apply_with_stats)({'params': params}, *args)
  expected, calls = _recorded(model.module.apply, {'params': params}, *args,
                              output_attentions=True)
  dense = ('encoder', 'block', '1', 'layer', '1', 'DenseReluDense', 'wi')
  np.testing.assert_allclose(_node(stats, dense)['mean_input'],
                             _dense_mean(calls[dense][0], False), RTOL, ATOL)
  checks = [
      (encoder_self, expected.encoder_attentions,
       _masks(PADDING, LENGTH, causal=False)),
      (decoder_self, expected.decoder_attentions,
       _masks(decoder_mask, 4, causal=True)),
      (cross, expected.cross_attentions, _masks(PADDING, 4, causal=False)),
  ]
  for paths, attentions, mask in checks:
    for layer, path in enumerate(paths):
      value = _value_mean(attentions[layer], calls[path][0], mask, False)
      np.testing.assert_allclose(_node(stats, path)['mean_input'], value,
                                 RTOL, ATOL)

  losses = _train(
      lambda variables: apply_with_stats(variables, *args), layers, params,
      lambda out: _cross_entropy(out.logits, targets))
  assert losses[-1] < 0.9 * losses[0], losses


def test_gpt2_cross_attention_raises_unless_attention_aware_is_off():
  config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
                                   vocab_size=32, n_positions=8,
                                   add_cross_attention=True)
  model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
  ids = _tokens(8, 32, (2, 5))
  mask = np.ones_like(ids)
  positions = np.broadcast_to(np.arange(5), ids.shape)
  encoder = np.ones((2, 3, 16), np.float32)
  args = ({'params': model.params}, ids, mask, positions, encoder,
          np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match='h/0/crossattention is'
                     ' cross-attention: its fused key/value projection'):
    mac_optax.find_layers(model.module.apply, *args)
  # Plain statistics for every projection instead: all kernels covered.
  plain = mac_optax.capture(model.module.apply, attention_aware=False)
  layers = mac_optax.find_layers(plain, *args)
  assert set(layers) == _kernel_owners(model.params)
  assert {spec.kind for spec in layers.values()} == {'dense'}
