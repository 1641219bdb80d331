import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from kaojax import geometry as g


def test_facelift_cameras_match_spec():
  c2w, K = g.facelift_cameras(512)
  expected = np.array([[0, -2.7, 0], [-1.909, -1.909, 0], [-2.7, 0, 0], [0, 2.7, 0],
                       [2.7, 0, 0], [1.909, -1.909, 0]])
  np.testing.assert_allclose(c2w[:, :3, 3], expected, atol=1e-3)
  assert float(K[0, 0, 0]) == pytest.approx(548.9937744140625, abs=1e-4)
  np.testing.assert_allclose(K[:, 0, 2], 256.0)
  # Every camera looks at the origin: it projects to the principal point.
  uv, depth = g.project_points(jnp.zeros((6, 1, 3)), g.invert_pose(c2w), K)
  np.testing.assert_allclose(uv[:, 0], 256.0, atol=1e-3)
  np.testing.assert_allclose(depth[:, 0], 2.7, atol=1e-5)
  # World +Z (up) appears upwards in the image (smaller pixel y).
  uv_up, _ = g.project_points(jnp.array([[[0, 0, 0.5]]] * 6), g.invert_pose(c2w), K)
  assert np.all(uv_up[:, 0, 1] < 256.0)


def test_fov_focal_roundtrip():
  assert g.fov_to_focal(50.0, 512) == pytest.approx(548.9937744140625, rel=1e-7)
  assert g.focal_to_fov(g.fov_to_focal(37.0, 300), 300) == pytest.approx(37.0)


def test_openlrm_default_camera():
  cam = g.default_openlrm_source_camera()
  np.testing.assert_array_equal(cam, [1, 0, 0, 0, 0, 0, -1, -2, 0, 1, 0, 0, .75, .75, .5, .5])
  c2w, K = g.from_openlrm_camera(cam, 224, 224)
  np.testing.assert_allclose(c2w[:3, 3], [0, -2, 0])
  np.testing.assert_allclose(c2w[:3, 2], [0, 1, 0])      # OpenCV forward: +Y, at the origin
  np.testing.assert_allclose(c2w[:3, 1], [0, 0, -1])     # image down = world -Z
  np.testing.assert_allclose(K, [[168, 0, 112], [0, 168, 112], [0, 0, 1]])
  np.testing.assert_allclose(g.to_openlrm_camera(c2w, K, 224, 224), cam, atol=1e-7)
  with pytest.raises(ValueError, match="16"):
    g.from_openlrm_camera(jnp.zeros(20), 224, 224)


def test_openlrm_roundtrip_random_cameras():
  rng = np.random.default_rng(0)
  eye = rng.normal(size=(5, 3)) * 2
  c2w = g.look_at(eye, np.zeros(3), (0, 0, 1))
  K = g.intrinsics(rng.uniform(100, 300, 5), rng.uniform(100, 300, 5), 100.0, 90.0)
  back_c2w, back_K = g.from_openlrm_camera(g.to_openlrm_camera(c2w, K, 200, 180), 200, 180)
  np.testing.assert_allclose(back_c2w, c2w, atol=1e-6)
  np.testing.assert_allclose(back_K, K, rtol=1e-6)


def test_flame_triplane_worlds():
  p = jnp.array([[0.1, 0.2, 0.3]])
  np.testing.assert_allclose(g.flame_to_triplane(p), [[0.1, -0.3, 0.2]])
  np.testing.assert_allclose(g.triplane_to_flame(g.flame_to_triplane(p)), p)
  # The canonical OpenLRM camera is at (0, 0, 2) in the FLAME world, looking down -Z.
  c2w, _ = g.from_openlrm_camera(g.default_openlrm_source_camera(), 1, 1)
  flame_c2w = g.triplane_pose_to_flame(c2w)
  np.testing.assert_allclose(flame_c2w[:3, 3], [0, 0, 2], atol=1e-7)
  np.testing.assert_allclose(flame_c2w[:3, 2], [0, 0, -1], atol=1e-7)
  np.testing.assert_allclose(flame_c2w[:3, 1], [0, -1, 0], atol=1e-7)  # FLAME +Y is up
  np.testing.assert_allclose(g.flame_pose_to_triplane(flame_c2w), c2w, atol=1e-7)
  # Y-up orbit at azimuth 270 is the same camera.
  np.testing.assert_allclose(g.orbit_cameras(270.0, 0.0, 2.0, up="y"), flame_c2w, atol=1e-6)


def test_look_at_is_orthonormal_and_projects_target_to_centre():
  rng = np.random.default_rng(1)
  eye = rng.normal(size=(8, 3)) * 3
  target = rng.normal(size=(8, 3)) * 0.3
  c2w = g.look_at(eye, target, (0, 1, 0))
  r = np.asarray(c2w[:, :3, :3])
  np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape),
                             atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
  K = g.intrinsics_from_fov(40.0, 64, 48)
  uv, depth = g.project_points(jnp.asarray(target)[:, None], g.invert_pose(c2w), K)
  np.testing.assert_allclose(uv[:, 0], np.broadcast_to([32, 24], (8, 2)), atol=1e-3)
  np.testing.assert_allclose(depth[:, 0], np.linalg.norm(eye - target, axis=1), rtol=1e-5)


