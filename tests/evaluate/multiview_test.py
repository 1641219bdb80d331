"""Multi-view metrics: Chamfer, keypoint alignment, the paper's variances, heat maps."""

import numpy as np
import pytest
from PIL import Image

from kaojax import geometry
from kaojax.evaluate import multiview
from kaojax.evaluate.heatmap import colormap, render_heatmap
from kaojax.flame.synthetic import make_synthetic_flame


def _grid(n=6, size=1.0):
  """A flat square grid mesh in the z = 0 plane: vertices [(n+1)^2, 3], faces."""
  xs = np.linspace(0, size, n + 1)
  x, y = np.meshgrid(xs, xs, indexing="ij")
  vertices = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], -1)
  faces = []
  for i in range(n):
    for j in range(n):
      a, b = i * (n + 1) + j, (i + 1) * (n + 1) + j
      c, d = a + 1, b + 1
      faces += [(a, b, c), (b, d, c)]
  return vertices, np.array(faces)


def _rotation(rng):
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  return q * np.sign(np.linalg.det(q))


def test_chamfer_of_identical_meshes_is_zero_and_offset_is_analytic():
  v, f = _grid()
  assert multiview.chamfer(v, f, v, f)["chamfer"] == pytest.approx(0.0, abs=1e-12)
  shifted = v + [0, 0, 0.03]                 # parallel planes 0.03 apart
  c = multiview.chamfer(shifted, f, v, f)
  assert c["a_to_b"] == pytest.approx(0.03, abs=1e-12)
  assert c["chamfer"] == pytest.approx(0.03, abs=1e-12)
  # A grid twice as long in x (same z): a's far half is 0..1 away from b's edge.
  long_v = v * [2, 1, 1]
  c = multiview.chamfer(long_v, f, v, f)
  expect = np.mean(np.maximum(long_v[:, 0] - 1.0, 0.0))
  assert c["a_to_b"] == pytest.approx(expect, abs=1e-12)
  assert c["b_to_a"] == pytest.approx(0.0, abs=1e-12)


def test_alignment_recovers_a_known_similarity():
  rng = np.random.default_rng(0)
  src = rng.normal(size=(68, 3))
  rotation, scale, translation = _rotation(rng), 1.7, rng.normal(size=3)
  dst = scale * src @ rotation.T + translation
  s, r, t = multiview.align_on_keypoints(src, dst)
  assert s == pytest.approx(scale, abs=1e-6)
  np.testing.assert_allclose(r, rotation, atol=1e-6)
  np.testing.assert_allclose(t, translation, atol=1e-6)


def test_score_view_undoes_the_similarity_and_measures_an_offset():
  flame = make_synthetic_flame()
  rng = np.random.default_rng(1)
  out = flame(rng.normal(size=flame.n_shape).astype(np.float32),
              np.zeros(flame.n_expr, np.float32), np.zeros(6, np.float32))
  gt, keypoints = np.asarray(out.vertices, np.float64), np.asarray(out.landmarks3d, np.float64)
  faces, mask = np.asarray(flame.faces), np.asarray(flame.face_mask)
  transform = (0.6, _rotation(rng), np.array([0.1, -0.2, 0.3]))
  pred = multiview.apply_transform(transform, gt)
  pred_kp = multiview.apply_transform(transform, keypoints)
  s = multiview.score_view(pred, pred_kp, gt, keypoints, faces, mask)
  assert s.chamfer < 1e-9 and s.scale == pytest.approx(1 / 0.6, rel=1e-9)
  np.testing.assert_allclose(s.aligned, gt, atol=1e-9)
  # Every vertex moved 1 mm along its normal, keypoints unchanged (the alignment stays
  # the identity): an error above half and at most 1 mm.
  normals = np.asarray(geometry.vertex_normals(gt, faces), np.float64)
  bumped = gt + 1e-3 * normals
  s = multiview.score_view(bumped, keypoints, gt, keypoints, faces, mask)
  assert 0.5e-3 < s.chamfer <= 1.0001e-3


def test_parameter_variance_is_the_papers_definition():
  values = np.array([[0.0, 0.0, 5.0], [2.0, 0.0, 5.0], [1.0, 3.0, 5.0]])
  mean = values.mean(0)
  expect = np.mean([np.sum((x - mean) ** 2) for x in values])
  assert multiview.parameter_variance(values) == pytest.approx(expect)
  # first 1 coefficient: values 0, 2, 1 -> (1 + 1 + 0) / 3
  assert multiview.parameter_variance(values, dims=1) == pytest.approx(2 / 3)
  assert multiview.parameter_variance(np.ones((4, 7))) == 0.0
  variance, mean_mesh = multiview.vertex_variance(np.stack([np.zeros((5, 3)),
                                                            np.ones((5, 3)) * 2]))
  np.testing.assert_allclose(variance, 3.0)       # each view is sqrt(3) from the mean
  np.testing.assert_allclose(mean_mesh, 1.0)


def test_facial_submesh_and_heatmap(tmp_path):
  flame = make_synthetic_flame()
  v = np.asarray(flame.v_template, np.float64)
  faces, mask = np.asarray(flame.faces), np.asarray(flame.face_mask)
  sub_v, sub_f, ids = multiview.facial_submesh(v, faces, mask)
  assert len(sub_f) == mask.sum() and sub_f.max() == len(sub_v) - 1
  np.testing.assert_array_equal(sub_v[sub_f], v[faces[mask]])
  np.testing.assert_allclose(colormap([0.0, 10.0], 1.0)[[0, 1]][1], [0.85, 0.05, 0.05])
  values = v[:, 1] - v[:, 1].min()                # grows upwards
  path = render_heatmap(tmp_path / "heat.png", v, faces, values, float(values.max()), "t")
  image = np.asarray(Image.open(path).convert("RGB"), np.float64)
  assert image.shape == (300, 256, 3)
  face = image[:256]
  covered = np.any(face < 250, -1)
  assert 0.05 < covered.mean() < 0.9
  rows = np.nonzero(covered.any(1))[0]
  top, bottom = face[rows[5]], face[rows[-5]]      # red-ish at the top, blue below
  red = lambda row: np.mean(row[np.any(row < 250, -1), 0] - row[np.any(row < 250, -1), 2])
  assert red(top) > red(bottom)
