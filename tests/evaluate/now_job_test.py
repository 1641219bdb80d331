"""The eval_now job: a synthetic NoW-style benchmark scored end to end."""

import importlib.util
import json
import pathlib

import numpy as np

from kaojax import jobs
from kaojax.evaluate import now
from kaojax.evaluate.neutral import NeutralCheck
from kaojax.export.obj import write_obj
from kaojax.flame.synthetic import make_synthetic_flame

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location("eval_now", ROOT / "configs" / "eval_now.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.synthetic.num_subjects = 1
  config.synthetic.image_size = 64
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_scores_given_predictions_and_reports_problems(tmp_path):
  from kaojax.evaluate.synthetic_now import write_synthetic_now
  root = tmp_path / "now"
  description = write_synthetic_now(root, num_subjects=1, images_per_challenge=2,
                                    image_size=32)
  flame = make_synthetic_flame()
  subject = description["subjects"][0]
  shape = np.array(subject["shape"], np.float32)
  zeros_e, zeros_p = np.zeros(flame.n_expr, np.float32), np.zeros(6, np.float32)
  lines = now.image_list(root)
  pred = tmp_path / "pred"

  def write(line, expression=zeros_e, pose=zeros_p, drop_vertices=False):
    out = flame(shape, expression, pose)
    v = np.asarray(out.vertices, np.float64) * 0.9 + 0.1    # any similarity is fine
    lm = np.asarray(out.landmarks3d, np.float64)[list(now.IBUG_INDICES)] * 0.9 + 0.1
    subject_name, challenge, filename = line.split("/")
    stem = filename[:-4]
    faces = np.asarray(flame.faces)
    if drop_vertices:
      v, faces = v[:-10], faces[np.all(faces < len(v) - 10, 1)]
    write_obj(pred / subject_name / challenge / f"{stem}.obj", v, faces)
    np.save(pred / subject_name / challenge / f"{stem}.npy", lm)

  by_challenge = {line.split("/")[1]: line for line in lines[::-1]}   # first of each
  write(by_challenge["multiview_neutral"])
  bad_landmarks = lines[1]                                  # second neutral image
  write(bad_landmarks)
  np.save(pred / (bad_landmarks[:-4] + ".npy"), np.zeros((5, 3)))
  rng = np.random.default_rng(0)
  write(by_challenge["multiview_expressions"],
        expression=rng.normal(size=flame.n_expr).astype(np.float32),
        pose=np.array([0, 0, 0, 0.2, 0, 0], np.float32))
  write(by_challenge["selfie"], drop_vertices=True)
  # multiview_occlusions: no prediction at all.

  config = tiny_config(now_root=str(root), predictions=str(pred))
  results = jobs.run(config, tmp_path / "out")
  saved = json.loads((tmp_path / "out" / "now_results.json").read_text())
  assert saved["overall"] == results["overall"]
  # The ground-truth shape scores the scan's noise (0.1 mm, holes do not matter).
  neutral = saved["multiview_neutral"]
  assert neutral["images"] == 1 and neutral["mean"] < 0.15
  reasons = {s["image"]: s["reason"].split(",")[0] for s in saved["skipped"]}
  # lines: neutral x2, expressions x2, occlusions x2, selfie x2.
  assert reasons == {
      lines[1]: reasons[lines[1]], lines[3]: "missing predicted mesh",
      lines[4]: "missing predicted mesh", lines[5]: "missing predicted mesh",
      lines[6]: f"predicted mesh has {flame.num_vertices - 10} vertices",
      lines[7]: "missing predicted mesh"}
  full = {s["image"]: s["reason"] for s in saved["skipped"]}
  assert full[lines[1]].startswith("error: ValueError") and "[7, 3]" in full[lines[1]]
  assert [n["image"] for n in saved["not_neutral"]] == [by_challenge["multiview_expressions"]]
  assert saved["multiview_expressions"]["mean"] > neutral["mean"]
  assert saved["overall"]["images"] == 2
  for name in ("now_results.md", "now_curve.png", "now_curve.json", "now_errors.npz"):
    assert (tmp_path / "out" / name).is_file()
  assert "| overall |" in (tmp_path / "out" / "now_results.md").read_text()


def test_neutral_check_flags_expression_and_jaw():
  flame = make_synthetic_flame()
  check = NeutralCheck(flame)
  rng = np.random.default_rng(1)
  shape = rng.normal(size=flame.n_shape).astype(np.float32)
  zeros_e = np.zeros(flame.n_expr, np.float32)
  posed = lambda e, p: np.asarray(flame(shape, e, np.array(p, np.float32)).vertices) * 1.2
  assert not check(posed(zeros_e, [0, 0.3, 0, 0, 0, 0]))["flagged"]
  assert check(posed(rng.normal(size=flame.n_expr).astype(np.float32), [0] * 6))["flagged"]
  assert check(posed(zeros_e, [0, 0, 0, 0.2, 0, 0]))["flagged"]


def test_tiny_end_to_end_with_inference(tmp_path):
  results = jobs.run(tiny_config(), tmp_path)
  saved = json.loads((tmp_path / "now_results.json").read_text())
  for name in now.CHALLENGES + ("overall",):
    assert set(("median", "mean", "std")) <= set(saved[name])
    assert np.isfinite(saved[name]["mean"])
  assert saved["overall"]["images"] == 4 and not saved["skipped"]
  assert results["overall"]["points"] > 1000
