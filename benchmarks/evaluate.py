"""Scan-to-mesh speed: kaojax.evaluate.distances (exact, float64, JAX + KD-tree
prefilter) against Open3D's RaycastingScene and trimesh (when installed), in the same
run, on a NoW-sized problem: ~100k scan-like points (1 mm noise, 10% of them ~3 cm
away: the slow case of the prefilter) against the synthetic FLAME head, and the same
count all near the surface; then one whole NoW image (crop, Procrustes, refinement,
final distances).

    python benchmarks/evaluate.py [--quick]

The last line is a JSON object with the headline figures.
"""

import argparse
import json
import time

import numpy as np

from timing import best_time


def scan_like_points(rng, vertices, faces, n, far_fraction=0.1):
  """Surface samples with 1 mm noise and a fraction of points ~3 cm away, metres."""
  tri = vertices[faces]
  f = rng.integers(0, len(faces), n)
  bary = rng.dirichlet([1, 1, 1], n)
  pts = np.einsum("pk,pkc->pc", bary, tri[f])
  noise = rng.normal(scale=0.001, size=(n, 3))
  far = rng.uniform(size=n) < far_fraction
  noise[far] *= 30
  return pts + noise


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="fewer points and repeats")
  parser.add_argument("--points", type=int, default=100_000)
  args = parser.parse_args()
  repeats = 1 if args.quick else 3
  n = 20_000 if args.quick else args.points

  from kaojax.evaluate import distances, now
  from kaojax.flame.synthetic import make_synthetic_flame
  flame = make_synthetic_flame()
  v, f = np.asarray(flame.v_template, np.float64), np.asarray(flame.faces)
  rng = np.random.default_rng(0)
  pts = scan_like_points(rng, v, f, n)
  print(f"mesh: {len(v)} vertices, {len(f)} faces; {n} query points")

  ours = distances.point_to_mesh(pts, v, f)
  t_ours = best_time(lambda: distances.point_to_mesh(pts, v, f), repeats)
  mesh = distances.MeshDistance(v, f)
  t_query = best_time(lambda: mesh.query(pts), repeats)
  results = {"points": n, "vertices": len(v), "faces": len(f),
             "kaojax_points_per_s": n / t_ours, "kaojax_query_points_per_s": n / t_query}
  print(f"kaojax (build + query): {t_ours:.3f} s  {n / t_ours:,.0f} points/s; "
        f"query only {n / t_query:,.0f} points/s")
  near = scan_like_points(rng, v, f, n, far_fraction=0.0)
  mesh.query(near)
  t_near = best_time(lambda: mesh.query(near), repeats)
  results["kaojax_near_query_points_per_s"] = n / t_near
  print(f"kaojax, all points within ~1 mm of the surface (aligned NoW-like): "
        f"{n / t_near:,.0f} points/s")

  try:
    import open3d as o3d
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(v.astype(np.float32)), o3d.core.Tensor(f.astype(np.uint32)))
    query = o3d.core.Tensor(pts.astype(np.float32))
    reference = scene.compute_distance(query).numpy()

    def run_open3d():
      s = o3d.t.geometry.RaycastingScene()
      s.add_triangles(o3d.core.Tensor(v.astype(np.float32)), o3d.core.Tensor(f.astype(np.uint32)))
      s.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()
    t_o3d = best_time(run_open3d, repeats)
    results.update({"open3d_points_per_s": n / t_o3d, "kaojax_over_open3d_time": t_ours / t_o3d,
                    "max_abs_diff_open3d": float(np.abs(reference - ours).max())})
    print(f"open3d (float32, build + query): {t_o3d:.3f} s  {n / t_o3d:,.0f} points/s; "
          f"ours / open3d time x{t_ours / t_o3d:.2f}; max |diff| {results['max_abs_diff_open3d']:.2e} m")
  except ImportError:
    print("open3d not installed")
  try:
    import trimesh
    tm = trimesh.Trimesh(v, f, process=False)
    _, reference, _ = trimesh.proximity.closest_point(tm, pts)
    t_tm = best_time(lambda: trimesh.proximity.closest_point(trimesh.Trimesh(v, f, process=False), pts), 1)
    results.update({"trimesh_points_per_s": n / t_tm, "kaojax_over_trimesh_time": t_ours / t_tm,
                    "max_abs_diff_trimesh": float(np.abs(reference - ours).max())})
    print(f"trimesh: {t_tm:.3f} s  {n / t_tm:,.0f} points/s; max |diff| "
          f"{results['max_abs_diff_trimesh']:.2e}")
  except ImportError:
    print("trimesh not installed")

  # One NoW image: a scan (the head in mm, subdivided twice, 0.2 mm noise), the
  # prediction in metres under a perturbed similarity.
  from kaojax.evaluate.synthetic_now import subdivide
  out = flame(np.zeros(flame.n_shape, np.float32), np.zeros(flame.n_expr, np.float32),
              np.zeros(6, np.float32))
  lm = np.asarray(out.landmarks3d, np.float64)[list(now.IBUG_INDICES)]
  sv, sf = subdivide(*subdivide(v * 1000, f))
  scan = sv + rng.normal(scale=0.2, size=sv.shape)
  crop = now.crop_scan(scan, lm * 1000)
  pred = (v * 1.1 + 0.02) @ np.array([[1, 0, 0], [0, 0.998, -0.05], [0, 0.05, 0.998]])
  pred_lm = (lm * 1.1 + 0.02) @ np.array([[1, 0, 0], [0, 0.998, -0.05], [0, 0.05, 0.998]])
  start = time.perf_counter()
  score = now.score_prediction(scan, lm * 1000, pred, f, pred_lm)
  t_image = time.perf_counter() - start
  results.update({"now_image_seconds": t_image, "now_image_scan_vertices": len(scan),
                  "now_image_crop_points": len(crop), "now_image_mean_mm": float(score.errors.mean())})
  print(f"one NoW image: {len(scan)} scan vertices, {len(crop)} in the crop: {t_image:.2f} s "
        f"(mean error {score.errors.mean():.3f} mm); 1,700 images: "
        f"~{1700 * t_image / 60:.0f} min on this machine")
  print(json.dumps({k: (float(f"{x:.4g}") if isinstance(x, float) else x)
                    for k, x in results.items()}))


if __name__ == "__main__":
  main()
