"""Building blocks shared by the diffusion UNet and the VAE (diffusers semantics, NHWC).

Names of attributes follow diffusers' parameter names (conv1, norm1, time_emb_proj,
to_q, to_out[0], ...) so that `kaojax.convert.diffusers` maps keys one to one. Layers
come from `kaojax.nn.layers`; logical axis names: a block's input/output channels
EMBED, a ResNet block's inner channels (after conv1) MLP_HIDDEN, the time embedding
COND.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.nn.layers import conv, group_norm, linear
from kaojax.sharding import COND, EMBED, MLP_HIDDEN


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0):
  """Sinusoidal embedding: timesteps [N] -> [N, dim].

  freq_i = exp(-log(max_period) i / (dim/2 - freq_shift)), i < dim/2; the embedding is
  [sin(t freq), cos(t freq)] ([cos, sin] when flip_sin_to_cos); odd dims get a zero
  column at the end."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """Linear -> SiLU -> Linear (diffusers TimestepEmbedding, also used for the
  'projection' class embedding)."""

  def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, dtype=None):
    self.linear_1 = linear(d_in, d_out, (None, COND), rngs, dtype=dtype)
    self.linear_2 = linear(d_out, d_out, (COND, None), rngs, dtype=dtype)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """x [N, H, W, Cin] (+ temb [N, T]) -> [N, H, W, Cout]:
  shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))."""

  def __init__(self, c_in: int, c_out: int, temb_dim: Optional[int], groups: int, eps: float,
               rngs: nnx.Rngs, dtype=None):
    self.norm1 = group_norm(c_in, groups, eps, rngs, dtype, axis=EMBED)
    self.conv1 = conv(c_in, c_out, 3, rngs, dtype=dtype, axes=(EMBED, MLP_HIDDEN))
    self.time_emb_proj = (linear(temb_dim, c_out, (COND, MLP_HIDDEN), rngs, dtype=dtype)
                          if temb_dim else None)
    self.norm2 = group_norm(c_out, groups, eps, rngs, dtype, axis=MLP_HIDDEN)
    self.conv2 = conv(c_out, c_out, 3, rngs, dtype=dtype, axes=(MLP_HIDDEN, EMBED))
    self.conv_shortcut = (conv(c_in, c_out, 1, rngs, dtype=dtype, axes=(EMBED, None))
                          if c_in != c_out else None)

  def __call__(self, x, temb=None):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      if temb is None:
        raise ValueError("ResnetBlock2D with a time embedding projection needs temb")
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shortcut + h


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. padding=1: symmetric (UNet); padding=0: pad right/bottom by one
  pixel first (the VAE encoder)."""

  def __init__(self, channels: int, padding: int, rngs: nnx.Rngs, dtype=None):
    self.padding = padding
    self.conv = conv(channels, channels, 3, rngs, stride=2, padding=padding, dtype=dtype,
                     axes=(EMBED, None))

  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, channels: int, rngs: nnx.Rngs, dtype=None):
    self.conv = conv(channels, channels, 3, rngs, dtype=dtype, axes=(EMBED, None))

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)
