"""Rematerialised calls of nnx sub-modules that work under outer JAX transforms.

`nnx.remat(f)(module, ...)` writes the module's state back after the call, which
fails ("Cannot mutate Param from a different trace level") when the module was built
by `nnx.merge` inside an outer `jax.grad` / `jax.jit` - as in the training step. Here
the module is split into (graph, state) and the pure function `merge -> call` is
wrapped in `jax.checkpoint`; nothing is written back (the blocks hold no state that
changes during a call).
"""

import jax
from flax import nnx


def remat_call(module: nnx.Module, *args, **static):
  """module(*args, **static) with its activations recomputed in the backward pass;
  the keyword arguments are static (Python values, e.g. a view count)."""
  graphdef, state = nnx.split(module)

  def call(state, *args):
    return nnx.merge(graphdef, state)(*args, **static)

  return jax.checkpoint(call)(state, *args)
