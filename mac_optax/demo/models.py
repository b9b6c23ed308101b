"""Small Flax linen models for the demo: ViT, ResNet-style CNN, GPT, BERT.

Every model takes ``(inputs, train=False)``; only the CNN's BatchNorm uses
``train``. Attention is ``nn.MultiHeadDotProductAttention`` throughout, called
with the model's real mask (causal for GPT, padding for BERT), which is what
MAC's attention-aware statistic reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax


class Block(nn.Module):
  """Pre-norm transformer block: attention and a GELU MLP, both residual.

  Attributes:
    width: model width.
    heads: attention heads.
    mlp_ratio: hidden width of the MLP over ``width``.
  """

  width: int
  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(name='norm1')(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.heads, name='attn')(y, mask=mask)
    y = nn.LayerNorm(name='norm2')(x)
    y = nn.gelu(nn.Dense(self.mlp_ratio * self.width, name='fc1')(y))
    return x + nn.Dense(self.width, name='fc2')(y)


class _ScannedBlock(Block):
  """``Block`` in ``nn.scan``'s ``(carry, x) -> (carry, y)`` form."""

  def __call__(self, x, _):
    return super().__call__(x), None


class ViT(nn.Module):
  """Vision transformer: patch embedding, learned positions, mean pooling.

  Attributes:
    width: token width.
    depth: transformer blocks.
    heads: attention heads.
    patch: patch side; the image side must be a multiple of it.
    classes: output classes.
    scan: run the blocks as one ``nn.scan`` over stacked parameters (module
      ``blocks``), as large-scale code does, instead of ``depth`` modules
      ``block0``, ``block1``, ...
  """

  width: int = 64
  depth: int = 2
  heads: int = 4
  patch: int = 4
  classes: int = 10
  scan: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # No dropout or BatchNorm.
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding='VALID', name='patch_embed')(images)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    if self.scan:
      blocks = nn.scan(_ScannedBlock, variable_axes={'params': 0},
                       split_rngs={'params': True}, length=self.depth)
      x, _ = blocks(self.width, self.heads, name='blocks')(x, None)
    else:
      for i in range(self.depth):
        x = Block(self.width, self.heads, name=f'block{i}')(x)
    x = nn.LayerNorm(name='norm')(x).mean(axis=1)
    return nn.Dense(self.classes, name='head')(x)


class ResidualBlock(nn.Module):
  """Two 3x3 conv + BatchNorm layers with a (projected) shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train,
                                     momentum=0.9, name=name)
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False,
                name='conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name='conv2')(y)
    y = norm('bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                  name='shortcut')(x)
      x = norm('bn_shortcut')(x)
    return nn.relu(x + y)


class CNN(nn.Module):
  """ResNet-style CNN with BatchNorm: a stem, one block per stage, a head.

  The stem has stride 2 (28x28 images become 14x14), which keeps a CPU step
  cheap.

  Attributes:
    width: channels of the first stage; each later stage doubles them and
      halves the resolution.
    stages: number of stages.
    classes: output classes.
  """

  width: int = 32
  stages: int = 3
  classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(self.width, (3, 3), strides=2, use_bias=False,
                name='stem')(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name='bn_stem')(x))
    for i in range(self.stages):
      x = ResidualBlock(self.width * 2**i, 1 if i == 0 else 2,
                        name=f'stage{i}')(x, train)
    return nn.Dense(self.classes, name='head')(x.mean(axis=(1, 2)))


class _TextTransformer(nn.Module):
  """Token and position embeddings, blocks under ``mask``, a vocabulary head."""

  vocab: int
  width: int
  depth: int
  heads: int
  context: int

  @nn.compact
  def __call__(self, tokens, mask):
    x = nn.Embed(self.vocab, self.width, name='embed')(tokens)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (self.context, self.width))
    x = x + pos[:tokens.shape[-1]]
    for i in range(self.depth):
      x = Block(self.width, self.heads, name=f'block{i}')(x, mask)
    return nn.Dense(self.vocab, name='head')(nn.LayerNorm(name='norm')(x))


class GPT(nn.Module):
  """Causal character language model (predicts token ``t + 1`` at ``t``).

  Attributes:
    vocab: vocabulary size.
    width: model width.
    depth: transformer blocks.
    heads: attention heads.
    context: longest input sequence.
  """

  vocab: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  context: int = 64

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    return _TextTransformer(self.vocab, self.width, self.depth, self.heads,
                            self.context, name='transformer')(
                                tokens, nn.make_causal_mask(tokens))


class BERT(nn.Module):
  """Bidirectional masked language model over padded windows.

  Positions holding ``pad_id`` are masked out as keys and as queries.

  Attributes:
    vocab: vocabulary size, special tokens included.
    pad_id: the padding token.
    width: model width.
    depth: transformer blocks.
    heads: attention heads.
    context: longest input sequence.
  """

  vocab: int
  pad_id: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  context: int = 64

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    valid = tokens != self.pad_id
    return _TextTransformer(self.vocab, self.width, self.depth, self.heads,
                            self.context, name='transformer')(
                                tokens, nn.make_attention_mask(valid, valid))


def count_params(params) -> int:
  """Number of scalars in a params tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
