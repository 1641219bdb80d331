"""Held-out evaluation: its ground truth and its metrics."""

import jax.numpy as jnp
import numpy as np
from scipy.spatial.transform import Rotation

from data_pipeline import layout, sources, synthetic
from kaojax import geometry
from kaojax.train import evaluate


def test_ground_truth_is_in_the_normalised_world_of_the_source_camera(tmp_path):
  synthetic.generate(tmp_path, num_subjects=3, num_views=5, image_size=32, seed=3,
                     val_fraction=0.0, progress=False)
  pipe = sources.PipelineConfig(num_views=2, source_size=16, render_size=32)
  eval_set = evaluate.load_eval_set(tmp_path, "train", pipe, max_subjects=3,
                                    num_source_views=2)
  flame, _ = synthetic.load_generator_flame("", seed=3)
  uids = layout.read_split(tmp_path, "train")
  gt = [np.load(tmp_path / uid / "gt" / "params.npz") for uid in uids]
  assert eval_set.gt_rotations.shape == (2, len(uids), 3, 3) and len(uids) >= 2
  for j, batch in enumerate(eval_set.batches):
    for i, g in enumerate(gt):
      to_canonical = batch.world_to_canonical[i]
      # The ground-truth landmarks moved by world_to_canonical project, through the
      # normalised source camera, onto the source view's stored 2D landmarks.
      moved = g["landmarks3d"] @ to_canonical[:3, :3].T + to_canonical[:3, 3]
      pixels, _ = geometry.project_points(jnp.asarray(moved), batch.viewmats[i, 0],
                                          batch.Ks[i, 0])
      np.testing.assert_allclose(pixels, batch.landmarks[i, 0], atol=2e-3)
      # FLAME posed with the ground-truth rotation of that world is the moved
      # ground-truth mesh up to a scale and a translation: no rotation is left.
      pose = np.concatenate([Rotation.from_matrix(eval_set.gt_rotations[j, i]).as_rotvec(),
                             g["pose"][3:]]).astype(np.float32)
      posed = flame(g["shape"][None], g["expression"][None], pose[None]).vertices[0]
      target = g["vertices"] @ to_canonical[:3, :3].T + to_canonical[:3, 3]
      scale, rotation, translation = geometry.umeyama(posed, jnp.asarray(target))
      assert evaluate.rotation_angle_deg(np.asarray(rotation), np.eye(3)) < 0.05
      aligned = geometry.apply_similarity(posed, scale, rotation, translation)
      np.testing.assert_allclose(aligned, target, atol=1e-4)
      # The source camera moved the world: the dataset's own rotation is not it.
      assert evaluate.rotation_angle_deg(
          eval_set.gt_rotations[j, i],
          Rotation.from_rotvec(g["pose"][:3]).as_matrix()) > 5.0


def test_rotation_angle_matches_scipy():
  a = Rotation.random(50, random_state=0).as_matrix()
  b = Rotation.random(50, random_state=1).as_matrix()
  expected = np.degrees((Rotation.from_matrix(a).inv() * Rotation.from_matrix(b))
                        .magnitude())
  np.testing.assert_allclose(evaluate.rotation_angle_deg(a, b), expected, atol=1e-4)


