"""The NoW protocol: .pp files, crop, alignment, refinement, statistics, layout."""

import functools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from kaojax.evaluate import now
from kaojax.evaluate.distances import MeshDistance


@functools.lru_cache(maxsize=1)
def flame_head():
  """Synthetic FLAME neutral head: (vertices [V, 3] m, faces, 7 NoW landmarks [7, 3] m)."""
  from kaojax.flame.synthetic import make_synthetic_flame
  flame = make_synthetic_flame(n_shape=10, n_expr=10)
  out = flame(np.zeros(10, np.float32), np.zeros(10, np.float32), np.zeros(6, np.float32))
  lmk = np.asarray(out.landmarks3d, np.float64)[list(now.IBUG_INDICES)]
  return np.asarray(out.vertices, np.float64), np.asarray(flame.faces), lmk


def random_similarity(rng, scale=None):
  r = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
  return (scale if scale is not None else rng.uniform(0.5, 2)), r, rng.normal(size=3)


def test_procrustes_recovers_a_known_similarity():
  rng = np.random.default_rng(0)
  src = rng.normal(size=(7, 3))
  for _ in range(5):
    s, r, t = random_similarity(rng)
    dst = s * src @ r.T + t
    for reflection in (True, False):
      s2, r2, t2 = now.procrustes(src, dst, reflection=reflection)
      np.testing.assert_allclose([s2], [s], atol=1e-6)
      np.testing.assert_allclose(r2, r, atol=1e-6)
      np.testing.assert_allclose(t2, t, atol=1e-6)
  # Unit scale: the best rotation and translation only.
  s2, r2, t2 = now.procrustes(src, src @ r.T + t, with_scale=False)
  assert s2 == 1.0
  np.testing.assert_allclose(r2, r, atol=1e-6)


def test_procrustes_reflection_best_vs_proper():
  src = np.random.default_rng(1).normal(size=(7, 3))
  mirrored = src * [-1, 1, 1]
  assert np.linalg.det(now.procrustes(src, mirrored)[1]) < 0      # the official 'best'
  assert np.linalg.det(now.procrustes(src, mirrored, reflection=False)[1]) > 0


def test_pp_round_trip_and_meshlab_layout(tmp_path):
  points = np.random.default_rng(2).normal(size=(7, 3)) * 100
  path = now.write_pp(tmp_path / "a.pp", points, mesh_name="scan.obj")
  np.testing.assert_allclose(now.read_pp(path), points, atol=1e-6)
  # The official loader reads the 7 points from lines 8-14.
  lines = path.read_text().splitlines()
  assert all(lines[i].lstrip().startswith("<point") for i in range(8, 15))
  # A file as MeshLab writes it (other attribute order, inactive flag, names).
  text = """<!DOCTYPE PickingPointsFile>
<PickedPoints>
 <DocumentData>
  <DateTime time="12:31:05" date="2018-05-04"/>
  <User name="annotator"/>
  <DataFileName name="natural_head_rotation.000001.obj"/>
  <templateName name=""/>
 </DocumentData>
 <point y="-13.25" x="45.5" active="1" z="1201.75" name="0"/>
 <point z="2" name="1" active="0" x="1e-3" y="-4"/>
</PickedPoints>
"""
  (tmp_path / "m.pp").write_text(text)
  np.testing.assert_allclose(now.read_pp(tmp_path / "m.pp"),
                             [[45.5, -13.25, 1201.75], [1e-3, -4, 2]])


def test_crop_ball_follows_the_rule():
  lm = np.array([[-45, 0, 0], [-15, 0, 0], [15, 0, 0], [45, 0, 0], [0, -40, 10],
                 [-25, -70, 0], [25, -70, 0]], float)
  centre, radius = now.crop_ball(lm)
  np.testing.assert_allclose(centre, [0, -40 + 0.3 * 40, 10 - 0.3 * 10])
  np.testing.assert_allclose(radius, 1.4 * (90 + np.hypot(40, 10)) / 2)
  pts = centre + np.array([[radius - 1e-6, 0, 0], [0, radius + 1e-6, 0]])
  assert len(now.crop_scan(pts, lm)) == 1


def test_identical_prediction_scores_zero():
  v, f, lm = flame_head()
  rng = np.random.default_rng(3)
  # The scan: the head in millimetres; the prediction: the head in metres, moved.
  transform = random_similarity(rng, scale=0.8)
  score = now.score_prediction(v * 1000, lm * 1000, now.apply(transform, v), f,
                               now.apply(transform, lm))
  assert len(score.errors) > 100
  assert score.errors.max() < 1e-6
  # Metrical: metres at unit scale (x1000 to the scan's millimetres), moved rigidly.
  rigid = random_similarity(rng, scale=1.0)
  score = now.score_prediction(v * 1000, lm * 1000, now.apply(rigid, v), f,
                               now.apply(rigid, lm), metrical=True, unit="m")
  assert score.scale == 1000.0
  assert score.errors.max() < 1e-6


def test_read_mesh_obj_polygons_and_ply(tmp_path):
  (tmp_path / "q.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0 0.5 0.5 0.5\nv 0 1 0\n"
                                  "vt 0 0\nf 1/1/1 2/1/1 3/1/1 4/1/1\nf -1 -2 -3\n")
  v, f = now.read_mesh(tmp_path / "q.obj")
  assert v.shape == (4, 3)
  np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [3, 2, 1]])
  from kaojax.export.ply import write_mesh_ply
  write_mesh_ply(tmp_path / "m.ply", v, f)
  v2, f2 = now.read_mesh(tmp_path / "m.ply")
  np.testing.assert_allclose(v2, v, atol=1e-6)
  np.testing.assert_array_equal(f2, f)


