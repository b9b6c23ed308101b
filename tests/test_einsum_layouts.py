"""Kernels in any axis order: einsums, transposed dense layers, Gemma attention.

Every einsum that is a plain contraction gets the statistic of its contracted
input axes in the kernel's own order of those axes, whatever the order of the
kernel's axes (Gemma's ``'BTD,NDH->BTNH'``, a fused ``'BTD,SNDH->SBTNH'``
whose stack axis indexes kernel and output). A dense layer that stores its
kernel ``(out, in)`` is taught to MAC with ``DenseRule(...,
kernel_layout='out_in')``. Gemma-style attention (einsum projections, fused
key/value or query/key/value, grouped-query heads, rotary embeddings,
soft-capped logits, sliding-window and causal masks) declared once with
``register_attention`` gets the attention-weighted value statistic.

Oracles are float64 numpy: the mean input is taken from the input in the
kernel's order of the contracted axes, the attention is recomputed from the
module's parameters (with rotary embeddings written again here), and each
preconditioned gradient is an explicit ``d x d`` matrix applied along the
kernel's contracted axes.
"""

import math

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gemma_like
import mac_optax
import oracles

RTOL, ATOL = 2e-5, 2e-6
DAMPING = 0.7


# --------------------------------------------------------------------------
# Numpy oracles.


def _letters(equation):
  inputs, output = equation.split('->')
  lhs, rhs = inputs.split(',')
  return lhs, rhs, output


def _mean_input(x, equation):
  """ā over the non-contracted axes, contracted axes in the kernel's order."""
  lhs, rhs, _ = _letters(equation)
  contracted = [c for c in rhs if c in lhs]
  rows = [a for a, c in enumerate(lhs) if c not in contracted]
  moved = np.transpose(x, rows + [lhs.index(c) for c in contracted])
  width = math.prod(x.shape[lhs.index(c)] for c in contracted)
  return moved.reshape(-1, width).mean(axis=0)


def _precondition_along_inputs(kernel, bias, matrix, equation):
  """``matrix @ [G; b]`` over the contracted axes, back in stored layout.

  The kernel gradient is moved to ``(contracted..., out...)`` in the kernel's
  own order; the bias (laid out like the output) is moved to the kernel's
  order of the output axes and appended as the last input row.
  """
  lhs, rhs, output = _letters(equation)
  contracted = [c for c in rhs if c in lhs]
  out = [c for c in rhs if c not in lhs]
  order = [rhs.index(c) for c in contracted + out]
  moved = np.transpose(kernel, order)
  d_in = math.prod(moved.shape[: len(contracted)])
  grad = moved.reshape(d_in, -1)
  if bias is not None:
    bias_letters = [c for c in output if c in rhs]
    bias_row = np.transpose(bias, [bias_letters.index(c) for c in out])
    grad = np.concatenate([grad, bias_row.reshape(1, -1)], axis=0)
  grad = matrix @ grad
  new_kernel = np.transpose(grad[:d_in].reshape(moved.shape),
                            np.argsort(order))
  if bias is None:
    return new_kernel, None
  new_bias = grad[d_in].reshape(bias_row.shape)
  return new_kernel, np.transpose(
      new_bias, [out.index(c) for c in bias_letters])


