"""Multi-view accuracy and consistency metrics of FLAME predictions (KaoLRM Tables 1, 3).

Accuracy, per predicted view (`score_view`):
  1. the prediction is brought onto the ground truth by the similarity (Umeyama,
     with scale, proper rotation) that best maps its 68 3D keypoints onto the ground
     truth's (`align_on_keypoints`);
  2. both meshes are cut to the facial region (`facial_submesh`: the faces that the
     FLAME face mask keeps, and their vertices);
  3. the Chamfer distance between the two regions (`chamfer`): the mean over each
     region's vertices of the exact distance to the other region's surface
     (`kaojax.evaluate.distances.MeshDistance`: point to triangle, not to vertices),
     averaged over the two directions. Unit: the ground truth's (the synthetic set is
     normalised into [-1, 1]^3, as the paper's renders); tables print it x 1e-2.
The paper states neither the direction(s) nor squared vs unsigned distances; this
choice (symmetric, unsigned) is a documented deviation risk.

Consistency, per subject over its N views (`parameter_variance`, the paper's eq. 5):
  Var(x) = 1/N sum_i ||x_i - mean(x)||^2 over the first `dims` coefficients (10) or
  all of them; reported as the mean over subjects. `vertex_variance` is the same per
  vertex of the keypoint-aligned meshes (the paper's Fig. 4 heat maps).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kaojax import geometry
from kaojax.evaluate.distances import MeshDistance


def align_on_keypoints(src_keypoints, dst_keypoints):
  """Similarity (scale, rotation [3, 3], translation [3]), float64, minimising
  sum ||dst - (s R src + t)||^2 over corresponding keypoints [K, 3] (Umeyama)."""
  with jax.enable_x64(True):
    s, r, t = geometry.umeyama(jnp.asarray(src_keypoints, jnp.float64),
                               jnp.asarray(dst_keypoints, jnp.float64))
    return float(s), np.asarray(r, np.float64), np.asarray(t, np.float64)


def apply_transform(transform, points):
  """(s, R, t) applied to points [N, 3] -> [N, 3] float64."""
  s, r, t = transform
  return s * np.asarray(points, np.float64) @ r.T + t


def facial_submesh(vertices, faces, face_mask):
  """vertices [V, 3], faces [F, 3], face_mask [F] bool -> (vertices [V', 3] of the kept
  faces, faces [F', 3] re-indexed into them, their original ids [V'])."""
  kept = np.asarray(faces, np.int64)[np.asarray(face_mask, bool)]
  ids = np.unique(kept)
  remap = np.full(len(vertices), -1, np.int64)
  remap[ids] = np.arange(len(ids))
  return np.asarray(vertices, np.float64)[ids], remap[kept], ids


def chamfer(vertices_a, faces_a, vertices_b, faces_b) -> dict:
  """Symmetric Chamfer distance between two meshes: {"a_to_b": mean distance of a's
  vertices to b's surface, "b_to_a": the converse, "chamfer": their mean}."""
  a_to_b = MeshDistance(vertices_b, faces_b).query(vertices_a)[0]
  b_to_a = MeshDistance(vertices_a, faces_a).query(vertices_b)[0]
  out = {"a_to_b": float(np.mean(a_to_b)), "b_to_a": float(np.mean(b_to_a))}
  out["chamfer"] = 0.5 * (out["a_to_b"] + out["b_to_a"])
  return out


@dataclasses.dataclass
class ViewScore:
  chamfer: float            # symmetric, ground-truth units
  pred_to_gt: float
  gt_to_pred: float
  scale: float              # of the keypoint alignment
  aligned: np.ndarray       # the prediction's vertices [V, 3] in the ground truth's frame


def score_view(pred_vertices, pred_keypoints, gt_vertices, gt_keypoints, faces,
               face_mask) -> ViewScore:
  """One prediction against its ground truth (same topology `faces` [F, 3]; keypoints
  [K, 3] in each mesh's frame) over the facial region `face_mask` [F]."""
  pred_vertices = np.asarray(pred_vertices, np.float64)
  gt_vertices = np.asarray(gt_vertices, np.float64)
  if pred_vertices.shape != gt_vertices.shape:
    raise ValueError(f"prediction has {len(pred_vertices)} vertices, the ground truth "
                     f"{len(gt_vertices)}")
  transform = align_on_keypoints(pred_keypoints, gt_keypoints)
  aligned = apply_transform(transform, pred_vertices)
  pred_v, pred_f, _ = facial_submesh(aligned, faces, face_mask)
  gt_v, gt_f, _ = facial_submesh(gt_vertices, faces, face_mask)
  c = chamfer(pred_v, pred_f, gt_v, gt_f)
  return ViewScore(c["chamfer"], c["a_to_b"], c["b_to_a"], transform[0], aligned)


def parameter_variance(values, dims: int = 0) -> float:
  """values [N, D] (one subject's N views) -> 1/N sum_i ||x_i - mean||^2 over the
  first `dims` coefficients (0: all)."""
  x = np.asarray(values, np.float64)
  x = x[:, :dims] if dims else x
  return float(np.mean(np.sum((x - x.mean(0)) ** 2, -1)))


def vertex_variance(vertices):
  """vertices [N, V, 3] (one subject's aligned predictions) -> per-vertex variance
  [V] = 1/N sum_i ||v_i - mean||^2, and the mean mesh [V, 3]."""
  v = np.asarray(vertices, np.float64)
  mean = v.mean(0)
  return np.mean(np.sum((v - mean) ** 2, -1), 0), mean


def summarize(values) -> dict:
  """values [M] -> {mean, median, std, count} (NaN statistics when empty)."""
  x = np.asarray(values, np.float64)
  stat = (lambda f: float(f(x))) if len(x) else (lambda f: float("nan"))
  return {"mean": stat(np.mean), "median": stat(np.median), "std": stat(np.std),
          "count": int(len(x))}
