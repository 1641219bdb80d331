"""Parameter regularisers."""

import jax.numpy as jnp


def squared_norm(x):
  """sum(x^2) over the last axis, averaged over any leading (batch) axes: x [..., D].
  KaoLRM applies it to shape (beta) and expression (psi) coefficients."""
  return jnp.mean(jnp.sum(jnp.square(x), axis=-1))