def _one_update(layers, params, stats, seed=5, **kwargs):
  """One MAC step (t = 0, so â is this step's statistic) on random grads."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  grads = jax.tree.unflatten(treedef, [
      jax.random.normal(k, jnp.shape(leaf)) for k, leaf in zip(keys, leaves)])
  hyper = dict(damping=DAMPING, stat_decay=0.9, t_cov=1, t_inv=1)
  tx = mac_optax.scale_by_mac(layers, **hyper)
  if 'second_moments' in kwargs:
    tx = mac_optax.mac(1.0, layers=layers, momentum=0.0, weight_decay=0.0,
                       **hyper, **kwargs)
    # mac steps by -learning_rate times the preconditioned gradient.
    tx = optax.chain(tx, optax.scale(-1.0))
  updates, _ = tx.update(grads, tx.init(params), params, mac_stats=stats)
  return grads, updates


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------
# 1. Einsum kernels in any axis order, linen and NNX.

EINSUM_CASES = [
    # equation, kernel shape, input shape, bias
    ('BTD,NDH->BTNH', (3, 5, 2), (2, 4, 5), False),
    ('BTD,NDH->BTNH', (3, 5, 2), (2, 4, 5), True),
    ('BTD,SNDH->SBTNH', (3, 2, 5, 2), (2, 4, 5), False),
    ('btd,dnh->btnh', (5, 3, 2), (2, 4, 5), True),
    ('bd,od->bo', (3, 5), (6, 5), True),
    # Two contracted axes, stored in the reverse of the input's order.
    ('btnh,hnd->btd', (2, 3, 4), (2, 5, 3, 2), True),
    # Output axes in another order than the kernel's, with a bias.
    ('btd,dhn->btnh', (5, 2, 3), (2, 4, 5), True),
]
EINSUM_IDS = ['gemma-q', 'gemma-q-bias', 'gemma-fused-qkv', 'dnh-bias',
              'transposed-dense', 'reversed-inputs', 'output-order-bias']


def _bias_shape(equation, kernel_shape):
  _, rhs, output = _letters(equation)
  return tuple(kernel_shape[rhs.index(c)] for c in output if c in rhs)


def _linen_einsum(equation, kernel_shape, x, use_bias):
  model = nn.Einsum(kernel_shape, equation, use_bias=use_bias,
                    bias_init=nn.initializers.normal(1.0))
  variables = model.init(jax.random.key(0), x)
  _, stats = jax.jit(mac_optax.capture(model.apply))(variables, x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  return variables['params'], stats, layers


def _nnx_einsum(equation, kernel_shape, x, use_bias):
  bias_shape = _bias_shape(equation, kernel_shape) if use_bias else None
  model = nnx.Einsum(equation, kernel_shape, bias_shape,
                     bias_init=nnx.initializers.normal(1.0),
                     rngs=nnx.Rngs(0))
  _, stats = nnx.jit(lambda m, x: mac_optax.capture(m)(x))(model, x)
  layers = mac_optax.find_layers(model, x)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return params, stats, layers


@pytest.mark.parametrize('framework', ['linen', 'nnx'])
@pytest.mark.parametrize('equation, kernel_shape, x_shape, use_bias',
                         EINSUM_CASES, ids=EINSUM_IDS)
def test_einsum_in_any_kernel_order(framework, equation, kernel_shape,
                                    x_shape, use_bias):
  x = jax.random.normal(jax.random.key(1), x_shape) + 0.5
  build = _linen_einsum if framework == 'linen' else _nnx_einsum
  params, stats, layers = build(equation, kernel_shape, x, use_bias)
  spec = layers[()]
  assert spec.kind == 'einsum'
  assert spec.kernel_shape == kernel_shape
  mean = _mean_input(np.asarray(x, np.float64), equation)
  if use_bias:
    mean = np.append(mean, 1.0)
  np.testing.assert_allclose(stats['mean_input'], mean, RTOL, ATOL)

  grads, updates = _one_update(layers, params, stats)
  grads, updates = _np(grads), _np(updates)
  matrix = oracles.preconditioner_matrix(mean, DAMPING)
  kernel, bias = _precondition_along_inputs(
      grads['kernel'], grads.get('bias'), matrix, equation)
  np.testing.assert_allclose(updates['kernel'], kernel, RTOL, ATOL)
  if use_bias:
    np.testing.assert_allclose(updates['bias'], bias, RTOL, ATOL)


def test_einsum_identity_layout_is_unchanged():
  """Kernels already ``in + out`` keep no permutation (no transposes)."""
  x = jnp.ones((2, 3, 5))
  _, _, layers = _linen_einsum('btd,dnh->btnh', (5, 3, 2), x, True)
  assert layers[()].kernel_axes is None
  _, _, layers = _linen_einsum('BTD,NDH->BTNH', (3, 5, 2), x, False)
  assert layers[()].kernel_axes == (1, 0, 2)
  assert layers[()].canonical_kernel_shape == (5, 3, 2)


class _ScannedCell(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    query = nn.Einsum((3, 4, 4), 'BTD,NDH->BTNH', use_bias=False,
                      name='q')(x)
    return jnp.tanh(query.sum(axis=2)), None


def test_scanned_einsum_keeps_its_stack_axis_first():
  x = jax.random.normal(jax.random.key(2), (2, 3, 4)) + 0.5
  model = nn.scan(_ScannedCell, variable_axes={'params': 0},
                  split_rngs={'params': True}, length=2)()
  variables = model.init(jax.random.key(0), x, None)
  _, stats = jax.jit(mac_optax.capture(model.apply))(variables, x, None)
  layers = mac_optax.find_layers(model.apply, variables, x, None)
  spec = layers[('q',)]
  assert spec.stack_shape == (2,) and spec.kernel_axes == (0, 2, 1, 3)
  kernel = np.asarray(variables['params']['q']['kernel'], np.float64)
  # The layer inputs, layer by layer, from the parameters.
  inputs, h = [], np.asarray(x, np.float64)
  for layer in range(2):
    inputs.append(h)
    h = np.tanh(np.einsum('btd,ndh->btnh', h, kernel[layer]).sum(axis=2))
  means = np.stack([i.reshape(-1, 4).mean(0) for i in inputs])
  np.testing.assert_allclose(stats['q']['mean_input'], means, RTOL, ATOL)
  grads, updates = _one_update(layers, variables['params'], stats)
  grads, updates = _np(grads), _np(updates)
  for layer in range(2):
    matrix = oracles.preconditioner_matrix(means[layer], DAMPING)
    expected, _ = _precondition_along_inputs(
        grads['q']['kernel'][layer], None, matrix, 'BTD,NDH->BTNH')
    np.testing.assert_allclose(updates['q']['kernel'][layer], expected,
                               RTOL, ATOL)


# --------------------------------------------------------------------------
# 2. A dense layer with its kernel stored (out, in), taught with DenseRule.


class TransposedDense(nn.Module):
  """Like Hugging Face's FlaxConv1D: kernel ``(features, in_features)``."""

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.normal(0.5),
                        (self.features, x.shape[-1]))
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.normal(0.5),
                         (self.features,))
    return y