def test_refinement_reaches_the_true_pose_error():
  v, f, lm = flame_head()
  rng = np.random.default_rng(4)
  mesh = MeshDistance(v, f)
  scan = now.crop_scan(v * 1000, lm * 1000)
  scan = scan + rng.normal(scale=0.2, size=scan.shape)
  true = (1000.0, np.eye(3), np.zeros(3))
  true_errors = now.scan_to_mesh(scan, mesh, true)[0]
  start = (1030.0, Rotation.from_euler("xyz", [3, -2, 4], degrees=True).as_matrix(),
           np.array([2.0, -1.5, 1.0]))
  start_errors = now.scan_to_mesh(scan, mesh, start)[0]
  (s, r, t), errors = now.refine_alignment(scan, mesh, start)
  assert np.mean(start_errors) > 5 * np.mean(true_errors)
  np.testing.assert_allclose(np.mean(errors), np.mean(true_errors), rtol=1e-2)
  assert np.sum(errors ** 2) <= np.sum(true_errors ** 2) * (1 + 1e-6)
  np.testing.assert_allclose(s, 1000, rtol=2e-3)
  np.testing.assert_allclose(t, 0, atol=0.2)
  # The metrical variant keeps unit scale (here 1000: metres -> millimetres).
  (s, r, t), errors = now.refine_alignment(scan, mesh, (1000.0, start[1], start[2]),
                                           with_scale=False)
  assert s == 1000.0
  np.testing.assert_allclose(np.mean(errors), np.mean(true_errors), rtol=1e-2)


def cube(half):
  v = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)])
  faces = []
  for axis in range(3):
    for sign in (0, 1):
      ids = [i for i in range(8) if (v[i, axis] > 0) == sign]
      a, b, c, d = ids                       # a square: (a, b, d, c) in order
      faces += [(a, b, d), (a, d, c)]
  return v.astype(float), np.array(faces)


def test_metrical_scale_error_gives_the_analytic_error():
  # Prediction: a cube of half-size 50 mm written in metres; scan: the faces of a cube
  # 10% larger (55 mm). With unit scale the error of every scan point facing a
  # face's interior is exactly 5 mm; the free-scale protocol removes it.
  v, f = cube(0.05)
  g = np.linspace(-0.8, 0.8, 9) * 50
  grid = np.array([[a, b] for a in g for b in g])
  scan = np.concatenate([np.insert(grid, axis, sign * 55, 1)
                         for axis in range(3) for sign in (-1, 1)])
  mesh = MeshDistance(v, f)
  (s, _, _), errors = now.refine_alignment(scan, mesh, (1000.0, np.eye(3), np.zeros(3)),
                                           with_scale=False)
  assert s == 1000.0
  np.testing.assert_allclose(errors, 5.0, atol=1e-6)
  (s, _, _), errors = now.refine_alignment(scan, mesh, (1000.0, np.eye(3), np.zeros(3)))
  np.testing.assert_allclose(s, 1100.0, rtol=1e-6)
  np.testing.assert_allclose(errors, 0.0, atol=1e-5)


def test_summaries_and_curve():
  stats = now.summarize({"selfie": [np.array([1.0, 2.0]), np.array([3.0])],
                         "multiview_neutral": []})
  assert stats["selfie"] == {"median": 2.0, "mean": 2.0, "std": pytest.approx(np.sqrt(2 / 3)),
                             "images": 2, "points": 3}
  assert np.isnan(stats["multiview_neutral"]["mean"])
  assert stats["overall"]["points"] == 3
  x, pct = now.cumulative_curve(np.array([0.5, 1.0, 9.0, 2.0]))
  assert x[0] == 0 and x[-1] == 8.0
  np.testing.assert_allclose(pct[[0, 50, 100, 200, 800]], [0, 25, 50, 75, 75])


def test_items_report_missing_files(tmp_path):
  root, pred = tmp_path / "now", tmp_path / "pred"
  (root / "scans" / "S1").mkdir(parents=True)
  (root / "scans" / "S1" / "scan.obj").write_text("v 0 0 0\n")
  now.write_pp(root / "scans_lmks_onlypp" / "S1" / "scan.pp", np.zeros((7, 3)))
  (pred / "S1" / "selfie").mkdir(parents=True)
  (pred / "S1" / "selfie" / "IMG_1.obj").write_text("v 0 0 0\n")
  np.save(pred / "S1" / "selfie" / "IMG_1.npy", np.zeros((7, 3)))
  lines = ["S1/selfie/IMG_1.jpg", "S1/selfie/IMG_2.jpg", "S2/multiview_neutral/IMG_3.jpg"]
  items = now.now_items(root, pred, lines)
  reasons = [now.missing_reason(i) for i in items]
  assert reasons == ["", "missing predicted mesh", "missing scan"]
  assert now.missing_reason(items[0], np.zeros((10, 3)), 5023).startswith(
      "predicted mesh has 10 vertices")
  assert len(now.now_items(root, pred, lines, challenge="selfie")) == 2
