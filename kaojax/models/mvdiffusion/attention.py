"""Multi-head attention, including FaceLift's sparse multi-view self-attention.

Multi-view layout: the batch axis holds groups of `num_views` consecutive views of one
subject, [B*V, L, C]. In the sparse multi-view attention every view's queries attend to
the keys/values of [view 0 (the front view) ; the view itself] (2L keys) of its group,
scale 1/sqrt(head_dim). For view 0 the key set is [view 0 ; view 0], which gives exactly
plain self-attention (duplicating every key leaves the softmax unchanged).
"""

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from kaojax.nn.attention import dot_product_attention
from kaojax.nn.layers import linear
from kaojax.sharding import COND, EMBED, HEADS


def front_view_context(x, num_views: int):
  """[B*V, L, C] -> [B*V, 2L, C]: for each view, its group's view 0 tokens followed by
  its own tokens."""
  n, length, c = x.shape
  if n % num_views:
    raise ValueError(f"batch {n} is not a multiple of num_views={num_views}")
  grouped = x.reshape(n // num_views, num_views, length, c)
  front = jnp.broadcast_to(grouped[:, :1], grouped.shape)
  return jnp.concatenate([front, grouped], axis=2).reshape(n, 2 * length, c)


def attention(q, k, v, heads: int, query_chunk: Optional[int] = None):
  """q [N, Lq, H*d], k/v [N, Lk, H*d] -> [N, Lq, H*d], softmax(q k^T / sqrt(d)) v."""
  n, lq, inner = q.shape
  d = inner // heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d)
  out = dot_product_attention(split(q), split(k), split(v), query_chunk=query_chunk)
  return out.reshape(n, lq, inner)


class Attention(nnx.Module):
  """diffusers `Attention`: to_q/to_k/to_v (bias optional), to_out[0] (with bias).

  context_dim: width of the cross-attention context (None: self-attention).
  Axis names: queries read the model width (EMBED), keys/values the context (COND)
  in cross-attention, the projected width is HEADS."""

  def __init__(self, query_dim: int, heads: int, head_dim: int, rngs: nnx.Rngs,
               context_dim: Optional[int] = None, qkv_bias: bool = False, dtype=None,
               query_chunk: Optional[int] = None):
    inner = heads * head_dim
    self.heads = heads
    self.query_chunk = query_chunk
    kv_dim = context_dim or query_dim
    kv_axis = COND if context_dim else EMBED
    self.to_q = linear(query_dim, inner, (EMBED, HEADS), rngs, use_bias=qkv_bias, dtype=dtype)
    self.to_k = linear(kv_dim, inner, (kv_axis, HEADS), rngs, use_bias=qkv_bias, dtype=dtype)
    self.to_v = linear(kv_dim, inner, (kv_axis, HEADS), rngs, use_bias=qkv_bias, dtype=dtype)
    self.to_out = nnx.List([linear(inner, query_dim, (HEADS, EMBED), rngs, dtype=dtype)])

  def __call__(self, x, context=None, num_views: Optional[int] = None):
    """x [N, L, C]; context [N, T, Cc] (cross-attention) or None; num_views: use the
    sparse multi-view key set (self-attention only)."""
    source = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
    if num_views is not None:
      if context is not None:
        raise ValueError("multi-view attention is self-attention: context must be None")
      k, v = front_view_context(k, num_views), front_view_context(v, num_views)
    return self.to_out[0](attention(q, k, v, self.heads, self.query_chunk))
