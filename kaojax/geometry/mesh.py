"""Triangle-mesh helpers: normals, areas, barycentric interpolation and
area-weighted surface sampling (differentiable w.r.t. vertex positions)."""

import jax
import jax.numpy as jnp


def face_vertices(vertices, faces):
  """vertices [..., V, C], faces [F, 3] int -> [..., F, 3, C]."""
  return vertices[..., faces, :]


def face_normals(vertices, faces, normalize: bool = True):
  """vertices [..., V, 3], faces [F, 3] -> normals [..., F, 3] (counter-clockwise
  winding gives the outward normal). Unnormalised: twice the area vector."""
  tri = face_vertices(vertices, faces)
  n = jnp.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :])
  if normalize:
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
  return n


def face_areas(vertices, faces):
  """vertices [..., V, 3], faces [F, 3] -> areas [..., F]."""
  return 0.5 * jnp.linalg.norm(face_normals(vertices, faces, normalize=False), axis=-1)


def vertex_normals(vertices, faces):
  """Area-weighted vertex normals [..., V, 3] (unit length)."""
  fn = face_normals(vertices, faces, normalize=False)  # [..., F, 3]
  n = jnp.zeros_like(vertices)
  for k in range(3):
    n = n.at[..., faces[:, k], :].add(fn)
  return n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def interpolate_barycentric(values, faces, face_idx, bary):
  """values [..., V, C], faces [F, 3], face_idx [..., N] int, bary [..., N, 3]
  -> [..., N, C] = sum_k bary[n, k] values[faces[face_idx[n], k]]."""
  corners = _gather_corners(values, faces[face_idx])  # [..., N, 3, C]
  return jnp.einsum("...nk,...nkc->...nc", bary, corners)


def _gather_corners(values, corner_ids):
  # values [..., V, C]; corner_ids [..., N, 3] -> [..., N, 3, C]
  batch = jnp.broadcast_shapes(values.shape[:-2], corner_ids.shape[:-2])
  vals = jnp.broadcast_to(values, batch + values.shape[-2:])
  corner_ids = jnp.broadcast_to(corner_ids, batch + corner_ids.shape[-2:])
  flat_ids = corner_ids.reshape(batch + (-1,))
  out = jnp.take_along_axis(vals, flat_ids[..., None], axis=-2)
  return out.reshape(corner_ids.shape + (values.shape[-1],))


def sample_surface(key, vertices, faces, num_samples: int):
  """Area-weighted uniform samples on a triangle mesh, with replacement.

  key: PRNG key; vertices [..., V, 3]; faces [F, 3].
  Returns points [..., N, 3], face_idx [..., N] int32, bary [..., N, 3].
  Faces are drawn in proportion to their area (held fixed, no gradient), the
  barycentrics are (1 - sqrt(u), sqrt(u)(1 - v), sqrt(u) v); points are
  differentiable w.r.t. the vertices through the barycentric interpolation.
  Every batch element gets its own draw.
  """
  batch = vertices.shape[:-2]
  areas = jax.lax.stop_gradient(face_areas(vertices, faces))
  k_face, k_uv = jax.random.split(key)
  # Inverse-CDF draw: O(N log F) instead of categorical's O(N F).
  cdf = jnp.cumsum(areas, axis=-1)
  u = jax.random.uniform(k_face, batch + (num_samples,), cdf.dtype) * cdf[..., -1:]
  search = lambda c, x: jnp.searchsorted(c, x, side="right")
  for _ in batch:
    search = jax.vmap(search)
  face_idx = jnp.minimum(search(cdf, u), faces.shape[0] - 1).astype(jnp.int32)  # [..., N]
  uv = jax.random.uniform(k_uv, batch + (num_samples, 2), vertices.dtype)
  su = jnp.sqrt(uv[..., 0])
  v = uv[..., 1]
  bary = jnp.stack([1.0 - su, su * (1.0 - v), su * v], -1)
  points = interpolate_barycentric(vertices, faces, face_idx, bary)
  return points, face_idx, bary
