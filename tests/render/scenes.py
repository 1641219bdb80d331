"""Small random scenes and cameras for the renderer tests."""

import numpy as np

from kaojax.geometry import cameras
from kaojax.render import Gaussians


def random_gaussians(seed, batch=(), n=200, scale=(0.05, 0.3), spread=0.8, dtype=np.float32):
  """Random Gaussians [*batch, n, ...] around the origin (numpy arrays)."""
  rng = np.random.default_rng(seed)
  shape = tuple(batch) + (n,)
  return Gaussians(
      means=(rng.normal(size=shape + (3,)) * spread).astype(dtype),
      quats=rng.normal(size=shape + (4,)).astype(dtype),
      scales=rng.uniform(*scale, size=shape + (3,)).astype(dtype),
      opacities=rng.uniform(0.2, 0.95, size=shape).astype(dtype),
      colors=rng.uniform(size=shape + (3,)).astype(dtype))


def orbit_views(seed, batch=(), distance=4.0, width=48, height=32, focal=40.0, dtype=np.float32):
  """World-to-camera viewmats [*batch, 4, 4] looking at the origin from random
  directions, and Ks [*batch, 3, 3] with a slightly off-centre principal point."""
  rng = np.random.default_rng(seed)
  n = int(np.prod(batch)) if batch else 1
  eye = rng.normal(size=(n, 3))
  eye = distance * eye / np.linalg.norm(eye, axis=-1, keepdims=True)
  up = np.array([0.0, 1.0, 0.0])
  c2w = np.asarray(cameras.look_at(eye, np.zeros(3), up))
  viewmats = np.asarray(cameras.invert_pose(c2w)).reshape(tuple(batch) + (4, 4))
  f = focal * rng.uniform(0.9, 1.1, size=(n,))
  K = np.zeros((n, 3, 3))
  K[:, 0, 0], K[:, 1, 1] = f, f * rng.uniform(0.95, 1.05, size=(n,))
  K[:, 0, 2] = width / 2 + rng.uniform(-2, 2, size=(n,))
  K[:, 1, 2] = height / 2 + rng.uniform(-2, 2, size=(n,))
  K[:, 2, 2] = 1.0
  return viewmats.astype(dtype), K.reshape(tuple(batch) + (3, 3)).astype(dtype)


def add_splats_behind_camera(g, viewmat, count=2):
  """Append `count` Gaussians behind the camera `viewmat` [4, 4] (camera z < 0),
  e.g. to check that culled splats keep gradients finite."""
  R, t = np.asarray(viewmat)[:3, :3], np.asarray(viewmat)[:3, 3]
  centre = -R.T @ t
  back = -R[2]                                          # world direction of camera -z
  means = centre + np.outer(0.3 + 0.2 * np.arange(count), back)
  extra = {
      "means": means, "quats": np.tile([1.0, 0.2, 0.0, 0.1], (count, 1)),
      "scales": np.full((count, 3), 0.2), "opacities": np.full((count,), 0.8),
      "colors": np.full((count, 3), 0.5)}
  fields = {k: np.concatenate([np.asarray(getattr(g, k)),
                               extra[k].astype(np.asarray(getattr(g, k)).dtype)], 0)
            for k in extra}
  return Gaussians(**fields)


def uv_sphere(radius=0.8, resolution=24):
  """Open3D's `TriangleMesh.create_sphere(radius, resolution)` in numpy, vertex for
  vertex and face for face (2 poles + resolution - 1 rings of 2 * resolution vertices;
  resolution 24: 1,106 vertices, 2,208 faces), so that tests which need only a mesh
  do not need open3d. Returns vertices [V, 3] float32, faces [F, 3] int32."""
  r, step = resolution, np.pi / resolution
  ring = np.arange(2 * r)
  alpha = step * np.arange(1, r)[:, None]
  theta = step * ring[None, :]
  rings = np.stack([np.sin(alpha) * np.cos(theta), np.sin(alpha) * np.sin(theta),
                    np.broadcast_to(np.cos(alpha), (r - 1, 2 * r))], -1).reshape(-1, 3)
  verts = np.concatenate([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], rings]) * radius
  nxt = (ring + 1) % (2 * r)
  last = 2 + 2 * r * (r - 2)
  caps = np.stack([np.stack([np.zeros_like(ring), 2 + ring, 2 + nxt], -1),
                   np.stack([np.ones_like(ring), last + nxt, last + ring], -1)], 1).reshape(-1, 3)
  b1 = (2 + 2 * r * np.arange(r - 2))[:, None]
  b2 = b1 + 2 * r
  quads = np.stack([np.stack([b2 + ring, b1 + nxt, b1 + ring], -1),
                    np.stack([b2 + ring, b2 + nxt, b1 + nxt], -1)], 2).reshape(-1, 3)
  return verts.astype(np.float32), np.concatenate([caps, quads]).astype(np.int32)
