"""The FLAME demo job, through `kaojax.jobs.run` and through `run.py`."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import flame_demo
from kaojax import jobs
from kaojax.export.obj import read_obj
from kaojax.flame.synthetic import make_synthetic_flame

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("flame_demo")
  jobs.run(flame_demo.get_config("tiny"), workdir)
  return workdir


def test_meshes_match_the_flame_layer(demo_dir):
  config = flame_demo.get_config("tiny")
  flame = make_synthetic_flame(seed=config.seed)
  for i in range(config.num_subjects):
    params = np.load(demo_dir / "subjects" / f"{i:03d}.npz")
    vertices, faces = read_obj(demo_dir / "subjects" / f"{i:03d}.obj")
    expected = flame(params["shape"], params["expression"], params["pose"])
    np.testing.assert_allclose(vertices, expected.vertices, atol=2e-6)
    np.testing.assert_array_equal(faces, flame.faces)
    np.testing.assert_allclose(params["landmarks3d"], expected.landmarks3d, atol=1e-6)
    assert abs(params["pose"][3]) > 0 or config.max_jaw_rad == 0  # jaw drawn


def test_picture_shows_heads_and_landmarks(demo_dir):
  config = flame_demo.get_config("tiny")
  image = np.asarray(Image.open(demo_dir / "heads.png").convert("RGB")).astype(int)
  size = config.image_size
  assert image.shape == (config.num_subjects * size, 2 * size, 3)
  for row in range(config.num_subjects):
    for col in range(2):
      tile = image[row * size:(row + 1) * size, col * size:(col + 1) * size]
      background = np.all(tile == 255, axis=-1)
      # The head covers a good part of the middle of each view, not the corners.
      assert 0.15 < 1.0 - background.mean() < 0.8
      assert background[0, 0] and background[-1, -1]
      red = (tile[..., 0] > 200) & (tile[..., 1] < 60) & (tile[..., 2] < 60)
      assert red.any() == (col == 0)  # landmarks drawn on the front view only
  summary = json.loads((demo_dir / "summary.json").read_text())
  assert summary["num_subjects"] == config.num_subjects
  assert "synthetic" in summary["flame"]


def test_run_py_cli(tmp_path):
  cmd = [sys.executable, "run.py", "--config=configs/flame_demo.py:tiny",
         "--config.num_subjects=1", f"--workdir={tmp_path}"]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "heads.png").exists()
  assert (tmp_path / "subjects" / "000.obj").exists()


def test_unknown_preset_and_job_are_named():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    flame_demo.get_config("huge")
  config = flame_demo.get_config("tiny")
  config.job = "nope"
  with pytest.raises(ValueError, match="unknown job 'nope'"):
    jobs.run(config, "/nonexistent/unused")
