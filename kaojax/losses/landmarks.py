"""KaoLRM's landmark loss on projected 68-point landmarks (pixels)."""

import jax.numpy as jnp

# The reference trains with 192 px renders and measures the landmark term (Huber
# delta included) in their pixels; renders of another size are scaled to these units
# so that the term keeps its weight against the others (spec: kaolrm.md, "Losses").
REFERENCE_RENDER_SIZE = 192

# Subsets summed on top of all 68: eyes, brows and nose (17-47), mouth (48-67).
LANDMARK_SUBSETS = ((0, 68), (17, 48), (48, 68))


def huber(x, delta: float = 1.0):
  """Elementwise Huber (smooth L1 scaled as torch's HuberLoss)."""
  a = jnp.abs(x)
  return jnp.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def landmark_loss(pred, target, delta: float = 1.0, render_size: int = REFERENCE_RENDER_SIZE):
  """Huber(delta, mean) over all 68 landmarks + indices 17-47 + indices 48-67, summed.

  pred, target: [..., 68, 2] pixel coordinates (x, y) in a render of `render_size`
  px, one row per view; errors are measured in pixels of a REFERENCE_RENDER_SIZE
  render. A view whose target has any coordinate <= 0 (no detection) is skipped;
  with no valid view the loss is 0.
  """
  valid = jnp.all(target > 0, axis=(-2, -1)).astype(pred.dtype)  # [...]
  to_reference = REFERENCE_RENDER_SIZE / render_size
  err = huber((pred - target) * to_reference, delta) * valid[..., None, None]
  n_valid = jnp.sum(valid)
  total = 0.0
  for start, stop in LANDMARK_SUBSETS:
    count = n_valid * (stop - start) * 2
    total = total + jnp.sum(err[..., start:stop, :]) / jnp.maximum(count, 1.0)
  return total
