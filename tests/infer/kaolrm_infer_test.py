"""The KaoLRM inference job (configs/infer_kaolrm.py:tiny, kaojax.infer.kaolrm) on real
photos: random tiny weights with the synthetic FLAME, so the checks are about the
pipeline (statuses, files, shapes, reruns), not reconstruction quality."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import plyfile
import pytest
import skimage.data
from PIL import Image

try:
  import trimesh
except ImportError:   # not a dependency: the OBJ files are also parsed by read_obj
  trimesh = None

from configs import infer_kaolrm as infer_config
from kaojax import jobs
from kaojax.export.obj import read_obj
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.infer import crops
from kaojax.infer import kaolrm as infer
from tests.infer.photos import group_photo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARAM_SHAPES = {"shape": (100,), "expression": (50,), "pose": (6,), "scale": (1,),
                "translation": (3,), "box": (4,), "score": (), "landmarks5": (5, 2),
                "crop_transform": (2, 3), "landmarks3d": (68, 3), "landmarks2d": (68, 2),
                "lmk7": (7, 3)}


EXPECTED = {"astronaut.jpg": "ok", "group.png": "ok", "cat.jpg": "no_face",
            "truncated.jpg": "unreadable", "text.png": "unreadable",
            "nested/grey.png": "ok", "nested/rgba.png": "ok"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  (root / "nested").mkdir()
  ast = skimage.data.astronaut()
  Image.fromarray(ast).save(root / "astronaut.jpg", quality=92)
  Image.fromarray(group_photo()).save(root / "group.png")
  Image.fromarray(skimage.data.chelsea()).save(root / "cat.jpg")
  buf = io.BytesIO()
  Image.fromarray(ast).save(buf, "JPEG")
  (root / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 3])
  (root / "text.png").write_text("not a picture\n")
  Image.fromarray(ast).convert("L").save(root / "nested" / "grey.png")
  alpha = np.full(ast.shape[:2], 255, np.uint8)
  alpha[:, :60] = 0
  Image.fromarray(np.dstack([ast, alpha])).save(root / "nested" / "rgba.png")
  return root


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_cli(photos, tmp_path_factory):
  """The command line, once, over the whole folder (faces=largest)."""
  workdir = tmp_path_factory.mktemp("out")
  cmd = [sys.executable, "run.py", "--config=configs/infer_kaolrm.py:tiny",
         f"--config.input={photos}", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


def test_every_input_has_its_status(photos, run_cli):
  rows = _rows(run_cli)
  by_input = {os.path.relpath(r["input"], photos): r for r in rows}
  assert len(rows) == len(EXPECTED)
  assert {k: r["status"] for k, r in by_input.items()} == EXPECTED
  for r in rows:
    assert set(r) >= {"input", "status", "faces", "seconds"}
    if r["status"] == "ok":
      assert r["faces"] == 1 and r["outputs"] == [r["name"]]
      assert r["seconds"]["total"] > 0
    else:
      assert r["faces"] == 0 and r["message"]
  summary = json.loads((run_cli / "summary.json").read_text())
  assert summary["ok"] == 4 and summary["unreadable"] == 2 and summary["no_face"] == 1


def test_face_outputs(photos, run_cli):
  flame = make_synthetic_flame()
  for name in ("astronaut", "group", "grey", "rgba"):
    folder = run_cli / name
    assert sorted(p.name for p in folder.iterdir()) == [
        "lmk7.npy", "mesh.obj", "mesh_neutral.obj", "params.npz", "reference", "vis.png"]
    params = np.load(folder / "params.npz")
    for key, shape in PARAM_SHAPES.items():
      assert params[key].shape == shape, key
      assert np.all(np.isfinite(params[key])), key
    if trimesh is not None:
      assert len(trimesh.load(folder / "mesh.obj", process=False).vertices) == (
          flame.num_vertices)
    verts, faces = read_obj(folder / "mesh.obj")
    neutral, faces_n = read_obj(folder / "mesh_neutral.obj")
    assert verts.shape == neutral.shape == (flame.num_vertices, 3)
    np.testing.assert_array_equal(faces, np.asarray(flame.faces))
    np.testing.assert_array_equal(faces_n, faces)
    np.testing.assert_allclose(np.load(folder / "lmk7.npy"), params["lmk7"])
    # lmk7 = the neutral mesh's FLAME landmarks at NoW's iBUG indices.
    expected = flame(params["shape"][None], np.zeros((1, 50), np.float32),
                     np.zeros((1, 6), np.float32), scale=params["scale"][None])
    np.testing.assert_allclose(neutral, np.asarray(expected.vertices[0]), atol=1e-5)
    np.testing.assert_allclose(params["lmk7"], np.asarray(expected.landmarks3d[0])[
        list(infer.NOW_LANDMARKS)], atol=1e-5)
    vis = np.asarray(Image.open(folder / "vis.png"))
    assert vis.shape == (64, 3 * 64, 3)
    # The reference inference's files: mesh and landmarks scaled by synth_focal / 0.75
    # (here 0.75: unscaled), raw parameters.
    ref = folder / "reference"
    to_reference = float(params["synth_focal"]) / 0.75
    ply = plyfile.PlyData.read(str(ref / "mesh.ply"))
    ply_verts = np.stack([ply["vertex"][a] for a in "xyz"], -1)
    np.testing.assert_allclose(ply_verts, verts * to_reference, atol=1e-5)
    np.testing.assert_array_equal(np.stack(ply["face"]["vertex_indices"]), faces)
    for key in ("shape", "expression", "pose"):
      np.testing.assert_array_equal(np.load(ref / f"mesh_{key}.npy"), params[key])
    np.testing.assert_allclose(np.load(ref / "mesh_lmks.npy"),
                               params["landmarks3d"] * to_reference, atol=1e-6)
  # The box and landmarks are in photo pixels: the astronaut's face, and the crop
  # transform maps its landmarks inside the (square) crop.
  params = np.load(run_cli / "astronaut" / "params.npz")
  x0, y0, x1, y1 = params["box"]
  assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200
  inside = crops.apply_affine(params["crop_transform"], params["landmarks5"])
  assert (inside > 0).all() and (inside < int(params["crop_size"])).all()
  assert str(params["crop_kind"]) == "square"


def test_rerun_skips_finished_inputs(photos, run_cli):
  before = (run_cli / "results.jsonl").read_text()
  stamps = {p: p.stat().st_mtime_ns for p in run_cli.rglob("*") if p.is_file()
            and p.name != "summary.json"}
  config = infer_config.get_config("tiny")
  config.input = str(photos)
  summary = jobs.run(config, run_cli)
  assert summary["skipped"] == len(EXPECTED)
  assert (run_cli / "results.jsonl").read_text() == before
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_all_faces_gives_more_faces(photos, run_cli, tmp_path):
  """faces=all on the group photo (4 faces: two padded batches of 2), with a
  monocular model (so the FFHQ-aligned crop)."""
  config = infer_config.get_config("tiny")
  config.input = str(photos / "group.png")
  config.faces = "all"
  config.monocular = True
  config.visualize = False
  jobs.run(config, tmp_path)
  (row,) = _rows(tmp_path)
  largest = [r for r in _rows(run_cli) if r["name"] == "group"][0]
  assert row["status"] == "ok" and row["faces"] > largest["faces"] == 1
  assert row["faces"] == row["detected"]
  folders = sorted(p.name for p in (tmp_path / "group").iterdir())
  assert folders == [f"face_{k}" for k in range(row["faces"])]
  assert row["outputs"] == [f"group/{f}" for f in folders]
  params = [np.load(tmp_path / "group" / f / "params.npz") for f in folders]
  assert len({tuple(np.round(p["box"])) for p in params}) == len(params)
  assert np.all(np.diff([float(p["score"]) for p in params]) <= 0)
  assert all(str(p["crop_kind"]) == "ffhq" for p in params)
  for p in params:   # the FFHQ crop of the saved landmarks; eyes about level
    np.testing.assert_allclose(p["crop_transform"], crops.ffhq_transform(
        p["landmarks5"], int(p["crop_size"])), atol=1e-4)
    eyes = crops.apply_affine(p["crop_transform"], p["landmarks5"][:2])
    assert abs(eyes[0, 1] - eyes[1, 1]) < 0.05 * int(p["crop_size"])
  # Other settings in the same work directory: the photo is redone, not skipped.
  config.faces = "largest"
  summary = jobs.run(config, tmp_path)
  assert summary["skipped"] == 0 and summary["ok"] == 1


def test_converted_model_directory(photos, run_cli, tmp_path):
  """--config.model=DIR: the tiny preset's weights saved as a model directory give
  the same reconstruction as the preset itself."""
  from kaojax.models import loading
  config = infer_config.get_config("tiny")
  model = infer.build_model(config)
  loading.save_model(tmp_path / "model", model)
  config.preset = ""
  config.model = str(tmp_path / "model")
  config.input = str(photos / "astronaut.jpg")
  jobs.run(config, tmp_path / "out")
  (row,) = _rows(tmp_path / "out")
  assert row["status"] == "ok"
  ours = np.load(tmp_path / "out" / "astronaut" / "params.npz")
  reference = np.load(run_cli / "astronaut" / "params.npz")
  for key in ("shape", "expression", "pose", "scale", "translation", "box"):
    np.testing.assert_allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5)


def test_non_finite_outputs_are_an_error_row(photos, tmp_path, monkeypatch):
  def poisoned(self, images):
    n = len(images)
    nan = lambda *shape: np.full(shape, np.nan, np.float32)
    return [{"shape": nan(100), "expression": nan(50), "pose": nan(6), "scale": nan(1),
             "translation": nan(3), "vertices": nan(self.num_vertices, 3),
             "landmarks3d": nan(68, 3), "landmarks_render": nan(68, 2),
             "neutral_vertices": nan(self.num_vertices, 3), "lmk7": nan(7, 3),
             "surfels": nan(64, 64, 3), "normals": nan(64, 64, 3)} for _ in range(n)]

  monkeypatch.setattr(infer.Reconstructor, "__call__", poisoned)
  config = infer_config.get_config("tiny")
  config.input = str(photos / "astronaut.jpg")
  jobs.run(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["status"] == "error" and "non-finite" in row["message"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "summary.json"]
  # An error row is retried by a rerun.
  monkeypatch.undo()
  assert not infer.is_finished(row, photos / "astronaut.jpg")


def test_training_workdir_is_refused(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  config = infer_config.get_config()
  config.model = str(tmp_path)
  with pytest.raises(ValueError, match="training work directory"):
    infer.build_model(config)


def test_interrupted_results_line_is_skipped(photos, tmp_path):
  (tmp_path / "results.jsonl").write_text('{"input": "/somewhere/x.jpg", "sta')
  config = infer_config.get_config("tiny")
  config.input = str(photos / "text.png")
  jobs.run(config, tmp_path)
  rows = infer.read_results(tmp_path / "results.jsonl")
  assert list(rows) == [str(photos / "text.png")]
  assert rows[str(photos / "text.png")]["status"] == "unreadable"
  # Finished: a second run adds nothing.
  assert jobs.run(config, tmp_path)["skipped"] == 1


def test_output_names():
  import pathlib
  paths = [pathlib.Path(p) for p in ("/a/x.jpg", "/b/x.png", "/a/y.jpg", "/c/summary.json.png")]
  names = infer.output_names(paths)
  assert names[2] == "y"
  assert names[0] != names[1] and names[0].startswith("x_") and names[1].startswith("x_")
  assert names[3].startswith("summary.json_")
  assert infer.output_names(paths) == names   # deterministic
