"""kaojax.nn.remat: `remat_scan` gives the plain loop's gradients and keeps only one
block's activations for the backward pass (XLA's buffer plan, read without running),
where a loop of `remat_call`s may keep them all."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaojax.nn.remat import remat_call, remat_scan

TOKENS, DIM, HIDDEN, LAYERS = 4096, 64, 1024, 6


class Block(nnx.Module):
  """A residual MLP whose hidden activations ([TOKENS, HIDDEN]) dominate memory."""

  def __init__(self, rngs):
    self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, DIM, rngs=rngs)

  def __call__(self, x, scale):
    return x + scale * self.down(jnp.tanh(self.up(x)))


def _loss_fn(mode):
  def loss(blocks, x):
    if mode == "scan":
      x = remat_scan(list(blocks), x, 0.5)
    else:
      for block in blocks:
        x = remat_call(block, x, 0.5) if mode == "call" else block(x, 0.5)
    return jnp.sum(jnp.square(x))
  return loss


def _setup():
  blocks = nnx.List([Block(nnx.Rngs(i)) for i in range(LAYERS)])
  x = jax.random.normal(jax.random.key(0), (TOKENS, DIM))
  return blocks, x


def _grad(mode, blocks, x):
  graphdef, state = nnx.split(blocks)

  def loss(state, x):
    return _loss_fn(mode)(nnx.merge(graphdef, state), x)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), state


def test_remat_scan_gives_the_plain_gradients():
  blocks, x = _setup()
  results = {}
  for mode in ("plain", "scan"):
    fn, state = _grad(mode, blocks, x)
    results[mode] = fn(state, x)
  (v0, (g0, gx0)), (v1, (g1, gx1)) = results["plain"], results["scan"]
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_remat_scan_keeps_one_block_of_activations():
  blocks, x = _setup()
  temp = {}
  for mode in ("plain", "scan"):
    fn, state = _grad(mode, blocks, x)
    temp[mode] = fn.lower(state, x).compile().memory_analysis().temp_size_in_bytes
  hidden = TOKENS * HIDDEN * 4          # one block's hidden activation, bytes
  # the plain loop keeps every block's hidden activations for the backward pass
  assert temp["plain"] >= LAYERS * hidden
  # the scan keeps the block inputs and one block's recomputation at a time
  assert temp["scan"] <= 3 * hidden + 2 * sum(p.nbytes for p in jax.tree.leaves(
      nnx.state(blocks))), temp
  assert temp["scan"] < temp["plain"] / 2, temp


def test_remat_scan_rejects_blocks_of_different_structures():
  class Other(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(DIM, DIM, rngs=rngs)

    def __call__(self, x, scale):
      return x + scale * self.up(x)

  x = jnp.zeros((2, DIM))
  try:
    remat_scan([Block(nnx.Rngs(0)), Other(nnx.Rngs(1))], x, 1.0)
  except ValueError as e:
    assert "one structure" in str(e)
  else:
    raise AssertionError("no error for blocks of different structures")
