"""FaceLift's sparse multi-view self-attention against naive dense attention."""

import jax
import numpy as np
from flax import nnx

from kaojax.models.mvdiffusion.attention import Attention


def _naive(q, k, v, heads):
  """softmax(q k^T / sqrt(d)) v, one head at a time, in float64."""
  d = q.shape[-1] // heads
  out = np.zeros_like(q)
  for h in range(heads):
    s = slice(h * d, (h + 1) * d)
    logits = q[:, s] @ k[:, s].T / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out[:, s] = (w / w.sum(-1, keepdims=True)) @ v[:, s]
  return out


def test_sparse_attention_is_dense_attention_over_front_and_own_view():
  groups, views, length, dim, heads = 2, 4, 5, 12, 3
  attn = Attention(dim, heads, dim // heads, nnx.Rngs(0), qkv_bias=True)
  x = np.asarray(jax.random.normal(jax.random.key(1), (groups * views, length, dim)))
  got = np.asarray(attn(x, num_views=views))
  W = lambda lin: (np.asarray(lin.kernel[...], np.float64), np.asarray(lin.bias[...], np.float64))
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = map(W, (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]))
  x64 = x.astype(np.float64)
  for g in range(groups):
    front = x64[g * views]
    for i in range(views):
      own = x64[g * views + i]
      context = np.concatenate([front, own], 0)            # [view 0 ; own view]: 2L tokens
      ref = _naive(own @ wq + bq, context @ wk + bk, context @ wv + bv, heads) @ wo + bo
      np.testing.assert_allclose(got[g * views + i], ref, atol=1e-5, rtol=1e-5,
                                 err_msg=f"group {g} view {i}")
    # view 0 equals plain self-attention over its own tokens
    plain = np.asarray(attn(x[g * views:g * views + 1]))[0]
    np.testing.assert_allclose(got[g * views], plain, atol=1e-5, rtol=1e-5)
    dense_self = _naive(front @ wq + bq, front @ wk + bk, front @ wv + bv, heads) @ wo + bo
    np.testing.assert_allclose(got[g * views], dense_self, atol=1e-5, rtol=1e-5)


def test_views_of_different_groups_do_not_mix():
  attn = Attention(8, 2, 4, nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(2), (6, 4, 8)))
  base = np.asarray(attn(x, num_views=3))
  x2 = x.copy()
  x2[3] += 1.0                      # front view of the second group
  moved = np.asarray(attn(x2, num_views=3))
  np.testing.assert_array_equal(moved[:3], base[:3])
  assert np.abs(moved[4] - base[4]).max() > 1e-3


def test_query_chunking_changes_nothing():
  attn = Attention(12, 3, 4, nnx.Rngs(0))
  chunked = Attention(12, 3, 4, nnx.Rngs(0), query_chunk=4)
  x = np.asarray(jax.random.normal(jax.random.key(9), (6, 10, 12)))
  np.testing.assert_allclose(np.asarray(chunked(x, num_views=3)), np.asarray(attn(x, num_views=3)),
                             atol=1e-6)
