"""Depth / normal binding between the 2D Gaussian renders and the FLAME mesh renders."""

import jax.numpy as jnp


def _masked_l1(a, b, mask):
  """Mean |a - b| over the elements where `mask` [..., H, W] is set; a, b
  [..., H, W] or [..., H, W, C]."""
  err = jnp.abs(a - b)
  mask = jnp.asarray(mask, err.dtype)
  if err.ndim == mask.ndim + 1:
    mask = jnp.broadcast_to(mask[..., None], err.shape)
  return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def depth_binding(surfel_depth, mesh_depth, mask):
  """L1 between expected surfel depth and mesh z-depth [..., H, W] over mask pixels."""
  return _masked_l1(surfel_depth, mesh_depth, mask)


def normal_binding(surfel_normal, mesh_normal, mask):
  """L1 between surfel and mesh camera-space normals [..., H, W, 3] over mask pixels
  (mean over pixels and the 3 components)."""
  return _masked_l1(surfel_normal, mesh_normal, mask)
