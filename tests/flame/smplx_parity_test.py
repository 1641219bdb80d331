"""kaojax FLAME against smplx.FLAME on the synthetic model, random parameters."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
smplx = pytest.importorskip("smplx")

from kaojax.flame import load_flame  # pylint: disable=wrong-import-position


def _random_params(rng, batch, n_shape, n_expr):
  shape = rng.normal(size=(batch, n_shape)).astype(np.float32)
  expr = 0.8 * rng.normal(size=(batch, n_expr)).astype(np.float32)
  yaw = np.deg2rad(rng.uniform(-80, 80, size=batch))   # large yaw, both signs
  pose = np.concatenate([
      rng.uniform(-0.2, 0.2, (batch, 1)), yaw[:, None], rng.uniform(-0.2, 0.2, (batch, 1)),
      rng.uniform(0.0, 0.4, (batch, 1)), rng.uniform(-0.05, 0.05, (batch, 2))], 1)
  return shape, expr, pose.astype(np.float32)


@pytest.mark.parametrize("n_shape,n_expr", [(100, 50), (300, 100)])
def test_matches_smplx(synthetic_folder, n_shape, n_expr):
  rng = np.random.default_rng(n_shape)
  batch = 12
  shape, expr, pose = _random_params(rng, batch, n_shape, n_expr)
  ref = smplx.FLAME(model_path=str(synthetic_folder), num_betas=n_shape,
                    num_expression_coeffs=n_expr, use_face_contour=True, batch_size=batch)
  with torch.no_grad():
    out = ref(betas=torch.from_numpy(shape), expression=torch.from_numpy(expr),
              global_orient=torch.from_numpy(pose[:, :3]), jaw_pose=torch.from_numpy(pose[:, 3:]))
  ref_vertices = out.vertices.numpy()
  ref_static, ref_contour = out.joints[:, 5:56].numpy(), out.joints[:, 56:73].numpy()

  flame = load_flame(synthetic_folder, n_shape=n_shape, n_expr=n_expr, yaw_sign="smplx")
  mine = flame(shape, expr, pose)
  np.testing.assert_allclose(mine.vertices, ref_vertices, atol=1e-5)
  np.testing.assert_allclose(mine.landmarks2d[:, 17:], ref_static, atol=1e-5)
  np.testing.assert_allclose(mine.landmarks2d[:, :17], ref_contour, atol=1e-5)

  # DECA's sign picks the mirrored bin: same vertices, other contour for yaw != 0.
  deca = load_flame(synthetic_folder, n_shape=n_shape, n_expr=n_expr)(shape, expr, pose)
  np.testing.assert_allclose(deca.vertices, ref_vertices, atol=1e-5)
  moved = np.abs(np.asarray(deca.landmarks2d[:, :17]) - ref_contour).max(axis=(1, 2))
  turned = np.abs(np.asarray(mine.yaw_deg)) > 1.0
  assert np.all(moved[turned] > 1e-4)
