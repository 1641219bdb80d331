"""Rematerialised calls of nnx sub-modules that work under outer JAX transforms.

`nnx.remat(f)(module, ...)` writes the module's state back after the call, which
fails ("Cannot mutate Param from a different trace level") when the module was built
by `nnx.merge` inside an outer `jax.grad` / `jax.jit` - as in the training step. Here
the module is split into (graph, state) and the pure function `merge -> call` is
wrapped in `jax.checkpoint`; nothing is written back (the blocks hold no state that
changes during a call).

A stack of identical blocks (the transformers) goes through `remat_scan`: XLA's CPU
scheduler was seen to run every recomputation of a loop of `remat_call`s before the
first block's backward pass, which keeps all activations live and saves nothing
(tests/nn/remat_test.py reads both buffer plans); a scan cannot be reordered so.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def remat_call(module: nnx.Module, *args, **static):
  """module(*args, **static) with its activations recomputed in the backward pass;
  the keyword arguments are static (Python values, e.g. a view count)."""
  graphdef, state = nnx.split(module)

  def call(state, *args):
    return nnx.merge(graphdef, state)(*args, **static)

  return jax.checkpoint(call)(state, *args)


def remat_scan(blocks, x, *args, **static):
  """x through `blocks` in order (x = block(x, *args, **static)), as one `lax.scan`
  over their stacked states with every step rematerialised. Unlike a Python loop of
  `remat_call`s, which XLA may schedule so that all recomputed activations are live at
  once, the scan keeps only each block's input for the backward pass and recomputes
  one block at a time, for the price of one stacked copy of the blocks' parameters.
  The blocks must share one structure (graph definition). x: [..., D] -> [..., D]."""
  graphdef, _ = nnx.split(blocks[0])
  states = []
  for block in blocks:
    block_graph, state = nnx.split(block)
    if block_graph != graphdef:
      raise ValueError("remat_scan needs blocks of one structure")
    states.append(state)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

  @jax.checkpoint
  def step(x, state):
    return nnx.merge(graphdef, state)(x, *args, **static), None

  x, _ = jax.lax.scan(step, x, stacked)
  return x
