"""Spatial transformer of the SD UNet (diffusers Transformer2DModel with
BasicTransformerBlock): GroupNorm -> proj_in -> blocks -> proj_out, plus the input.

Block: x += attn1(LN(x)) (multi-view self-attention), x += attn2(LN(x), text),
x += FF(LN(x)) with FF = GEGLU (Linear(C, 2*4C) -> a * gelu(b)) then Linear(4C, C).
`use_linear_projection=False` checkpoints store proj_in/proj_out as 1x1 convs; they are
the same per-pixel linear maps and are converted to Linear.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.models.mvdiffusion.attention import Attention
from kaojax.nn.layers import group_norm, layer_norm, linear
from kaojax.sharding import EMBED, MLP_HIDDEN


class GEGLU(nnx.Module):
  def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, dtype=None):
    self.proj = linear(d_in, 2 * d_out, (EMBED, MLP_HIDDEN), rngs, dtype=dtype)

  def __call__(self, x):
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, rngs: nnx.Rngs, mult: int = 4, dtype=None):
    # net[1] is dropout in diffusers (no parameters); kept so indices match the keys.
    self.net = nnx.List([GEGLU(dim, mult * dim, rngs, dtype), nnx.Dropout(0.0),
                         linear(mult * dim, dim, (MLP_HIDDEN, EMBED), rngs, dtype=dtype)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, rngs: nnx.Rngs,
               dtype=None, query_chunk: Optional[int] = None):
    self.norm1 = layer_norm(dim, 1e-5, rngs, dtype, exact_variance=True)
    self.attn1 = Attention(dim, heads, head_dim, rngs, dtype=dtype, query_chunk=query_chunk)
    self.norm2 = layer_norm(dim, 1e-5, rngs, dtype, exact_variance=True)
    self.attn2 = Attention(dim, heads, head_dim, rngs, context_dim=context_dim, dtype=dtype,
                           query_chunk=query_chunk)
    self.norm3 = layer_norm(dim, 1e-5, rngs, dtype, exact_variance=True)
    self.ff = FeedForward(dim, rngs, dtype=dtype)

  def __call__(self, x, context, num_views: Optional[int] = None):
    x = x + self.attn1(self.norm1(x), num_views=num_views)
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
  def __init__(self, channels: int, heads: int, context_dim: int, layers: int, groups: int,
               rngs: nnx.Rngs, dtype=None, query_chunk: Optional[int] = None):
    if channels % heads:
      raise ValueError(f"{channels} channels do not split into {heads} heads")
    head_dim = channels // heads
    self.norm = group_norm(channels, groups, 1e-6, rngs, dtype, axis=EMBED)
    self.proj_in = linear(channels, channels, (EMBED, None), rngs, dtype=dtype)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, head_dim, context_dim, rngs, dtype, query_chunk)
        for _ in range(layers)])
    self.proj_out = linear(channels, channels, (None, EMBED), rngs, dtype=dtype)

  def __call__(self, x, context, num_views: Optional[int] = None):
    """x [N, H, W, C]; context [N, T, Cc] -> [N, H, W, C]."""
    n, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x).reshape(n, h * w, c))
    for block in self.transformer_blocks:
      tokens = block(tokens, context, num_views)
    return x + self.proj_out(tokens).reshape(n, h, w, c)
