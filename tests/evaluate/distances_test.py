"""Exact point-to-mesh distances against a float64 brute force and Open3D/trimesh."""

import numpy as np
import pytest

from kaojax.evaluate import distances


def brute_force(points, vertices, faces):
  """float64 distances [P] by another method than the module's: the projection onto
  the plane when it falls inside the triangle, else the nearest of the three edges."""
  tri = np.asarray(vertices, np.float64)[faces]                   # [F, 3, 3]
  a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
  p = np.asarray(points, np.float64)[:, None]                     # [P, 1, 3]

  def segment(a, b):
    ab = b - a
    t = np.sum((p - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-300)
    q = a + np.clip(t, 0, 1)[..., None] * ab
    return np.sum((p - q) ** 2, -1)

  best = np.minimum(np.minimum(segment(a, b), segment(b, c)), segment(c, a))
  n = np.cross(b - a, c - a)
  n2 = np.sum(n * n, -1)
  ok = n2 > 1e-30
  height = np.sum((p - a) * n, -1) / np.where(ok, n2, 1.0)
  q = p - height[..., None] * n
  inside = ok & np.all([np.sum(np.cross(y - x, q - x) * n, -1) >= 0
                        for x, y in ((a, b), (b, c), (c, a))], 0)
  best = np.where(inside, np.minimum(best, np.sum((p - q) ** 2, -1)), best)
  return np.sqrt(best.min(1))


def bumpy_sphere(rng, n_lat=12, n_lon=16):
  """A closed, irregular triangle mesh around the origin (radius ~1)."""
  t = np.linspace(0.1, np.pi - 0.1, n_lat)
  phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
  t, phi = np.meshgrid(t, phi, indexing="ij")
  r = 1 + 0.15 * rng.normal(size=t.shape)
  v = np.stack([r * np.sin(t) * np.cos(phi), r * np.sin(t) * np.sin(phi), r * np.cos(t)], -1)
  v = np.concatenate([v.reshape(-1, 3), [[0, 0, 1.1], [0, 0, -1.1]]])
  faces = []
  for i in range(n_lat - 1):
    for j in range(n_lon):
      a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
      faces += [(a, a + n_lon, b), (b, a + n_lon, b + n_lon)]
  top, bottom = len(v) - 2, len(v) - 1
  last = (n_lat - 1) * n_lon
  faces += [(top, j, (j + 1) % n_lon) for j in range(n_lon)]
  faces += [(bottom, last + (j + 1) % n_lon, last + j) for j in range(n_lon)]
  return v, np.array(faces)


def hard_points(rng, vertices, faces, n):
  """Points near vertices, near edges, on and off faces, and far away."""
  tri = vertices[faces]
  normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
  f = rng.integers(0, len(faces), n)
  k = rng.integers(0, 3, n)
  near_vertex = tri[f, k] + 0.05 * rng.normal(size=(n, 3))
  t = rng.uniform(size=(n, 1))
  edge = tri[f, k] + t * (tri[f, (k + 1) % 3] - tri[f, k])
  near_edge = edge + 0.05 * rng.normal(size=(n, 3))
  bary = rng.dirichlet([1, 1, 1], n)
  surface = np.einsum("pk,pkc->pc", bary, tri[f])
  off_face = surface + rng.normal(scale=0.1, size=(n, 1)) * normals[f]
  on_surface = surface
  far = rng.normal(size=(n, 3)) * 5
  exactly_vertex = vertices[rng.integers(0, len(vertices), n)]
  return np.concatenate([near_vertex, near_edge, off_face, on_surface, far, exactly_vertex])


def test_matches_brute_force_on_random_meshes():
  rng = np.random.default_rng(0)
  for _ in range(3):
    v, f = bumpy_sphere(rng)
    pts = hard_points(rng, v, f, 300)
    np.testing.assert_allclose(distances.point_to_mesh(pts, v, f), brute_force(pts, v, f),
                               rtol=0, atol=1e-9)


def test_triangle_soup_with_degenerate_triangles():
  rng = np.random.default_rng(1)
  v = rng.normal(size=(60, 3))
  f = rng.integers(0, 60, size=(80, 3))
  # Collinear corners, a repeated corner and a single point.
  v = np.concatenate([v, [[0, 0, 0], [1, 1, 1], [3, 3, 3], [2, 0, 0]]])
  f = np.concatenate([f, [[60, 62, 61], [61, 63, 61], [63, 63, 63], [62, 60, 61]]])
  pts = np.concatenate([hard_points(rng, v, f, 100), [[1.5, 1.5, 1.6], [2, 0, 0.5]]])
  np.testing.assert_allclose(distances.point_to_mesh(pts, v, f), brute_force(pts, v, f),
                             rtol=0, atol=1e-9)


def test_closest_points_lie_on_their_faces_at_the_distance():
  rng = np.random.default_rng(2)
  v, f = bumpy_sphere(rng)
  pts = hard_points(rng, v, f, 100)
  d, face, closest = distances.closest_points(pts, v, f)
  np.testing.assert_allclose(np.linalg.norm(pts - closest, axis=-1), d, atol=1e-12)
  # The closest point is in its triangle's plane and inside it.
  tri = v[f[face]]
  n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  np.testing.assert_allclose(np.sum((closest - tri[:, 0]) * n, -1), 0, atol=1e-12)
  for i in range(0, len(pts), 37):
    np.testing.assert_allclose(brute_force(closest[i:i + 1], v, f[face[i]][None]), 0, atol=1e-12)


def test_flame_sized_mesh_and_scan_like_points():
  from kaojax.flame.synthetic import make_synthetic_flame
  flame = make_synthetic_flame()
  v, f = np.asarray(flame.v_template, np.float64), np.asarray(flame.faces)
  rng = np.random.default_rng(3)
  pts = np.concatenate([hard_points(rng, v, f, 30), v[:50] + 0.003 * rng.normal(size=(50, 3))])
  np.testing.assert_allclose(distances.point_to_mesh(pts, v, f), brute_force(pts, v, f),
                             rtol=0, atol=1e-9)
  # A mesh built once answers many queries (the refinement's use).
  mesh = distances.MeshDistance(v, f)
  np.testing.assert_array_equal(mesh.query(pts)[0], distances.point_to_mesh(pts, v, f))


def test_matches_open3d():
  o3d = pytest.importorskip("open3d")
  rng = np.random.default_rng(4)
  v, f = bumpy_sphere(rng)
  pts = hard_points(rng, v, f, 300)
  scene = o3d.t.geometry.RaycastingScene()
  scene.add_triangles(o3d.core.Tensor(v.astype(np.float32)), o3d.core.Tensor(f.astype(np.uint32)))
  reference = scene.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()
  # Open3D computes in float32 from float32 inputs: compare on float32-exact inputs.
  ours = distances.point_to_mesh(pts.astype(np.float32), v.astype(np.float32), f)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_matches_trimesh():
  trimesh = pytest.importorskip("trimesh")
  pytest.importorskip("rtree")
  rng = np.random.default_rng(5)
  v, f = bumpy_sphere(rng)
  pts = hard_points(rng, v, f, 100)
  _, reference, _ = trimesh.proximity.closest_point(trimesh.Trimesh(v, f, process=False), pts)
  np.testing.assert_allclose(distances.point_to_mesh(pts, v, f), reference, rtol=0, atol=1e-6)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match="points"):
    distances.point_to_mesh(np.zeros((3, 2)), np.zeros((3, 3)), np.array([[0, 1, 2]]))
  with pytest.raises(ValueError, match="finite"):
    distances.point_to_mesh(np.full((1, 3), np.nan), np.eye(3), np.array([[0, 1, 2]]))
  with pytest.raises(ValueError, match="faces"):
    distances.point_to_mesh(np.zeros((3, 3)), np.zeros((3, 3)), np.array([[0, 1, 5]]))
