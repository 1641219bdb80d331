"""Source-image preparation against torch's bicubic interpolate (align_corners=True)."""

import numpy as np
import pytest
import torch

from kaojax.models.lrm import prepare_source_images


@pytest.mark.parametrize("in_size,out_size", [(64, 56), (40, 56), (33, 17)])
def test_matches_torch_bicubic_align_corners(in_size, out_size):
  rng = np.random.default_rng(0)
  rgba = rng.uniform(size=(2, in_size, in_size + 3, 4)).astype(np.float32)
  rgba[..., 3] = (rng.uniform(size=rgba.shape[:-1]) > 0.5)   # hard alpha edges -> overshoot
  rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
  want = torch.nn.functional.interpolate(torch.from_numpy(rgb).permute(0, 3, 1, 2),
                                         size=(out_size, out_size), mode="bicubic",
                                         align_corners=True)
  want = torch.clamp(want, 0, 1).permute(0, 2, 3, 1).numpy()
  got = np.asarray(prepare_source_images(rgba, out_size))
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(prepare_source_images(rgb, out_size)), want, atol=1e-5)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\|4\]"):
    prepare_source_images(np.zeros((8, 8, 3)), 4)