def test_intrinsics_normalisation_roundtrip():
  K = g.intrinsics(100.0, 120.0, 30.0, 40.0)
  n = g.normalize_intrinsics(K, 64, 80)
  np.testing.assert_allclose(n, [100 / 64, 120 / 80, 30 / 64, 40 / 80])
  np.testing.assert_allclose(g.denormalize_intrinsics(n, 64, 80), K)


def test_pixel_rays_pass_through_pixel_centres():
  c2w = g.look_at(jnp.array([0.3, -2.0, 0.5]), jnp.zeros(3), (0, 0, 1))
  K = g.intrinsics(50.0, 55.0, 16.0, 12.0)
  o, d = g.pixel_rays(c2w, K, 32, 24)
  assert o.shape == d.shape == (24, 32, 3)
  np.testing.assert_allclose(jnp.linalg.norm(d, axis=-1), 1.0, rtol=1e-6)
  pts = (o + 1.7 * d).reshape(1, -1, 3)
  uv, _ = g.project_points(pts, g.invert_pose(c2w)[None], K[None])
  ys, xs = np.mgrid[0:24, 0:32] + 0.5
  np.testing.assert_allclose(uv[0], np.stack([xs, ys], -1).reshape(-1, 2), atol=1e-3)


def test_facelift_ray_encoding():
  c2w, K = g.facelift_cameras(16)
  images = jax.random.uniform(jax.random.key(0), (6, 16, 16, 3))
  enc = g.facelift_ray_encoding(images, c2w, K)
  assert enc.shape == (6, 16, 16, 9)
  np.testing.assert_allclose(enc[..., :3], images * 2 - 1, atol=1e-7)
  d, p = enc[..., 3:6], enc[..., 6:9]
  # The stored point lies on the ray and is the one closest to the origin.
  np.testing.assert_allclose(jnp.sum(p * d, -1), 0.0, atol=1e-5)
  o = c2w[:, None, None, :3, 3]
  cross = jnp.cross(p - o, d)
  np.testing.assert_allclose(cross, 0.0, atol=1e-5)


def test_rotations_against_scipy():
  rng = np.random.default_rng(2)
  aa = rng.normal(size=(16, 3))
  ref = Rotation.from_rotvec(aa)
  np.testing.assert_allclose(g.axis_angle_to_matrix(jnp.asarray(aa, jnp.float32)),
                             ref.as_matrix(), atol=1e-5)
  quat_xyzw = ref.as_quat()
  quat_wxyz = np.concatenate([quat_xyzw[:, 3:], quat_xyzw[:, :3]], 1)
  quat_wxyz *= np.sign(quat_wxyz[:, :1])
  np.testing.assert_allclose(g.quat_to_matrix(jnp.asarray(quat_wxyz)), ref.as_matrix(), atol=1e-5)
  np.testing.assert_allclose(g.matrix_to_quat(jnp.asarray(ref.as_matrix(), jnp.float32)),
                             quat_wxyz, atol=1e-5)
  np.testing.assert_allclose(g.axis_angle_to_quat(jnp.asarray(aa)), np.where(
      np.sign(np.cos(np.linalg.norm(aa, axis=1) / 2))[:, None] < 0, -quat_wxyz, quat_wxyz),
      atol=1e-5)
  back = g.matrix_to_axis_angle(g.axis_angle_to_matrix(jnp.asarray(aa, jnp.float32)))
  np.testing.assert_allclose(Rotation.from_rotvec(np.asarray(back)).as_matrix(),
                             ref.as_matrix(), atol=1e-5)
  # Hamilton product composes rotations.
  q1, q2 = quat_wxyz[:8], quat_wxyz[8:]
  np.testing.assert_allclose(
      g.quat_to_matrix(g.quat_multiply(jnp.asarray(q1), jnp.asarray(q2))),
      ref[:8].as_matrix() @ ref[8:].as_matrix(), atol=1e-5)


def test_axis_angle_gradient_finite_at_zero():
  grad = jax.grad(lambda a: jnp.sum(g.axis_angle_to_matrix(a) ** 2 * jnp.arange(9.).reshape(3, 3)))
  assert np.all(np.isfinite(grad(jnp.zeros(3))))
  gq = jax.grad(lambda a: jnp.sum(g.axis_angle_to_quat(a)))(jnp.zeros(3))
  assert np.all(np.isfinite(gq))


def test_orbit_positions():
  pos = g.orbit_positions(jnp.array([0.0, 90.0]), jnp.array([0.0, 30.0]), 2.0)
  np.testing.assert_allclose(pos, [[2, 0, 0], [0, 2 * math.cos(math.pi / 6), 1.0]], atol=1e-6)
  with pytest.raises(ValueError, match="up"):
    g.orbit_positions(0.0, 0.0, 1.0, up="x")
