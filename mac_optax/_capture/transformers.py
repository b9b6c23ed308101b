"""Rules for Hugging Face transformers' Flax models, registered on import.

Nothing here imports ``transformers``. The rules of a model family are
registered the first time MAC looks a module class up after the family's
Flax module (``transformers.models.gpt2.modeling_flax_gpt2``, ...) has been
imported, which happens as soon as a user touches one of its classes
(``FlaxGPT2LMHeadModel``, ...). Without transformers, or before its Flax
models are used, this costs one dictionary lookup per family.

A class that already has a rule (registered by the user, before or after)
keeps the user's rule.

Covered (tested on tiny configs):

* GPT-2: ``FlaxConv1D``, a dense layer whose kernel is stored ``(features,
  in_features)``; ``FlaxGPT2Attention``, whose fused ``c_attn`` projection
  is laid out ``(3, heads, head_dim)``, under its causal and padding masks.
* BERT: ``FlaxBertSelfAttention`` (``query``/``key``/``value``, padding mask,
  causal when the config is a decoder, cross-attention).
* ViT: ``FlaxViTSelfAttention`` (no mask).
* T5: ``FlaxT5Attention`` (``q``/``k``/``v``, no logit scaling, relative
  position bias): its probabilities are recomputed from the projections'
  weights and the position bias (mask included) the module returns.

Calls that decode with a cache (``init_cache``, or a filled ``'cache'``
collection) are skipped, as Flax's own attention does when decoding.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mac_optax import _stats
from mac_optax._capture import rules

_FAMILIES: dict[str, Callable[[Any], None]] = {}
_DONE: set[str] = set()


def register_imported() -> None:
  """Registers the rules of every covered family whose module is imported."""
  if len(_DONE) == len(_FAMILIES):
    return
  for name, register in _FAMILIES.items():
    if name not in _DONE and name in sys.modules:
      _DONE.add(name)
      register(sys.modules[name])


# Every rule lookup first registers the families imported since.
rules.before_lookup(register_imported)


def _family(module_name: str):
  def decorate(register):
    _FAMILIES['transformers.models.' + module_name] = register
    return register
  return decorate


def _layer(cls: type, rule: Any) -> None:
  if cls not in rules._LAYER_RULES:  # pylint: disable=protected-access
    rules.register_layer(cls, rule)


def _attention(cls: type, **fields) -> None:
  if cls not in rules._ATTENTION_RULES:  # pylint: disable=protected-access
    rules.register_attention(cls, **fields)


def _decoding(module, arguments) -> bool:
  """A cached autoregressive decoding call (nothing is trained there)."""
  return bool(arguments.get('init_cache')) or module.has_variable(
      'cache', 'cached_key')


def _heads(attribute: str) -> Callable[[Any], int]:
  return lambda module: getattr(module.config, attribute)


def _is_causal(module, arguments) -> bool:
  del arguments
  return bool(module.causal)


def _padding(mask_of: Callable[[Any, Any], Any]):
  """A mask callable returning a ``(batch, keys)`` padding mask expanded."""

  def mask(module, arguments):
    padding = mask_of(module, arguments)
    if padding is None:
      return None
    return jnp.asarray(padding)[:, None, None, :] > 0

  return mask


@_family('gpt2.modeling_flax_gpt2')
def _gpt2(library) -> None:

  def self_attention_mask(module, arguments):
    if arguments.get('key_value_states') is not None:
      raise ValueError(
          f'{type(module).__name__} at {_stats.path_str(tuple(module.path))}'
          ' is cross-attention: its fused key/value projection c_attn has no'
          ' attention-aware statistic in MAC. Capture with'
          ' attention_aware=False to give every projection the plain'
          ' statistic.'
      )
    return arguments.get('attention_mask')

  _layer(library.FlaxConv1D, rules.DenseRule(
      lambda module: -1, lambda module: bool(module.use_bias),
      kernel_layout='out_in'))
  _attention(
      library.FlaxGPT2Attention,
      qkv='c_attn',
      qkv_layout='qkv',
      num_heads=_heads('num_attention_heads'),
      mask=_padding(self_attention_mask),
      causal=_is_causal,
      skip=_decoding,
  )


@_family('bert.modeling_flax_bert')
def _bert(library) -> None:
  _attention(
      library.FlaxBertSelfAttention,
      num_heads=_heads('num_attention_heads'),
      mask='attention_mask',
      causal=_is_causal,
      skip=_decoding,
  )


@_family('vit.modeling_flax_vit')
def _vit(library) -> None:
  _attention(
      library.FlaxViTSelfAttention,
      num_heads=_heads('num_attention_heads'),
      mask=None,
  )


def _t5_probabilities(module, arguments, outputs) -> jax.Array:
  """T5's attention probabilities: ``softmax(q kᵀ + position bias)``.

  T5 scales no logits and adds a relative position bias, which already holds
  the mask as ``-inf``-like entries; the module returns that bias.
  """
  params = module.variables['params']
  hidden = jnp.asarray(arguments['hidden_states'], jnp.float32)
  sources = arguments.get('key_value_states')
  sources = hidden if sources is None else jnp.asarray(sources, jnp.float32)
  heads = module.config.num_heads
  query = hidden @ jnp.asarray(params['q']['kernel'], jnp.float32)
  key = sources @ jnp.asarray(params['k']['kernel'], jnp.float32)
  query = query.reshape(query.shape[:2] + (heads, -1))
  key = key.reshape(key.shape[:2] + (heads, -1))
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key)
  logits = logits + jnp.asarray(outputs[1], jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


@_family('t5.modeling_flax_t5')
def _t5(library) -> None:
  _attention(
      library.FlaxT5Attention,
      query='q',
      key='k',
      value='v',
      num_heads=_heads('num_heads'),
      mask='attention_mask',
      causal=_is_causal,
      probabilities=_t5_probabilities,
      scale=1.0,
      skip=_decoding,
  )
