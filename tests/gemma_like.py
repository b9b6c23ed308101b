"""A small Gemma-style NNX language model, written for the tests.

The attention follows the pattern of Gemma-family models: ``nnx.Einsum``
projections with head axes inside the kernel (``'BTD,NDH->BTNH'`` for the
query; a fused key/value ``'BSD,CKDH->CBSKH'`` under grouped-query attention,
or a fused ``'BTD,SNDH->SBTNH'`` query/key/value when every query head has its
own key/value head), rotary position embeddings applied between the projection
and the logits, logit soft-capping ``cap * tanh(logits / cap)``, and
sliding-window layers next to global ones, on top of the caller's causal and
padding mask. Blocks are pre-norm with RMSNorm and a gated MLP.

Importing this module declares the attention classes to MAC:

* :class:`Attention` once with ``register_attention`` (its probabilities are
  recomputed from the projections with the rule's ``rope``,
  ``logit_soft_cap`` and ``mask`` hooks);
* :class:`ProvidingAttention`, which hands its own probabilities to
  ``mac_optax.provide_attention_probabilities``.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

import mac_optax

MASK_VALUE = -2.3819763e38


def apply_rope(x, positions, base=10_000.0):
  """Rotary embeddings of ``x`` ``(B, T, heads, head_dim)`` at ``(B, T)``.

  The first and second halves of the head dimension form the pairs rotated
  by ``positions * base**(-2i / head_dim)``.
  """
  half = x.shape[-1] // 2
  frequencies = base ** (-2.0 * jnp.arange(half) / x.shape[-1])
  angles = positions[..., None, None] * frequencies  # (B, T, 1, half)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = x[..., :half], x[..., half:]
  rotated = jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def causal_mask(tokens, pad_id=0):
  """``(B, T, T)``: query ``t`` attends key ``s <= t`` that is not padding."""
  length = tokens.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None] & (tokens != pad_id)[:, None, :]


class Attention(nnx.Module):
  """Gemma-style attention; see the module docstring.

  Args:
    features: model width ``D``.
    num_heads: query heads ``N``.
    num_kv_heads: key/value heads ``K`` (``N`` must be a multiple); with
      ``K == N`` and ``fused_qkv`` the projections are one ``(3, N, D, H)``
      einsum.
    head_dim: ``H``.
    soft_cap: logit soft-cap, or None.
    sliding_window: window of a local layer (keys within ``window - 1`` of
      the query), or None for a global layer.
    fused_qkv: use the fused query/key/value einsum when ``K == N``.
    use_bias: give the projections a bias (Gemma has none).
  """

  def __init__(self, features: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, rngs: nnx.Rngs, soft_cap: float | None = None,
               sliding_window: int | None = None, fused_qkv: bool = True,
               use_bias: bool = False):
    if num_heads % num_kv_heads:
      raise ValueError('num_heads must be a multiple of num_kv_heads.')
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.soft_cap = soft_cap
    self.sliding_window = sliding_window
    bias = lambda *shape: shape if use_bias else None
    self.use_qkv_einsum = fused_qkv and num_heads == num_kv_heads
    if self.use_qkv_einsum:
      self.qkv_einsum = nnx.Einsum(
          'BTD,SNDH->SBTNH', (3, num_heads, features, head_dim),
          bias(3, num_heads, head_dim), rngs=rngs)
    else:
      self.q_einsum = nnx.Einsum(
          'BTD,NDH->BTNH', (num_heads, features, head_dim),
          bias(num_heads, head_dim), rngs=rngs)
      self.kv_einsum = nnx.Einsum(
          'BSD,CKDH->CBSKH', (2, num_kv_heads, features, head_dim),
          bias(2, num_kv_heads, head_dim), rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum(
        'BTNH,NHD->BTD', (num_heads, head_dim, features),
        bias(features), rngs=rngs)

  def attention_mask(self, attn_mask):
    """The ``(B, T, S)`` mask the logits get: the caller's and the window's."""
    if self.sliding_window is None:
      return attn_mask
    queries, keys = attn_mask.shape[-2:]
    distance = jnp.arange(queries)[:, None] - jnp.arange(keys)[None, :]
    window = jnp.abs(distance) < self.sliding_window
    return jnp.logical_and(attn_mask, window)

  def probabilities(self, x, segment_pos, attn_mask):
    """``(B, N, T, S)`` probabilities and the ``(B, S, K, H)`` values."""
    if self.use_qkv_einsum:
      query, key, value = self.qkv_einsum(x)
    else:
      query = self.q_einsum(x)
      key, value = self.kv_einsum(x)
    query = apply_rope(query, segment_pos) * self.head_dim ** -0.5
    key = apply_rope(key, segment_pos)
    batch, length, heads, head_dim = query.shape
    groups = heads // self.num_kv_heads
    # Query head n = k * groups + g uses key/value head k.
    grouped = query.reshape(batch, length, self.num_kv_heads, groups,
                            head_dim)
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', grouped, key)
    logits = logits.reshape(batch, heads, length, key.shape[1])
    if self.soft_cap is not None:
      logits = self.soft_cap * jnp.tanh(logits / self.soft_cap)
    mask = self.attention_mask(attn_mask)[:, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1), value

  def __call__(self, x, segment_pos, attn_mask):
    probabilities, value = self.probabilities(x, segment_pos, attn_mask)
    probabilities = self.expose(probabilities)
    batch, heads, length, keys = probabilities.shape
    grouped = probabilities.reshape(batch, self.num_kv_heads, -1, length,
                                    keys)
    encoded = jnp.einsum('BKGTS,BSKH->BTKGH', grouped, value)
    encoded = encoded.reshape(batch, length, heads, self.head_dim)
    return self.attn_vec_einsum(encoded)

  def expose(self, probabilities):
    return probabilities


class ProvidingAttention(Attention):
  """The same attention, handing MAC its own probabilities."""

  def expose(self, probabilities):
    return mac_optax.provide_attention_probabilities(self, probabilities)


class FeedForward(nnx.Module):

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
    self.gate_proj = nnx.Linear(features, hidden, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(features, hidden, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(hidden, features, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, features, hidden, attention: Attention, *,
               rngs: nnx.Rngs):
    self.pre_attention_norm = nnx.RMSNorm(features, rngs=rngs)
    self.attn = attention
    self.pre_ffw_norm = nnx.RMSNorm(features, rngs=rngs)
    self.mlp = FeedForward(features, hidden, rngs=rngs)

  def __call__(self, x, segment_pos, attn_mask):
    x = x + self.attn(self.pre_attention_norm(x), segment_pos, attn_mask)
    return x + self.mlp(self.pre_ffw_norm(x))


class GemmaLike(nnx.Module):
  """A Gemma-style decoder: embed, blocks (local and global), tied logits.

  Args:
    vocab: vocabulary size (token 0 is padding).
    features: model width.
    num_heads / num_kv_heads / head_dim: attention geometry.
    hidden: MLP width.
    num_layers: blocks; even ones are sliding-window (``sliding_window``),
      odd ones global.
    soft_cap: attention logit soft-cap.
    fused_qkv: fused query/key/value einsum when ``num_heads ==
      num_kv_heads``.
    provide_probabilities: use :class:`ProvidingAttention`.
    rngs: parameter keys.
  """

  def __init__(self, vocab=16, features=8, num_heads=4, num_kv_heads=2,
               head_dim=4, hidden=16, num_layers=2, soft_cap=5.0,
               sliding_window=2, fused_qkv=True, provide_probabilities=False,
               *, rngs: nnx.Rngs):
    self.embedder = nnx.Embed(vocab, features, rngs=rngs)
    attention_class = (ProvidingAttention if provide_probabilities
                       else Attention)
    self.blocks = nnx.List([
        Block(features, hidden, attention_class(
            features, num_heads, num_kv_heads, head_dim, rngs=rngs,
            soft_cap=soft_cap, fused_qkv=fused_qkv,
            sliding_window=sliding_window if i % 2 == 0 else None),
              rngs=rngs)
        for i in range(num_layers)
    ])
    self.final_norm = nnx.RMSNorm(features, rngs=rngs)

  def __call__(self, tokens):
    x = self.embedder(tokens) * jnp.sqrt(self.embedder.features)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    attn_mask = causal_mask(tokens)
    for block in self.blocks:
      x = block(x, positions, attn_mask)
    return self.embedder.attend(self.final_norm(x))


def register() -> None:
  """Declares the attention classes to MAC (done on import)."""
  mac_optax.register_attention(
      Attention,
      query='q_einsum',
      kv='kv_einsum',
      qkv='qkv_einsum',
      mask=lambda module, args: module.attention_mask(
          args['attn_mask'])[:, None],
      rope=lambda module, args, x: apply_rope(x, args['segment_pos']),
      logit_soft_cap=lambda module: module.soft_cap,
  )
  mac_optax.register_attention(
      ProvidingAttention, query='q_einsum', kv='kv_einsum', qkv='qkv_einsum',
      mask=lambda module, args: module.attention_mask(
          args['attn_mask'])[:, None])


register()
