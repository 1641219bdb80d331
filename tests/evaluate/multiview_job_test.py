"""The eval_multiview job: a synthetic multi-view test split scored end to end."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from data_pipeline import layout
from data_pipeline.synthetic import generate
from kaojax import jobs
from kaojax.evaluate.multiview_job import unit_box
from kaojax.evaluate.now import read_mesh
from kaojax.export.obj import write_obj

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location("eval_multiview",
                                                ROOT / "configs" / "eval_multiview.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_scores_given_predictions_and_reports_problems(tmp_path):
  data = tmp_path / "data"
  uids = generate(data, num_subjects=2, num_views=4, image_size=32, val_fraction=1.0,
                  progress=False)
  pred = tmp_path / "pred"
  delta = np.zeros(100, np.float32)
  delta[0], delta[20] = 0.3, 0.4                  # ||d||^2 = 0.25, first 10: 0.09
  for uid in uids:
    with np.load(data / uid / "gt" / "params.npz") as gt:
      gt = dict(gt)
    faces = read_mesh(data / uid / "gt" / "mesh.obj")[1]
    for v in range(4):
      folder = pred / uid / layout.view_name(v)
      if uid == uids[0] and v == 3:
        continue                                   # missing prediction
      folder.mkdir(parents=True)
      move = lambda x: 0.5 * x + [0.1, 0.2, 0.3]   # any similarity is aligned away
      shape = gt["shape"] + (delta if uid == uids[0] and v == 1 else 0)
      np.savez(folder / "params.npz", shape=shape, expression=gt["expression"],
               landmarks3d=move(gt["landmarks3d"]))
      vertices, f = move(gt["vertices"]), faces
      if uid == uids[1] and v == 0:                # wrong vertex count
        vertices, f = vertices[:-10], faces[np.all(faces < len(vertices) - 10, 1)]
      write_obj(folder / "mesh.obj", vertices, f)
  config = tiny_config(data_root=str(data), split="val", predictions=str(pred))
  results = jobs.run(config, tmp_path / "out")
  saved = json.loads((tmp_path / "out" / "multiview_results.json").read_text())
  assert saved["chamfer"] == results["chamfer"]
  assert saved["chamfer"]["count"] == 6 and saved["chamfer"]["mean"] < 1e-6
  reasons = {s["view"]: s["reason"] for s in saved["skipped"]}
  assert set(reasons) == {f"{uids[0]}/003", f"{uids[1]}/000"}
  assert reasons[f"{uids[0]}/003"].startswith("missing prediction")
  assert "vertices" in reasons[f"{uids[1]}/000"]
  # Subject 0: 3 views, one off by d -> ||d||^2 (N - 1) / N^2; subject 1: 0.
  var = saved["variance"]
  assert var["shape_full"] == pytest.approx(0.25 * 2 / 9 / 2, rel=1e-5)
  assert var["shape_10"] == pytest.approx(0.09 * 2 / 9 / 2, rel=1e-5)
  assert var["expression_full"] == pytest.approx(0.0, abs=1e-12)
  for name in ("multiview_results.md", "multiview_variance.npz",
               f"variance/{uids[0]}.png", f"variance/{uids[1]}.png"):
    assert (tmp_path / "out" / name).is_file()
  table = (tmp_path / "out" / "multiview_results.md").read_text()
  assert "| kaojax (this run) |" in table and "| KaoLRM (paper) | 2.68 |" in table


def test_unit_box_is_the_papers_normalisation():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(50, 3)) * [1, 2, 0.5]
  boxed, keypoints = unit_box(7 * v + 3, 7 * v[:5] + 3)
  assert np.abs(boxed).max() == pytest.approx(1.0)
  np.testing.assert_allclose(boxed.max(0), -boxed.min(0), atol=1e-12)
  np.testing.assert_allclose(boxed, unit_box(v)[0], atol=1e-12)
  np.testing.assert_allclose(keypoints, boxed[:5], atol=1e-12)


def test_tiny_end_to_end_with_inference(tmp_path):
  config = tiny_config(max_subjects=1)
  config.synthetic.num_views = 2
  config.synthetic.image_size = 32
  results = jobs.run(config, tmp_path)
  saved = json.loads((tmp_path / "multiview_results.json").read_text())
  assert saved["chamfer"]["count"] == 2 and not saved["skipped"]
  assert np.isfinite(saved["chamfer"]["mean"]) and saved["chamfer"]["mean"] > 0
  assert set(saved["variance"]) == {"shape_10", "shape_full", "expression_10",
                                    "expression_full"}
  assert results["subjects_scored"] == 1