mac_optax.register_layer(
    TransposedDense,
    mac_optax.DenseRule(axes=lambda module: -1,
                        has_bias=lambda module: module.use_bias,
                        kernel_layout='out_in'))


@pytest.mark.parametrize('use_bias', [True, False])
def test_transposed_dense_rule(use_bias):
  x = jax.random.normal(jax.random.key(3), (3, 4, 5)) + 0.5
  model = TransposedDense(6, use_bias)
  variables = model.init(jax.random.key(0), x)
  _, stats = jax.jit(mac_optax.capture(model.apply))(variables, x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  spec = layers[()]
  assert (spec.kind, spec.in_shape, spec.out_shape, spec.kernel_shape) == (
      'dense', (5,), (6,), (6, 5))
  x64 = np.asarray(x, np.float64)
  mean = oracles.dense_mean(x64, 1, use_bias)
  np.testing.assert_allclose(stats['mean_input'], mean, RTOL, ATOL)
  grads, updates = _np(_one_update(layers, variables['params'], stats))
  # The kernel is PyTorch's (out, in) layout: Ĝ = [∇W | ∇b] P.
  kernel, bias = oracles.precondition_torch(
      grads['kernel'], grads.get('bias'), mean, DAMPING)
  np.testing.assert_allclose(updates['kernel'], kernel, RTOL, ATOL)
  if use_bias:
    np.testing.assert_allclose(updates['bias'], bias, RTOL, ATOL)


def test_transposed_dense_exact_factor():
  """The full ``(Σ + λI)⁻¹`` factor also acts along the stored in axis."""
  x = jax.random.normal(jax.random.key(4), (8, 5)) + 0.5
  model = TransposedDense(3)
  variables = model.init(jax.random.key(0), x)
  layers = mac_optax.find_layers(model.apply, variables, x)
  moments = mac_optax.input_second_moments(
      model.apply, variables, [x], layers=layers, paths=[()],
      progress=False)
  rows = np.concatenate([np.asarray(x, np.float64), np.ones((8, 1))], 1)
  sigma = rows.T @ rows / 8
  np.testing.assert_allclose(moments['second_moment'], sigma, RTOL, ATOL)
  _, stats = mac_optax.capture(model.apply)(variables, x)
  grads, updates = _np(_one_update(layers, variables['params'], stats,
                                   second_moments=moments))
  inverse = np.linalg.inv(sigma + DAMPING * np.eye(6))
  joint = np.concatenate([grads['kernel'], grads['bias'][:, None]], 1)
  expected = joint @ inverse
  np.testing.assert_allclose(updates['kernel'], expected[:, :-1], 1e-4, 1e-5)
  np.testing.assert_allclose(updates['bias'], expected[:, -1], 1e-4, 1e-5)


def test_rule_protocol_and_errors():
  assert isinstance(mac_optax.rule_of(nn.Dense), mac_optax.DenseRule)
  assert isinstance(mac_optax.rule_of(nnx.Einsum), mac_optax.EinsumRule)
  assert isinstance(mac_optax.rule_of(nn.Conv), mac_optax.ConvRule)
  for rule in (mac_optax.rule_of(nn.Dense), mac_optax.rule_of(nn.Conv)):
    assert callable(rule.read)
  with pytest.raises(ValueError, match="kernel_layout must be one of"):
    mac_optax.DenseRule(lambda m: -1, lambda m: False, kernel_layout='oi')
  with pytest.raises(TypeError, match='read.module, arguments, inputs'):
    mac_optax.register_layer(TransposedDense, object())
  assert isinstance(mac_optax.rule_of(TransposedDense), mac_optax.DenseRule)


# --------------------------------------------------------------------------
# 3. Gemma-style attention declared once with register_attention.


def _rope64(x, positions, base=10_000.0):
  """Rotary embeddings in float64, pairing the two halves of head_dim."""
  half = x.shape[-1] // 2
  frequencies = base ** (-2.0 * np.arange(half) / x.shape[-1])
  angles = positions[:, :, None, None] * frequencies
  sin, cos = np.sin(angles), np.cos(angles)
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _gemma_oracle(params, x, positions, attn_mask, *, heads, kv_heads,
                  soft_cap, window):
  """Probabilities ``(B, N, T, S)``, the mask, q/k/v projections, output."""
  if 'qkv_einsum' in params:
    q, k, v = np.einsum('btd,sndh->sbtnh', x, params['qkv_einsum']['kernel'])
  else:
    q = np.einsum('btd,ndh->btnh', x, params['q_einsum']['kernel'])
    k, v = np.einsum('bsd,ckdh->cbskh', x, params['kv_einsum']['kernel'])
  head_dim = q.shape[-1]
  q = _rope64(q, positions) / math.sqrt(head_dim)
  k = _rope64(k, positions)
  k_per_query = np.repeat(k, heads // kv_heads, axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, k_per_query)
  if soft_cap is not None:
    logits = soft_cap * np.tanh(logits / soft_cap)
  mask = np.asarray(attn_mask, bool)
  if window is not None:
    t, s = np.meshgrid(np.arange(mask.shape[1]), np.arange(mask.shape[2]),
                       indexing='ij')
    mask = mask & (np.abs(t - s) < window)
  mask = mask[:, None]
  probs = oracles.softmax(np.where(mask, logits, -1e30))
  v_per_query = np.repeat(v, heads // kv_heads, axis=2)
  encoded = np.einsum('bnts,bsnh->btnh', probs, v_per_query)
  return probs, mask, encoded


def _gemma_inputs(batch=3, length=6, features=8):
  x = jax.random.normal(jax.random.key(7), (batch, length, features)) + 0.3
  positions = jnp.array([np.arange(length) + offset
                         for offset in range(batch)], jnp.float32)
  tokens = jnp.array([[1] * length, [1] * (length - 2) + [0, 0],
                      [1] * (length - 1) + [0]])[:batch]
  return x, positions, gemma_like.causal_mask(tokens)


GEMMA_CASES = [
    # heads, kv_heads, fused_qkv, providing, soft_cap, window, value_stat
    (4, 2, True, False, 5.0, 3, 'reference'),
    (4, 2, True, False, 5.0, 3, 'per_head'),
    (2, 2, True, False, 2.0, None, 'reference'),
    (2, 2, True, False, None, 2, 'per_head'),
    (4, 4, False, False, 3.0, 2, 'reference'),
    (4, 2, True, True, 5.0, 3, 'reference'),
    (2, 2, True, True, 2.0, 2, 'per_head'),
]
GEMMA_IDS = ['gqa-kv', 'gqa-kv-per-head', 'fused-qkv', 'fused-qkv-per-head',
             'mha-kv', 'gqa-kv-provided', 'fused-qkv-provided-per-head']


@pytest.mark.parametrize(
    'heads, kv_heads, fused_qkv, providing, soft_cap, window, value_stat',
    GEMMA_CASES, ids=GEMMA_IDS)
def test_gemma_attention_value_statistic(heads, kv_heads, fused_qkv,
                                         providing, soft_cap, window,
                                         value_stat):
  attention_class = (gemma_like.ProvidingAttention if providing
                     else gemma_like.Attention)
  module = attention_class(8, heads, kv_heads, 4, rngs=nnx.Rngs(0),
                           soft_cap=soft_cap, sliding_window=window,
                           fused_qkv=fused_qkv)
  x, positions, attn_mask = _gemma_inputs()
  _, stats = nnx.jit(lambda m, *a: mac_optax.capture(
      m, value_stat=value_stat)(*a))(module, x, positions, attn_mask)
  layers = mac_optax.find_layers(
      mac_optax.capture(module, value_stat=value_stat), x, positions,
      attn_mask)
  params = _np(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  x64 = np.asarray(x, np.float64)
  probs, mask, encoded = _gemma_oracle(
      params, x64, np.asarray(positions, np.float64), attn_mask,
      heads=heads, kv_heads=kv_heads, soft_cap=soft_cap, window=window)
  plain = x64.reshape(-1, 8).mean(axis=0)
  if value_stat == 'per_head':
    per_query_head = oracles.attention_value_mean(probs, x64, False, mask,
                                                  per_head=True)
    # A key/value head serves consecutive query heads: their mean.
    value = per_query_head.reshape(kv_heads, -1, 8).mean(axis=1)
  else:
    value = oracles.attention_value_mean(probs, x64, False, mask)[None]
  fused = 'qkv_einsum' if 'qkv_einsum' in params else 'kv_einsum'
  # Blocks follow the fused output features: (S, heads, head_dim).
  plain_blocks = (2 if fused == 'qkv_einsum' else 1) * len(value)
  blocks = np.concatenate([np.repeat(plain[None], plain_blocks, 0), value])
  np.testing.assert_allclose(stats[fused]['mean_input'], blocks, RTOL, ATOL)
  source = 'model' if providing else 'recomputed'
  assert f'from {source} probabilities' in layers.value_sources[(fused,)]
  assert layers[(fused,)].kind == 'attention_qkv'
  if fused == 'kv_einsum':
    np.testing.assert_allclose(stats['q_einsum']['mean_input'], plain,
                               RTOL, ATOL)
  # The output projection's input is the attention output, (N, H) flattened.
  np.testing.assert_allclose(stats['attn_vec_einsum']['mean_input'],
                             encoded.reshape(-1, heads * 4).mean(0),
                             RTOL, ATOL)

  # Preconditioning: along D, block by block of the fused (S, N, D, H) kernel.
  grads, updates = _np(_one_update(layers, params, stats))
  kernel = grads[fused]['kernel']
  parts, kernel_heads = kernel.shape[:2]
  block_means = np.asarray(stats[fused]['mean_input'], np.float64)
  expected = np.empty_like(kernel)
  for part in range(parts):
    for head in range(kernel_heads):
      block = (part * kernel_heads + head) * len(block_means) // (
          parts * kernel_heads)
      matrix = oracles.preconditioner_matrix(block_means[block], DAMPING)
      expected[part, head] = matrix @ kernel[part, head]
  np.testing.assert_allclose(updates[fused]['kernel'], expected, RTOL, ATOL)


class LinenSoftCapAttention(nn.Module):
  """Linen, Gemma's kernel order, soft-capped logits, probabilities handed."""

  heads: int = 2
  cap: float = 2.0

  @nn.compact
  def __call__(self, x, mask):
    project = lambda name: nn.Einsum(
        (self.heads, x.shape[-1], 3), 'BTD,NDH->BTNH', use_bias=False,
        name=name)(x)
    query, key, value = project('q'), project('k'), project('v')
    logits = jnp.einsum('btnh,bsnh->bnts', query, key) / jnp.sqrt(3.0)
    logits = self.cap * jnp.tanh(logits / self.cap)
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    probs = mac_optax.provide_attention_probabilities(self, probs)
    encoded = jnp.einsum('bnts,bsnh->btnh', probs, value)
    return encoded.reshape(x.shape[:2] + (-1,))


mac_optax.register_attention(LinenSoftCapAttention, query='q', key='k',
                             value='v', mask='mask')


def test_linen_attention_hands_over_its_probabilities():
  x, _, attn_mask = _gemma_inputs()
  mask = attn_mask[:, None]
  model = LinenSoftCapAttention()
  variables = model.init(jax.random.key(0), x, mask)
  _, stats = jax.jit(mac_optax.capture(model.apply))(variables, x, mask)
  layers = mac_optax.find_layers(model.apply, variables, x, mask)
  assert 'from model probabilities' in layers.value_sources[('v',)]
  params = _np(variables['params'])
  x64 = np.asarray(x, np.float64)
  query = np.einsum('btd,ndh->btnh', x64, params['q']['kernel'])
  key = np.einsum('btd,ndh->btnh', x64, params['k']['kernel'])
  logits = np.einsum('btnh,bsnh->bnts', query, key) / math.sqrt(3.0)
  logits = 2.0 * np.tanh(logits / 2.0)
  mask64 = np.asarray(mask, bool)
  probs = oracles.softmax(np.where(mask64, logits, -1e30))
  np.testing.assert_allclose(
      stats['v']['mean_input'],
      oracles.attention_value_mean(probs, x64, False, mask64), RTOL, ATOL)


def test_gemma_like_model_covers_every_kernel_and_both_routes_agree():
  tokens = jnp.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 0, 0]])
  stats = {}
  for providing in (False, True):
    model = gemma_like.GemmaLike(provide_probabilities=providing,
                                 rngs=nnx.Rngs(0))
    layers = mac_optax.find_layers(model, tokens)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    paths = [tuple(k.key for k in keys) for keys, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    kernels = {path[:-1] for path in paths if path[-1] == 'kernel'}
    assert set(layers) == kernels
    assert {layers[p].kind for p in layers if p[-1] == 'kv_einsum'} == {
        'attention_qkv'}
    _, stats[providing] = nnx.jit(
        lambda m, t: mac_optax.capture(m)(t))(model, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, 1e-5, 1e-6),
               stats[False], stats[True])


def test_gemma_like_model_trains_with_mac():
  tokens = jax.random.randint(jax.random.key(0), (4, 8), 1, 16)
  model = gemma_like.GemmaLike(rngs=nnx.Rngs(0))
  layers = mac_optax.find_layers(model, tokens[:, :-1])
  optimizer = nnx.Optimizer(model, mac_optax.mac(0.05, layers=layers),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    def loss_fn(model):
      logits, stats = mac_optax.capture(model)(tokens[:, :-1])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, tokens[:, 1:]).mean()
      return loss, stats
    (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, mac_stats=stats)
    return loss

  losses = [float(step(model, optimizer, tokens)) for _ in range(15)]
  assert losses[-1] < 0.8 * losses[0], losses
