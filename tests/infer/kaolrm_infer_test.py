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
from kaojax.export.animation import write_animation
from kaojax.infer import crops, runner
from kaojax.infer import kaolrm as infer
from tests.infer.photos import group_photo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARAM_SHAPES = {"shape": (100,), "expression": (50,), "pose": (6,), "scale": (1,),
                "translation": (3,), "box": (4,), "score": (), "landmarks5": (5, 2),
                "crop_transform": (2, 3), "landmarks3d": (68, 3), "landmarks2d": (68, 2),
                "lmk7": (7, 3)}


EXPECTED = {"astronaut.jpg": "ok", "group.png": "ok", "cat.jpg": "no_face",
            "truncated.jpg": "unreadable", "text.png": "unreadable",
            "nested/grey.png": "ok", "nested/rgba.png": "ok", "clip.mp4": "ok"}
VIDEO_FRAMES = 5


def panning_frames():
  """A short 'video' of the astronaut's face: a 256 px window panning over the photo."""
  ast = skimage.data.astronaut()
  return [ast[8 + 6 * i:264 + 6 * i, 100 + 8 * i:356 + 8 * i] for i in range(VIDEO_FRAMES)]


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
  write_animation(root / "clip.mp4", panning_frames(), fps=10)
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
    if r["name"] == "clip":
      assert r["frames"] == r["frames_with_faces"] == r["faces"] == VIDEO_FRAMES
    elif r["status"] == "ok":
      assert r["faces"] == 1 and r["outputs"] == [r["name"]]
      assert r["seconds"]["total"] > 0
    else:
      assert r["faces"] == 0 and r["message"]
  summary = json.loads((run_cli / "summary.json").read_text())
  assert summary["ok"] == 5 and summary["unreadable"] == 2 and summary["no_face"] == 1


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
    vis = np.asarray(Image.open(folder / "vis.png"))   # 3 panels + the photo overlay
    w, h = params["image_size"]
    assert vis.shape == (64, 3 * 64 + round(w * 64 / h), 3)
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
  # transform maps its landmarks inside the crop.
  params = np.load(run_cli / "astronaut" / "params.npz")
  x0, y0, x1, y1 = params["box"]
  assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200
  inside = crops.apply_affine(params["crop_transform"], params["landmarks5"])
  assert (inside > 0).all() and (inside < int(params["crop_size"])).all()
  assert str(params["crop_kind"]) == "multiview"
  np.testing.assert_allclose(params["crop_transform"], crops.framing_transform(
      params["box"], int(params["crop_size"]), crops.MULTIVIEW_FRAMING), atol=1e-4)


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
  config.outputs = "mesh"
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
  forward = infer.Reconstructor.__call__

  def poisoned(self, images):
    results = forward(self, images)
    for r in results:
      r["vertices"] = r["vertices"] * np.nan
    return results

  monkeypatch.setattr(infer.Reconstructor, "__call__", poisoned)
  config = infer_config.get_config("tiny")
  config.input = str(photos / "astronaut.jpg")
  jobs.run(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["status"] == "error" and "non-finite" in row["message"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "summary.json"]
  # An error row is retried by a rerun.
  monkeypatch.undo()
  assert not runner.is_finished(row, photos / "astronaut.jpg")


def test_model_directory_errors(tmp_path):
  config = infer_config.get_config()
  config.model = str(tmp_path)
  with pytest.raises(ValueError, match="nor a training work directory"):
    infer.build_model(config)
  (tmp_path / "checkpoints").mkdir()      # a training run that saved nothing yet
  with pytest.raises(FileNotFoundError, match="without model_spec"):
    infer.build_model(config)


def test_interrupted_results_line_is_skipped(photos, tmp_path):
  (tmp_path / "results.jsonl").write_text('{"input": "/somewhere/x.jpg", "sta')
  config = infer_config.get_config("tiny")
  config.input = str(photos / "text.png")
  jobs.run(config, tmp_path)
  rows = runner.read_results(tmp_path / "results.jsonl")
  assert list(rows) == [str(photos / "text.png")]
  assert rows[str(photos / "text.png")]["status"] == "unreadable"
  # Finished: a second run adds nothing.
  assert jobs.run(config, tmp_path)["skipped"] == 1


def test_output_names():
  import pathlib
  paths = [pathlib.Path(p) for p in ("/a/x.jpg", "/b/x.png", "/a/y.jpg", "/c/summary.json.png")]
  names = runner.output_names(paths)
  assert names[2] == "y"
  assert names[0] != names[1] and names[0].startswith("x_") and names[1].startswith("x_")
  assert names[3].startswith("summary.json_")
  assert runner.output_names(paths) == names   # deterministic


def test_video_outputs(photos, run_cli):
  """A video: per-frame face folders, sequence.npz (one track, a shape per track, the
  smoothed series) and overlay.mp4 of the sampled frames."""
  import imageio.v2 as imageio
  folder = run_cli / "clip"
  assert sorted(p.name for p in folder.iterdir()) == ["frames", "overlay.mp4", "sequence.npz"]
  frames = sorted(p.name for p in (folder / "frames").iterdir())
  assert frames == [f"{i:06d}" for i in range(VIDEO_FRAMES)]
  for name in frames:   # the photo outputs, without vis.png
    assert sorted(p.name for p in (folder / "frames" / name).iterdir()) == [
        "lmk7.npy", "mesh.obj", "mesh_neutral.obj", "params.npz", "reference"]
  seq = np.load(folder / "sequence.npz")
  np.testing.assert_array_equal(seq["frame_index"], np.arange(VIDEO_FRAMES))
  np.testing.assert_array_equal(seq["track"], 0)
  assert seq["shape_track"].shape == (1, 100) and seq["pose_smoothed"].shape == (VIDEO_FRAMES, 6)
  np.testing.assert_allclose(seq["time"], np.arange(VIDEO_FRAMES) / 10.0, rtol=1e-5)
  for i, name in enumerate(frames):   # the raw series are the frames' params
    params = np.load(folder / "frames" / name / "params.npz")
    for key in ("shape", "expression", "pose", "translation", "box"):
      np.testing.assert_allclose(seq[key][i], params[key], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(seq["crop_transform"][i], params["crop_transform"])
  # The detector follows the panning face: boxes move by the pan (8, 6) px a frame.
  shift = np.diff(seq["box"][:, :2], axis=0).mean(0)
  np.testing.assert_allclose(shift, [-8, -6], atol=2.5)
  reader = imageio.get_reader(folder / "overlay.mp4", format="FFMPEG")
  overlay = list(reader.iter_data())
  reader.close()
  assert len(overlay) == VIDEO_FRAMES and overlay[0].shape == (256, 256, 3)
  # The overlay differs from the video only around the face's mesh and landmarks
  # (random weights: a small mesh), in every frame.
  for frame, original, name in zip(overlay, panning_frames(), frames):
    changed = np.argwhere(np.abs(frame.astype(int) - original.astype(int)).max(-1) > 60)
    lmk = np.load(folder / "frames" / name / "params.npz")["landmarks2d"]
    near = np.all((changed[:, ::-1] >= lmk.min(0) - 12)
                  & (changed[:, ::-1] <= lmk.max(0) + 12), axis=1)
    assert len(changed) > 20 and near.mean() > 0.9      # (H.264 noise elsewhere)


def test_full_crop_and_every_output(photos, tmp_path):
  """crop=full: no detection, the whole image is the face (the cat photo, faceless
  for MTCNN, is reconstructed); outputs=all adds the surfels PLY and a turntable."""
  import imageio.v2 as imageio
  config = infer_config.get_config("tiny")
  config.input = str(photos / "cat.jpg")
  config.crop = "full"
  config.outputs = "all"
  config.turntable_frames = 3
  config.num_samples = 500
  jobs.run(config, tmp_path)
  (row,) = _rows(tmp_path)
  assert row["status"] == "ok" and row["faces"] == 1
  folder = tmp_path / "cat"
  assert {"gaussians.ply", "turntable.mp4", "vis.png", "params.npz"} <= {
      p.name for p in folder.iterdir()}
  params = np.load(folder / "params.npz")
  h, w = skimage.data.chelsea().shape[:2]
  np.testing.assert_array_equal(params["box"], [0, 0, w, h])
  assert np.all(np.isnan(params["landmarks5"])) and str(params["crop_kind"]) == "full"
  np.testing.assert_allclose(params["crop_transform"],
                             crops.full_transform((w, h), int(params["crop_size"])))
  ply = plyfile.PlyData.read(str(folder / "gaussians.ply"))
  assert ply["vertex"].count == 500
  reader = imageio.get_reader(folder / "turntable.mp4", format="FFMPEG")
  assert len(list(reader.iter_data())) == 3
  reader.close()


def test_process_share_splits_the_inputs(photos, tmp_path):
  """Process 1 of 2 takes every second input and writes its own results file."""
  config = infer_config.get_config("tiny")
  config.input = str(photos)
  every = [str(p) for p in runner.inputs.list_inputs(str(photos))]
  settings = {k: config[k] for k in infer.TASK_SETTINGS}
  summary = runner.run(lambda: infer.KaoLRMTask(config), config, tmp_path, settings,
                       process_index=1, process_count=2)
  rows = runner.read_results(tmp_path / "results.process1.jsonl")
  assert sorted(rows) == sorted(every[1::2]) and summary["inputs"] == len(every[1::2])
  assert (tmp_path / "summary.process1.json").is_file()
  assert not (tmp_path / "results.jsonl").exists()
  assert runner.process_share(range(5), 0, 2) == [0, 2, 4]
  with pytest.raises(ValueError, match="process index"):
    runner.process_share(range(5), 2, 2)


def test_data_parallel_and_bfloat16(photos, run_cli, tmp_path):
  """Two (forced) CPU devices split the batch: the same parameters as one device.
  bfloat16 compute stays near float32."""
  script = (
      "import sys; from configs import infer_kaolrm as c; from kaojax import jobs\n"
      "import jax; assert jax.local_device_count() == 2\n"
      "config = c.get_config('tiny'); config.input = sys.argv[1]\n"
      "config.outputs = 'mesh'; jobs.run(config, sys.argv[2])\n"
      "config.dtype = 'bfloat16'; jobs.run(config, sys.argv[3])\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, str(photos / "astronaut.jpg"),
                         str(tmp_path / "dp"), str(tmp_path / "bf16")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  reference = np.load(run_cli / "astronaut" / "params.npz")
  parallel = np.load(tmp_path / "dp" / "astronaut" / "params.npz")
  low = np.load(tmp_path / "bf16" / "astronaut" / "params.npz")
  for key in ("shape", "expression", "pose", "scale", "translation"):
    np.testing.assert_allclose(parallel[key], reference[key], rtol=1e-5, atol=1e-6)
    err = np.abs(low[key] - reference[key]).max()
    assert 0 < err <= 0.05 * np.abs(reference[key]).max() + 1e-3, (key, err)
