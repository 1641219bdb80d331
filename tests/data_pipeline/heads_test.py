"""Synthetic 360-degree heads: layout, FaceLift's fixed cameras, white background, and
the grain sources (bad files reported and skipped)."""

import json

import numpy as np
import pytest

from data_pipeline import facelift_layout, facelift_sources, heads, sources
from data_pipeline.view_batch import make_view_batch
from kaojax.geometry.cameras import FACELIFT_VIEWS, facelift_cameras


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("heads")
  heads.generate(root, num_subjects=4, num_random=3, image_size=16, seed=0,
                 val_fraction=0.25, progress=False)
  return root


def test_layout_holds_the_fixed_and_random_cameras(dataset):
  assert json.loads((dataset / "val.json").read_text()) == ["head_00003"]
  c2w, K, sizes, files, views = facelift_layout.read_cameras(dataset / "head_00000")
  assert views == list(FACELIFT_VIEWS) + ["random"] * 3
  fixed, fixed_K = facelift_cameras(size=16)
  np.testing.assert_allclose(c2w[:6], fixed, atol=1e-5)
  np.testing.assert_allclose(K, np.broadcast_to(fixed_K[0], (9, 3, 3)), atol=1e-4)
  # random cameras on the 2.7 sphere looking at the origin (OpenCV: +z forward)
  centres = c2w[6:, :3, 3]
  np.testing.assert_allclose(np.linalg.norm(centres, axis=-1), 2.7, atol=1e-4)
  np.testing.assert_allclose(np.einsum("ni,ni->n", c2w[6:, :3, 2], -centres / 2.7), 1.0,
                             atol=1e-5)
  assert (sizes == 16).all() and files[0] == "images/cam_000.png"
  # the head is seen from the back too: every view covers some pixels
  rgba = np.stack([facelift_layout.read_image(dataset / "head_00000", f, 16, 16)
                   for f in files])
  assert (rgba[..., 3].reshape(9, -1).max(1) == 1).all()


def test_sources_composite_on_white_and_skip_bad_subjects(dataset, tmp_path):
  loader = facelift_sources.gslrm_loader(dataset, "train", 16, num_views=4)
  batch = sources.make_dataset(loader, 2, seed=0, batch_fn=make_view_batch)[0]
  assert batch.images.shape == (2, 4, 16, 16, 3) and batch.c2w.shape == (2, 4, 4, 4)
  assert batch.images[..., 0, 0, :].min() == 1.0          # corners are background
  fixed = facelift_sources.mvdiff_loader(dataset, "val", 8, background="white")(
      0, np.random.default_rng(0))
  assert fixed["images"].shape == (6, 8, 8, 3)
  np.testing.assert_allclose(fixed["Ks"][0, 0, 0], 8 / 16 * 548.9937744140625 * 16 / 512,
                             rtol=1e-5)
  # A corrupt camera file: the subject is reported, replaced and counted.
  import shutil
  broken = tmp_path / "broken"
  shutil.copytree(dataset, broken)
  (broken / "head_00000" / facelift_layout.CAMERAS_FILE).write_text("{not json")
  (broken / "head_00001" / "images" / "cam_002.png").write_bytes(b"garbage")
  loader = facelift_sources.mvdiff_loader(broken, "train", 16)
  sample = loader(0, np.random.default_rng(0))
  assert sample["num_skipped"] == 2
  with pytest.raises(Exception, match="unreadable camera file"):
    facelift_sources.load_fixed_views(broken / "head_00000", np.random.default_rng(0), 16)
