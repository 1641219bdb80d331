"""The FaceLift photo job (configs/infer_facelift.py:tiny): detection, FaceLift's crop,
the pipeline's files per face and a results row per input, with random toy weights."""

import json
import subprocess
import sys

import numpy as np
import plyfile
import pytest
import skimage.data
from PIL import Image

from configs import infer_facelift
from kaojax import jobs
from kaojax.infer import crops, facelift, inputs, runner

FILES = ["face.npz", "gaussians.ply", "input.png", "multiview.png", "output.png",
         "turntable.mp4"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("facelift_photos")
  Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.jpg", quality=92)
  Image.fromarray(skimage.data.chelsea()).save(root / "cat.jpg")
  (root / "notes.png").write_text("not a picture\n")
  return root


def test_folder_of_photos(photos, tmp_path):
  config = infer_facelift.get_config("tiny")
  config.input = str(photos)
  summary = jobs.run(config, tmp_path)
  assert (summary["ok"], summary["no_face"], summary["unreadable"]) == (1, 1, 1)
  rows = {r["name"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text()
                                    .splitlines())}
  assert {k: r["status"] for k, r in rows.items()} == {
      "astronaut": "ok", "cat": "no_face", "notes": "unreadable"}
  folder = tmp_path / "astronaut"
  assert sorted(p.name for p in folder.iterdir()) == FILES
  face = np.load(folder / "face.npz")
  # FaceLift's crop of the detected box, resized to the toy models' 32 px, is the input.
  image = inputs.read_image(photos / "astronaut.jpg")
  np.testing.assert_allclose(face["crop_transform"], crops.facelift_transform(face["box"]))
  crop = crops.warp(image, face["crop_transform"], crops.FACELIFT_SIZE)
  expected = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BICUBIC))
  written = np.asarray(Image.open(folder / "input.png"))
  assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
  assert Image.open(folder / "multiview.png").size == (6 * 32, 32)
  assert plyfile.PlyData.read(str(folder / "gaussians.ply"))["vertex"].count > 0
  # A rerun skips everything.
  assert jobs.run(config, tmp_path)["skipped"] == 3


def test_old_command_line_is_an_alias(photos, tmp_path):
  """python -m kaojax.infer.facelift --image ... --out ... runs the job on one photo;
  --precropped skips detection (the cat is then reconstructed)."""
  proc = subprocess.run([sys.executable, "-m", "kaojax.infer.facelift", "--tiny",
                         "--precropped", "--image", str(photos / "cat.jpg"),
                         "--out", str(tmp_path), "--turntable-frames", "3"],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == 1
  assert sorted(p.name for p in (tmp_path / "cat").iterdir()) == FILES
  row, = runner.read_results(tmp_path / "results.jsonl").values()
  assert row["settings"]["crop"] == "full"


def test_missing_weights_are_named(tmp_path, photos):
  config = infer_facelift.get_config()
  config.input = str(photos / "astronaut.jpg")
  with pytest.raises(ValueError, match="--config.mvdiffusion, --config.gslrm"):
    facelift.run_job(config, tmp_path)
