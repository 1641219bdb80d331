"""Per-pixel rays and FaceLift's 9-channel ray encoding."""

import jax.numpy as jnp


def pixel_rays(c2w, K, width: int, height: int):
  """Rays through pixel centres (x + 0.5, y + 0.5).

  c2w: [..., 4, 4] OpenCV camera-to-world; K: [..., 3, 3] pixels.
  Returns origins [..., H, W, 3] and unit directions [..., H, W, 3] (world).
  """
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                        jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
  fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
  cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
  d_cam = jnp.stack(jnp.broadcast_arrays((xs - cx) / fx, (ys - cy) / fy, 1.0), -1)
  d_cam = d_cam / jnp.linalg.norm(d_cam, axis=-1, keepdims=True)
  d = jnp.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], d_cam)
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
  o = jnp.broadcast_to(c2w[..., None, None, :3, 3], d.shape)
  return o, d


def facelift_ray_encoding(images, c2w, K):
  """GS-LRM input: images [..., H, W, 3] in [0, 1] -> [..., H, W, 9] =
  (2 rgb - 1, unit ray direction, the ray's point nearest the world origin
  o + (-o.d) d)."""
  height, width = images.shape[-3], images.shape[-2]
  o, d = pixel_rays(c2w, K, width, height)
  nearest = o + (-jnp.sum(o * d, -1, keepdims=True)) * d
  return jnp.concatenate([images * 2.0 - 1.0, d, nearest], -1)
