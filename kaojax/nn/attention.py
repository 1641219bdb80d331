"""Scaled dot-product attention shared by every transformer in kaojax, with an
optional query-blocked form that bounds the logits' memory in training too."""

import math
from typing import Optional

import jax
import jax.numpy as jnp


def _full_attention(q, k, v, efficient: bool):
  scale = 1.0 / math.sqrt(q.shape[-1])
  if efficient:
    return jax.nn.dot_product_attention(q, k, v, scale=scale)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def dot_product_attention(q, k, v, efficient: bool = True, query_chunk: Optional[int] = None):
  """q [B, Tq, H, d], k/v [B, Tk, H, d] -> [B, Tq, H, d], softmax(q k^T / sqrt(d)) v.

  efficient: jax.nn.dot_product_attention (fused kernels where available); False
    spells the product out (einsums, float32 softmax).
  query_chunk: queries go in blocks of this many tokens (lax.map) and each block is
    recomputed in the backward pass, so neither pass holds more than one block's
    logits [B, H, query_chunk, Tk] (the full [B, H, Tq, Tk] per layer is what makes
    OpenLRM-base's 3 x 32 x 32 token self-attention need > 20 GiB at batch 1).
    None or >= Tq: one block.
  """
  lq = q.shape[1]
  if query_chunk is None or lq <= query_chunk:
    return _full_attention(q, k, v, efficient)
  blocks = -(-lq // query_chunk)
  q = jnp.pad(q, ((0, 0), (0, blocks * query_chunk - lq), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(q.shape[0], blocks, query_chunk, *q.shape[2:]), 1, 0)
  block = jax.checkpoint(lambda qb: _full_attention(qb, k, v, efficient))
  out = jax.lax.map(block, q)
  out = jnp.moveaxis(out, 0, 1).reshape(out.shape[1], blocks * query_chunk, *out.shape[3:])
  return out[:, :lq]
