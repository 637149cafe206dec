"""Small Flax Linen models that train on two CPU cores.

Parameter layout (the paths the optimizers see)::

  CNN:        backbone/Conv_0, backbone/Conv_1, backbone/Dense_0, head
  TinyGPT:    embed, pos, Block_0 .. Block_{L-1} (ln1, attn, ln2, fc1, fc2), ln_f, head

Modules are defined (and their parameters created) input side first, so the
definition order of the parameter dict is the depth order.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv(nn.Module):
  """3x3 'SAME' convolution written as image patches @ kernel.

  Same function as ``nn.Conv`` (kernel stored as ``(9 * C_in, C_out)``), but
  under ``jax.vmap`` over parameters it lowers to a batched matmul; a vmapped
  ``nn.Conv`` becomes a grouped convolution, about 7x slower on XLA:CPU.
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    patches = jax.lax.conv_general_dilated_patches(
      x, (3, 3), (self.strides, self.strides), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (patches.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return patches @ kernel + bias


class Backbone(nn.Module):
  """conv(16) -> conv(32, stride 2) -> dense(64): 8x8x1 image -> 64 features."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(Conv(16)(x))
    x = nn.relu(Conv(32, strides=2)(x))
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.relu(nn.Dense(64)(x))


class CNN(nn.Module):
  n_classes: int = 5

  def setup(self) -> None:
    self.backbone = Backbone()
    self.head = nn.Dense(self.n_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.backbone(x))


class Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    h = nn.LayerNorm(name="ln1")(x)
    h = nn.MultiHeadDotProductAttention(
      num_heads=self.heads, qkv_features=self.d, name="attn"
    )(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(4 * self.d, name="fc1")(h)
    h = nn.Dense(self.d, name="fc2")(nn.gelu(h))
    return x + h


class TinyGPT(nn.Module):
  """Char-level causal Transformer: ``n_layers`` pre-LN blocks of width ``d``."""

  vocab: int = 128
  d: int = 64
  n_layers: int = 2
  heads: int = 4
  context: int = 64

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.d))
    x = x + pos[: tokens.shape[-1]]
    for i in range(self.n_layers):
      x = Block(self.d, self.heads, name=f"Block_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab, name="head")(x)


def cnn_block_of(path: tuple) -> str:
  """Drift/depth group of a CNN parameter path (``backbone/Conv_0/kernel`` -> ``Conv_0``)."""
  keys = [k for k in path if k != "params"]
  return str(keys[1]) if keys[0] == "backbone" else str(keys[0])


def gpt_block_of(path: tuple) -> str:
  keys = [k for k in path if k != "params"]
  return str(keys[0])
