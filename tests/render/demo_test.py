"""The demo CLI runs end to end (tiny size) and writes its PNGs."""

import numpy as np
from PIL import Image

from kaojax.render import demo


def test_demo_writes_pngs(tmp_path):
  demo.main(["--out", str(tmp_path), "--size", "32", "--num-surfels", "300"])
  names = ["mesh_depth.png", "mesh_normal.png", "surfel_color.png", "surfel_alpha.png",
           "surfel_depth.png", "surfel_normal.png", "gaussians_color.png"]
  for name in names:
    image = np.asarray(Image.open(tmp_path / name))
    assert image.shape[:2] == (32, 96), name           # three views side by side
    assert image.std() > 5, name                         # not blank
