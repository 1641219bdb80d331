import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial.transform import Rotation

from kaojax import geometry as g


def _two_triangles():
  # A unit right triangle (area 0.5) and one 9 times larger (area 4.5).
  v = jnp.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 3, 0]], jnp.float32)
  f = jnp.array([[0, 1, 2], [3, 4, 5]])
  return v, f


def test_sample_surface_is_area_weighted_and_on_faces():
  v, f = _two_triangles()
  pts, face_idx, bary = g.sample_surface(jax.random.key(0), v, f, 20000)
  frac_big = float(jnp.mean(face_idx == 1))
  assert abs(frac_big - 0.9) < 0.01
  np.testing.assert_allclose(jnp.sum(bary, -1), 1.0, atol=1e-6)
  assert float(jnp.min(bary)) >= 0
  np.testing.assert_allclose(pts, g.interpolate_barycentric(v, f, face_idx, bary), atol=1e-6)
  # Uniform inside a triangle: the mean of the samples is the centroid.
  small = np.asarray(pts)[np.asarray(face_idx) == 0]
  np.testing.assert_allclose(small.mean(0), [1 / 3, 1 / 3, 0], atol=0.02)


def test_sample_surface_batched_draws_differ_and_are_reproducible():
  v, f = _two_triangles()
  vb = jnp.stack([v, v * 2])
  pts, face_idx, _ = g.sample_surface(jax.random.key(3), vb, f, 64)
  assert pts.shape == (2, 64, 3) and face_idx.shape == (2, 64)
  assert not np.array_equal(np.asarray(face_idx[0]), np.asarray(face_idx[1]))
  again, _, _ = g.sample_surface(jax.random.key(3), vb, f, 64)
  np.testing.assert_array_equal(pts, again)


def test_sample_surface_gradient_is_barycentric():
  v, f = _two_triangles()
  key = jax.random.key(1)
  _, face_idx, bary = g.sample_surface(key, v, f, 16)
  grad = jax.grad(lambda vv: jnp.sum(g.sample_surface(key, vv, f, 16)[0][:, 0]))(v)
  expected = np.zeros((6, 3))
  for fi, b in zip(np.asarray(face_idx), np.asarray(bary)):
    expected[np.asarray(f)[fi], 0] += b
  np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_vertex_normals_of_sphere_are_radial():
  # Icosphere-like: a UV sphere is enough away from the poles.
  n_lat, n_lon = 20, 40
  th = np.pi * (np.arange(1, n_lat) / n_lat)
  ph = 2 * np.pi * np.arange(n_lon) / n_lon
  th, ph = np.meshgrid(th, ph, indexing="ij")
  v = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
  faces = []
  for i in range(n_lat - 2):
    for j in range(n_lon):
      a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
      faces += [(a, a + n_lon, b), (b, a + n_lon, b + n_lon)]
  n = g.vertex_normals(jnp.asarray(v, jnp.float32), jnp.asarray(faces))
  interior = np.arange(n_lon, (n_lat - 2) * n_lon)
  cos = np.sum(np.asarray(n)[interior] * v[interior], -1)
  assert cos.min() > 0.99  # outward and radial for counter-clockwise faces
  areas = g.face_areas(jnp.asarray(v, jnp.float32), jnp.asarray(faces))
  tri = v[np.asarray(faces)]
  heron = [np.sqrt(max(0.0, s * (s - a) * (s - b) * (s - c))) for a, b, c, s in (
      (*sides, sum(sides) / 2) for sides in (np.linalg.norm(
          t[[1, 2, 0]] - t, axis=1) for t in tri))]
  np.testing.assert_allclose(areas, heron, rtol=1e-3)


def test_umeyama_recovers_similarity():
  rng = np.random.default_rng(0)
  src = rng.normal(size=(3, 50, 3)).astype(np.float32)
  rot = Rotation.random(3, random_state=1).as_matrix().astype(np.float32)
  scale = np.array([0.5, 1.0, 2.5], np.float32)
  trans = rng.normal(size=(3, 3)).astype(np.float32)
  dst = g.apply_similarity(jnp.asarray(src), jnp.asarray(scale), jnp.asarray(rot), jnp.asarray(trans))
  s, r, t = g.umeyama(jnp.asarray(src), dst)
  np.testing.assert_allclose(s, scale, rtol=1e-4)
  np.testing.assert_allclose(r, rot, atol=1e-4)
  np.testing.assert_allclose(t, trans, atol=1e-4)
  s1, _, _ = g.umeyama(jnp.asarray(src), dst, with_scale=False)
  np.testing.assert_allclose(s1, 1.0)


def test_umeyama_never_returns_a_reflection():
  rng = np.random.default_rng(1)
  src = rng.normal(size=(30, 3)).astype(np.float32)
  dst = src * np.array([-1, 1, 1], np.float32)  # a mirror image
  _, r, _ = g.umeyama(jnp.asarray(src), jnp.asarray(dst))
  assert float(jnp.linalg.det(r)) > 0.99
