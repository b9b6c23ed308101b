"""``summary``: every parameter's status, hints for what MAC cannot see, totals.

Layers that own a kernel but have no rule are named ("unknown layer with a
kernel"), modules that look like attention but are not declared get a hint,
NNX modules without a rule (norms) are named, and the last line counts the
preconditioned kernels and the share of parameters covered, checked against
counts taken from the parameter tree here.
"""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mac_optax


class TransposedDense(nn.Module):
  """A dense layer MAC has no rule for: its own 'kernel' parameter."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.features, x.shape[-1]))
    return x @ kernel.T


class Unregistered(nn.Module):
  """Attention written by hand that nobody declared with register_attention."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(x.shape[-1], name=n)(x)
               for n in ('query', 'key', 'value'))
    weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2), axis=-1)
    return weights @ v


class Model(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 8, name='embed')(tokens)
    x = nn.Dense(8, name='fc')(x)
    x = nn.LayerNorm(name='norm')(x)
    x = TransposedDense(8, name='custom')(x)
    x = Unregistered(name='mixer')(x)
    x = nn.MultiHeadDotProductAttention(num_heads=2, name='mha')(x)
    return nn.Dense(3, use_bias=False, name='head')(x)


def _leaves(params):
  return {tuple(k.key for k in keys): np.asarray(leaf)
          for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


# find_layers may also warn about the unknown layer; summary is tested here.
@pytest.mark.filterwarnings('ignore:find_layers')
def test_unknown_layers_attention_hints_and_totals():
  tokens = jnp.arange(12).reshape(2, 6) % 10
  model = Model()
  variables = model.init(jax.random.key(0), tokens)
  params = variables['params']
  layers = mac_optax.find_layers(model.apply, variables, tokens)
  lines = mac_optax.summary(layers, params).splitlines()
  rows = {line.split()[0]: line for line in lines[1:]}

  assert rows['custom/kernel'].endswith(
      'not preconditioned: unknown layer with a kernel: TransposedDense')
  assert rows['norm/scale'].endswith('not preconditioned: LayerNorm')
  assert 'token ids' in rows['embed/embedding']
  assert 'preconditioned: dense (Dense)' in rows['mixer/value/kernel']
  hints = [line for line in lines if 'looks like attention' in line]
  # Flax's own attention is declared; the hand-written one is not.
  assert hints == [
      'mixer (Unregistered) looks like attention; register it with'
      ' register_attention to get the attention-aware value statistic']
  assert 'attention_value' in rows['mha/value/kernel']

  # Totals from the parameter tree: kernels are leaves named 'kernel'; a
  # preconditioned module's kernel and bias are covered.
  leaves = _leaves(params)
  kernels = [p for p in leaves if p[-1] == 'kernel']
  covered = [p for p in leaves
             if p[:-1] in set(layers) and p[-1] in ('kernel', 'bias')]
  total = sum(a.size for a in leaves.values())
  covered_size = sum(leaves[p].size for p in covered)
  assert len(kernels) == 10 and len(layers) == 9
  assert lines[-1] == (
      f'preconditioned kernels: {len(layers)} of {len(kernels)}; parameters'
      f' covered: {covered_size} of {total}'
      f' ({100 * covered_size / total:.1f} %)')
  assert 0 < covered_size < total


def test_summary_after_registering_the_attention():
  tokens = jnp.arange(12).reshape(2, 6) % 10

  class Declared(Unregistered):
    pass

  mac_optax.register_attention(Declared, num_heads=1, mask=None)

  class Small(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      return Declared(name='mixer')(nn.Embed(10, 4, name='embed')(tokens))

  variables = Small().init(jax.random.key(0), tokens)
  layers = mac_optax.find_layers(Small().apply, variables, tokens)
  table = mac_optax.summary(layers, variables['params'])
  assert 'looks like attention' not in table
  assert layers['mixer', 'value'].kind == 'attention_value'
  assert table.splitlines()[-1].startswith('preconditioned kernels: 3 of 3;')


class NNXModel(nnx.Module):

  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.RMSNorm(8, rngs=rngs),
                            nnx.Linear(8, 2, use_bias=False, rngs=rngs)])

  def __call__(self, x):
    return self.blocks[1](self.blocks[0](self.norm(self.fc(x))))


def test_nnx_norms_are_named():
  model = NNXModel(nnx.Rngs(0))
  x = jnp.ones((3, 4))
  layers = mac_optax.find_layers(model, x)
  params = nnx.state(model, nnx.Param)
  lines = mac_optax.summary(layers, params).splitlines()
  rows = {line.split()[0]: line for line in lines[1:]}
  assert rows['norm/scale'].endswith('not preconditioned: LayerNorm')
  assert rows['norm/bias'].endswith('not preconditioned: LayerNorm')
  assert rows['blocks/0/scale'].endswith('not preconditioned: RMSNorm')
  assert not any(line.endswith('?') for line in lines)
  # 4*8 + 8 + 8*2 covered; 2*8 norm + 8 RMSNorm parameters not.
  assert lines[-1] == ('preconditioned kernels: 2 of 2; parameters covered:'
                       ' 56 of 80 (70.0 %)')
