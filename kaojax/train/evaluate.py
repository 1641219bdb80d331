"""Periodic evaluation on held-out subjects during training.

Metrics (keys as written to metrics.jsonl, all prefixed `eval/`):
  landmark_error_px   mean 2D distance (render pixels) between the projected
                      predicted 68 landmarks and the ground truth, over valid views
                      and every source-view set
  psnr                PSNR of the surfel re-render of the source view (white
                      background) against the source image, over every
                      source-view set
  vertex_error        mean vertex distance to the ground-truth mesh after a
                      similarity (Umeyama) alignment, in the dataset's units
                      (synthetic data: the head normalised into [-1, 1]^3); only
                      when the dataset has ground truth (gt/params.npz)
  rotation_error_deg  angle between the predicted FLAME global (head) rotation and the
                      ground truth's, both in the normalised world of the source
                      camera, over every source-view set; only with ground truth
  var_shape, var_expression, var_shape_10, var_expression_10
                      cross-view variance (1/N) sum_i ||beta_i - mean||^2 of the
                      parameters predicted from N different source views of a
                      subject (all dimensions, and the first 10)
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import layout, sources
from data_pipeline.batch import make_batch
from kaojax import geometry
from kaojax.models.kaolrm import DEFAULT_TILING, RenderTiling, project_landmarks


@dataclasses.dataclass
class EvalSet:
  """Held-out samples, fixed for the whole run.

  batches: list of Batches (white background), one per source view set;
  gt_vertices: [S, V, 3] or None;
  gt_rotations: [N, S, 3, 3] or None, the head rotation of each subject in the
    normalised world of each of the N source-view sets;
  num_skipped: held-out subjects left out because a file of theirs is unreadable.
  """
  batches: list
  gt_vertices: np.ndarray = None
  gt_rotations: np.ndarray = None
  num_skipped: int = 0


def load_eval_set(root, split: str, cfg: sources.PipelineConfig, max_subjects: int,
                  num_source_views: int, seed: int = 0) -> EvalSet:
  """Up to `max_subjects` subjects of `split`; `num_source_views` samples per subject,
  each from a different random view set (for the cross-view variance). A subject with
  an unreadable file is logged with the file's path and left out, as in training."""
  cfg = dataclasses.replace(cfg, random_background=False)
  root = pathlib.Path(root)
  reader = sources.MultiviewReader()
  per_subject, skipped = [], 0
  for i, uid in enumerate(layout.read_split(root, split)[:max_subjects]):
    try:
      per_subject.append((uid, [
          sources.load_multiview(root / uid, np.random.default_rng((seed, i, j)), cfg, reader)
          for j in range(num_source_views)]))
    except layout.DatasetError as err:
      logging.warning("skipping unreadable held-out subject: %s", err)
      skipped += 1
  if not per_subject:
    raise layout.DatasetError(f"no readable held-out subject in {root} ({split} split, "
                              f"{skipped} skipped)")
  uids = [uid for uid, _ in per_subject]
  batches = [make_batch([samples[j] for _, samples in per_subject])
             for j in range(num_source_views)]
  gt_files = [root / uid / "gt" / "params.npz" for uid in uids]
  if not all(f.is_file() for f in gt_files):
    return EvalSet(batches=batches, num_skipped=skipped)
  gt = [np.load(f) for f in gt_files]
  head = np.asarray(geometry.axis_angle_to_matrix(
      np.stack([g["pose"][:3] for g in gt]).astype(np.float32)))
  rotations = np.stack([b.world_to_canonical[:, :3, :3] @ head for b in batches])
  return EvalSet(batches=batches,
                 gt_vertices=np.stack([g["vertices"] for g in gt]).astype(np.float32),
                 gt_rotations=rotations.astype(np.float32), num_skipped=skipped)


def rotation_angle_deg(a, b):
  """a, b [..., 3, 3] rotations -> [...] the angle of the rotation between them."""
  cos = (np.trace(np.swapaxes(a, -1, -2) @ b, axis1=-2, axis2=-1) - 1) / 2
  return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def psnr(a, b):
  mse = jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def make_eval_step(graphdef, synth_focal: float, tiling: RenderTiling = DEFAULT_TILING):
  """jit-able (params, rest, batch, key) -> dict of per-subject predictions/metrics."""

  def eval_step(params, rest, batch, key):
    model = nnx.merge(graphdef, params, rest)
    out, renders = model.forward_and_render(
        batch.source, batch.source_camera, batch.viewmats, batch.Ks, batch.render_size, key,
        synth_focal=synth_focal, background=batch.background, tiling=tiling)
    pred = project_landmarks(out.landmarks, batch.viewmats, batch.Ks)
    target = batch.landmarks
    valid = jnp.all(target > 0, axis=(-2, -1))
    dist = jnp.linalg.norm(pred - target, axis=-1).mean(-1)           # [B, V]
    lmk_err = jnp.sum(dist * valid, -1) / jnp.maximum(jnp.sum(valid, -1), 1)
    color = renders["surfels"]["color"]
    return {
        "landmark_error_px": lmk_err,
        "psnr": psnr(color[:, 0], batch.target_rgb[:, 0]),
        "shape": out.flame.shape, "expression": out.flame.expression,
        "head_rotation": geometry.axis_angle_to_matrix(out.flame.pose[:, :3]),
        "vertices": out.vertices, "landmarks_px": pred,
        "render": color, "mesh_normal": renders["mesh"]["normal"],
        "mesh_mask": renders["mesh"]["mask"],
    }

  return eval_step


def cross_view_variance(values):
  """values [N, S, D] (N source views of S subjects) -> mean over subjects of
  (1/N) sum_i ||v_i - mean_i v||^2."""
  mean = values.mean(0, keepdims=True)
  return float(np.mean(np.sum(np.square(values - mean), -1).mean(0)))


def evaluate(eval_step, params, rest, eval_set: EvalSet, key):
  """-> (metrics dict with `eval/` keys, outputs of the first source-view batch)."""
  outs = [jax.device_get(eval_step(params, rest, batch, key)) for batch in eval_set.batches]
  first = outs[0]
  metrics = {
      "eval/landmark_error_px": float(np.mean([o["landmark_error_px"] for o in outs])),
      "eval/psnr": float(np.mean([o["psnr"] for o in outs])),
      "eval/skipped_subjects": eval_set.num_skipped,
  }
  if len(outs) > 1:
    shapes = np.stack([o["shape"] for o in outs])
    exprs = np.stack([o["expression"] for o in outs])
    metrics.update({
        "eval/var_shape": cross_view_variance(shapes),
        "eval/var_shape_10": cross_view_variance(shapes[..., :10]),
        "eval/var_expression": cross_view_variance(exprs),
        "eval/var_expression_10": cross_view_variance(exprs[..., :10]),
    })
  if eval_set.gt_vertices is not None:
    pred = jnp.asarray(first["vertices"])
    gt = jnp.asarray(eval_set.gt_vertices)
    scale, rotation, translation = geometry.umeyama(pred, gt)
    aligned = geometry.apply_similarity(pred, scale, rotation, translation)
    metrics["eval/vertex_error"] = float(jnp.mean(jnp.linalg.norm(aligned - gt, axis=-1)))
  if eval_set.gt_rotations is not None:
    pred = np.stack([o["head_rotation"] for o in outs])
    metrics["eval/rotation_error_deg"] = float(np.mean(
        rotation_angle_deg(pred, eval_set.gt_rotations)))
  return metrics, first
