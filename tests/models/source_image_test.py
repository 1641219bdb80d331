"""Source-image preparation against torch's bicubic interpolate (align_corners=True),
as KaoLRM's reference datasets and inference runner do it."""

import numpy as np
import pytest
import torch

from kaojax.images import prepare_source_image, resize_bicubic


def _torch_bicubic(images, size):
  out = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2),
                                        size=(size, size), mode="bicubic", align_corners=True)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("in_size,out_size", [(64, 56), (40, 56), (33, 17), (512, 224)])
def test_matches_torch_bicubic_align_corners(in_size, out_size):
  rng = np.random.default_rng(0)
  rgba = rng.uniform(size=(2, in_size, in_size + 3, 4)).astype(np.float32)
  rgba[..., 3] = (rng.uniform(size=rgba.shape[:-1]) > 0.5)   # hard alpha edges -> overshoot
  rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
  want = np.clip(_torch_bicubic(rgb, out_size), 0, 1)
  np.testing.assert_allclose(prepare_source_image(rgba, out_size), want, atol=1e-5)
  np.testing.assert_allclose(prepare_source_image(rgb, out_size), want, atol=1e-5)
  # Unclamped resize of any channel count (alpha, masks).
  np.testing.assert_allclose(resize_bicubic(rgba, out_size), _torch_bicubic(rgba, out_size),
                             atol=1e-5)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\|4\]"):
    prepare_source_image(np.zeros((8, 8, 2)), 4)


def test_refuses_nonfinite_and_out_of_range_images():
  image = np.full((8, 8, 3), 0.5, np.float32)
  with pytest.raises(ValueError, match="a 0-255 image"):
    prepare_source_image(image * 255, 4)
  with pytest.raises(ValueError, match=r"in \[0, 1\], got \[-0.5"):
    prepare_source_image(image - 1.0, 4)
  image[2, 3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN or infinite"):
    prepare_source_image(image, 4)
