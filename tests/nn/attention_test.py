"""kaojax.nn.attention.dot_product_attention against a float64 NumPy softmax, in
one block and in query blocks, forward and gradient; and the blocks' memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaojax.nn.attention import dot_product_attention


def _numpy_attention(q, k, v):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(lq=23, lk=17):
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (2, lq, 3, 4)), jax.random.normal(keys[1], (2, lk, 3, 4)),
          jax.random.normal(keys[2], (2, lk, 3, 4)))


@pytest.mark.parametrize("efficient", [True, False])
@pytest.mark.parametrize("chunk", [None, 5, 23, 64])
def test_matches_the_softmax_in_any_blocks(efficient, chunk):
  q, k, v = _qkv()
  got = dot_product_attention(q, k, v, efficient, chunk)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v), atol=2e-6)


def test_blocked_gradient_is_the_one_block_gradient():
  q, k, v = _qkv()
  w = jax.random.normal(jax.random.key(1), q.shape)

  def loss(chunk):
    return jax.grad(lambda *t: jnp.sum(w * dot_product_attention(*t, query_chunk=chunk)),
                    argnums=(0, 1, 2))(q, k, v)

  for got, want, name in zip(loss(5), loss(None), "qkv"):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=name)


def test_blocks_bound_the_memory_of_the_backward_pass():
  # logits of one block of the whole sequence: 4 heads x 2048^2 x 4 B = 64 MiB
  q = k = v = jax.ShapeDtypeStruct((1, 2048, 4, 8), jnp.float32)

  def temp_bytes(chunk):
    grad = jax.jit(jax.grad(lambda *t: jnp.sum(dot_product_attention(*t, query_chunk=chunk)),
                            argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  one_block, blocked = temp_bytes(None), temp_bytes(256)
  assert one_block > 64 * 2 ** 20
  assert blocked < one_block / 4, (blocked, one_block)
