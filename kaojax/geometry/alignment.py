"""Similarity (Umeyama) alignment of corresponding point sets."""

import jax.numpy as jnp


def umeyama(src, dst, with_scale: bool = True, weights=None):
  """Least-squares similarity transform taking `src` onto `dst`.

  src, dst: [..., N, 3] corresponding points; weights: optional [..., N].
  Returns (scale [...], rotation [..., 3, 3], translation [..., 3]) minimising
  sum_n w_n ||dst_n - (s R src_n + t)||^2 with R a proper rotation (det +1).
  """
  if weights is None:
    weights = jnp.ones(src.shape[:-1], src.dtype)
  w = weights / jnp.sum(weights, -1, keepdims=True)
  mu_src = jnp.einsum("...n,...nc->...c", w, src)
  mu_dst = jnp.einsum("...n,...nc->...c", w, dst)
  xs = src - mu_src[..., None, :]
  xd = dst - mu_dst[..., None, :]
  cov = jnp.einsum("...n,...ni,...nj->...ij", w, xd, xs)
  u, sig, vt = jnp.linalg.svd(cov)
  det = jnp.linalg.det(u) * jnp.linalg.det(vt)
  d = jnp.ones(sig.shape, sig.dtype).at[..., 2].set(jnp.sign(det + 1e-30) * 1.0)
  d = jnp.where(d == 0, 1.0, d)
  rotation = jnp.einsum("...ij,...j,...jk->...ik", u, d, vt)
  if with_scale:
    var_src = jnp.einsum("...n,...nc->...", w, xs * xs)
    scale = jnp.sum(sig * d, -1) / var_src
  else:
    scale = jnp.ones(sig.shape[:-1], src.dtype)
  translation = mu_dst - scale[..., None] * jnp.einsum("...ij,...j->...i", rotation, mu_src)
  return scale, rotation, translation


def apply_similarity(points, scale, rotation, translation):
  """points [..., N, 3] -> s R p + t."""
  rotated = jnp.einsum("...ij,...nj->...ni", rotation, points)
  return scale[..., None, None] * rotated + translation[..., None, :]