def test_metrics_from_known_predictions():
  rng = np.random.default_rng(0)
  num_sets, subjects = 2, 3
  gt_vertices = rng.normal(size=(subjects, 40, 3)).astype(np.float32)
  gt_rotations = Rotation.random(num_sets * subjects, random_state=2).as_matrix()
  gt_rotations = gt_rotations.reshape(num_sets, subjects, 3, 3)
  offsets = np.array([[5.0, 10.0, 20.0], [30.0, 0.0, 45.0]])  # degrees
  axes = rng.normal(size=(num_sets, subjects, 3))
  axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
  turns = Rotation.from_rotvec((axes * np.radians(offsets)[..., None]).reshape(-1, 3))
  pred_rotations = gt_rotations @ turns.as_matrix().reshape(num_sets, subjects, 3, 3)
  # Predicted meshes: a similarity transform of the truth (vertex error 0 after
  # alignment).
  similarity = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
  pred_vertices = 1.7 * gt_vertices @ similarity.T + np.array([0.1, -2.0, 0.5])
  shapes = rng.normal(size=(num_sets, subjects, 6))
  expressions = rng.normal(size=(num_sets, subjects, 4))
  landmark_errors = rng.uniform(size=(num_sets, subjects))
  psnrs = rng.uniform(10, 20, size=(num_sets, subjects))
  outputs = [{"landmark_error_px": landmark_errors[j], "psnr": psnrs[j],
              "shape": shapes[j], "expression": expressions[j],
              "head_rotation": pred_rotations[j], "vertices": pred_vertices}
             for j in range(num_sets)]
  eval_set = evaluate.EvalSet(batches=[{"set": j} for j in range(num_sets)],
                              gt_vertices=gt_vertices,
                              gt_rotations=gt_rotations.astype(np.float32))

  metrics, first = evaluate.evaluate(lambda p, r, batch, k: outputs[batch["set"]],
                                     None, None, eval_set, None)

  np.testing.assert_array_equal(first["psnr"], psnrs[0])
  np.testing.assert_allclose(metrics["eval/landmark_error_px"], landmark_errors.mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(metrics["eval/psnr"], psnrs.mean(), rtol=1e-12)
  np.testing.assert_allclose(metrics["eval/rotation_error_deg"], offsets.mean(), atol=1e-3)
  np.testing.assert_allclose(metrics["eval/vertex_error"], 0.0, atol=1e-5)

  def variance(values):  # mean over subjects of (1/N) sum_i ||v_i - mean||^2
    per_subject = []
    for s in range(subjects):
      mean = sum(values[j, s] for j in range(num_sets)) / num_sets
      per_subject.append(sum(np.sum((values[j, s] - mean) ** 2)
                             for j in range(num_sets)) / num_sets)
    return np.mean(per_subject)

  np.testing.assert_allclose(metrics["eval/var_shape"], variance(shapes), rtol=1e-12)
  np.testing.assert_allclose(metrics["eval/var_expression"], variance(expressions),
                             rtol=1e-12)
  # Only the ground truth's rotation in the source camera's world counts: a wrong
  # world (the identity for every set) changes the error.
  eval_set.gt_rotations = np.broadcast_to(np.eye(3, dtype=np.float32), gt_rotations.shape)
  metrics, _ = evaluate.evaluate(lambda p, r, batch, k: outputs[batch["set"]],
                                 None, None, eval_set, None)
  assert abs(metrics["eval/rotation_error_deg"] - offsets.mean()) > 1.0


def test_unreadable_subjects_are_skipped_named_and_counted(tiny_dataset, tmp_path, caplog):
  """A held-out subject with a missing pose file is skipped like a training subject,
  its path in the log; the run finishes and metrics.jsonl counts both kinds of skip."""
  import shutil
  from kaojax.train.loop import train_and_evaluate
  from kaojax.train.metrics import read_metrics
  from tests.train.tiny_run import tiny_config
  root = tmp_path / "data"
  shutil.copytree(tiny_dataset, root)
  held_out = layout.read_split(root, "val")
  train = layout.read_split(root, "train")
  for broken, split, uids in (("broken_val", "val", held_out), ("broken_train", "train", train)):
    shutil.copytree(root / uids[0], root / broken)
    (root / broken / "pose" / "002.npy").unlink()
    layout.write_split(root, split, [broken] + uids)
  config = tiny_config(root, total_steps=2, stage1_steps=1, eval_every=2)
  config.eval.max_subjects = 2
  config.data.num_views = 4            # every sample needs all 4 views, view 2 too
  train_and_evaluate(config, tmp_path / "run")
  assert f"{root / 'broken_val' / 'pose' / '002.npy'}" in caplog.text
  assert "lmks2d.npy describes 4 views" in caplog.text
  rows = read_metrics(tmp_path / "run")
  evals = [r for r in rows if "eval/psnr" in r]
  assert [r["eval/skipped_subjects"] for r in evals] == [1, 1]
  assert [r["skipped_subjects"] for r in rows if "loss" in r][-1] >= 1
