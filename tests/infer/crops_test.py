"""Face crops (kaojax.infer.crops): closed-form cases, round trips, the warp's pixel
convention."""

import numpy as np
import pytest
from PIL import Image

from kaojax.infer import crops

# Upright, symmetric 5 points: eyes, nose, mouth corners.
UPRIGHT = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], np.float64)


def _rotate(points, degrees, center):
  a = np.radians(degrees)
  r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  return (np.asarray(points) - center) @ r.T + center


def test_facelift_closed_form():
  box = (100.0, 120.0, 300.0, 280.0)   # w 200, h 160: mean 180
  m = crops.facelift_transform(box)
  s = crops.FACELIFT_FACE_SIZE / 180.0
  np.testing.assert_allclose(m[:, :2], s * np.eye(2), atol=1e-12)
  np.testing.assert_allclose(crops.apply_affine(m, [200.0, 200.0]), crops.FACELIFT_CENTER,
                             atol=1e-9)
  np.testing.assert_allclose(crops.apply_affine(m, [100.0, 120.0]),
                             np.array(crops.FACELIFT_CENTER) - s * np.array([100.0, 80.0]),
                             atol=1e-9)
  assert crops.crop_transform("facelift", box, UPRIGHT, 224)[1] == 512


def test_framing_closed_form():
  box = (10.0, 20.0, 110.0, 70.0)                   # w 100, h 50: mean side 75
  framing = crops.Framing(0.25, (0.5, 0.6))         # 75 px -> 56 px of 224
  m = crops.framing_transform(box, 224, framing)
  s = 224 * 0.25 / 75
  np.testing.assert_allclose(m, [[s, 0, 112 - 60 * s], [0, s, 0.6 * 224 - 45 * s]],
                             atol=1e-12)
  np.testing.assert_allclose(crops.crop_transform("multiview", box, None, 224, framing)[0], m)
  default = crops.crop_transform("multiview", box, None, 224)[0]   # 1/1.8, centred
  np.testing.assert_allclose(default, crops.framing_transform(box, 224, crops.MULTIVIEW_FRAMING))
  assert crops.Framing.parse("0.25, 0.5,0.6") == framing
  with pytest.raises(ValueError, match="face_size,cx,cy"):
    crops.Framing.parse("0.25,0.5")
  with pytest.raises(ValueError, match="bad framing"):
    crops.Framing(-1.0, (0.5, 0.5))


def test_ffhq_closed_form_upright():
  # eye_to_eye (40, 0), eye_to_mouth (0, 40): x = (80, 0), side 160, centre (60, 54).
  c, x, y = crops.ffhq_quad(UPRIGHT)
  np.testing.assert_allclose(c, [60, 54])
  np.testing.assert_allclose(x, [80, 0])
  np.testing.assert_allclose(y, [0, 80])
  m = crops.ffhq_transform(UPRIGHT, 256)
  np.testing.assert_allclose(crops.apply_affine(m, [[-20, -26], [140, 134], [60, 54]]),
                             [[0, 0], [256, 256], [128, 128]], atol=1e-9)
  # Swapped eye / mouth order gives the same crop.
  np.testing.assert_allclose(crops.ffhq_transform(UPRIGHT[[1, 0, 2, 4, 3]], 256), m,
                             atol=1e-12)


@pytest.mark.parametrize("degrees", [-35.0, 20.0, 90.0])
def test_ffhq_is_rotation_and_translation_invariant(degrees):
  center = np.array([70.0, 40.0])
  moved = _rotate(UPRIGHT, degrees, center) + [13.0, -7.0]
  a = crops.apply_affine(crops.ffhq_transform(UPRIGHT, 224), UPRIGHT)
  b = crops.apply_affine(crops.ffhq_transform(moved, 224), moved)
  np.testing.assert_allclose(a, b, atol=1e-9)
  # A similarity: orthogonal rows of equal norm.
  lin = crops.ffhq_transform(moved, 224)[:, :2]
  np.testing.assert_allclose(lin @ lin.T, np.eye(2) * crops.affine_scale(lin) ** 2,
                             atol=1e-12)


@pytest.mark.parametrize("kind", crops.CROPS)
def test_round_trip_original_crop_original(kind):
  rng = np.random.default_rng(0)
  for _ in range(20):
    center = rng.uniform(50, 1500, 2)
    size = rng.uniform(20, 600)
    box = np.concatenate([center - size / 2, center + size * rng.uniform(0.3, 0.7, 2)])
    lm = _rotate(center + (UPRIGHT - 60) * size / 60, rng.uniform(-60, 60), center)
    m, _ = crops.crop_transform(kind, box, lm, 224)
    back = crops.apply_affine(crops.invert_affine(m), crops.apply_affine(m, lm))
    assert np.abs(back - lm).max() < 1e-3
    boxed = crops.apply_affine(crops.invert_affine(m), crops.apply_affine(
        m, box.reshape(2, 2)))
    assert np.abs(boxed - box.reshape(2, 2)).max() < 1e-3


def test_bad_inputs():
  with pytest.raises(ValueError):
    crops.facelift_transform((10, 10, 5, 20))
  with pytest.raises(ValueError):
    crops.ffhq_transform(np.zeros((4, 2)), 224)
  with pytest.raises(ValueError):
    crops.crop_transform("tight", (0, 0, 1, 1), UPRIGHT, 224)


def _dark_blob(height, width, cx, cy, sigma):
  yy, xx = np.mgrid[0:height, 0:width] + 0.5   # pixel centres
  blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
  return np.repeat((255 - 200 * blob).round().astype(np.uint8)[..., None], 3, 2)


def _centroid(image):
  w = 255.0 - image[..., 0].astype(np.float64)
  yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]] + 0.5
  return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


@pytest.mark.parametrize("scale", [2.0, 1.0, 0.3])
def test_warp_follows_the_transform(scale):
  """A blob at continuous (x, y) lands at M @ (x, y) in the crop (pixel centres at
  +0.5 on both sides), also through the anti-aliasing pre-reduction (scale < 0.75).
  Resampling moves a centroid by a little (PIL's bicubic, a = -1, by up to a few
  tenths of a pixel at fractional offsets); a half-pixel convention error would not
  pass."""
  image = _dark_blob(400, 500, 231.3, 187.8, 12.0)
  m = crops._affine(scale, np.eye(2), (231.3, 187.8), (128.0, 120.0))
  out = crops.warp(image, m, 256, resample=Image.BILINEAR)
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(_centroid(out), [128.0, 120.0], atol=0.15)
  np.testing.assert_allclose(_centroid(crops.warp(image, m, 256)), [128.0, 120.0], atol=0.4)
  # An integer translation is exact with the default bicubic too.
  shift = np.array([[1.0, 0, 10], [0, 1, 20]])
  np.testing.assert_array_equal(crops.warp(image, shift, (500, 400))[20:, 10:],
                                image[:-20, :-10])
  # Outside the photo: white.
  far = crops._affine(1.0, np.eye(2), (-500.0, -500.0), (64.0, 64.0))
  assert (crops.warp(image, far, 32) == 255).all()


def test_facelift_crop_places_the_box_on_the_white_canvas():
  """A grey box on black, cropped with FaceLift's protocol: the box lands centred at
  FACELIFT_CENTER with its mean side scaled to FACELIFT_FACE_SIZE, white around the
  photo."""
  image = np.zeros((300, 400, 3), np.uint8)
  box = (150.0, 80.0, 250.0, 200.0)                 # mean side 110
  image[80:200, 150:250] = 128
  out = crops.warp(image, crops.facelift_transform(box), crops.FACELIFT_SIZE)
  assert out.shape == (512, 512, 3)
  scale = crops.FACELIFT_FACE_SIZE / 110.0
  grey = np.argwhere((out[..., 0] > 64) & (out[..., 0] < 192))    # half-way edges
  (ymin, xmin), (ymax, xmax) = grey.min(0), grey.max(0)
  np.testing.assert_allclose([(xmin + xmax + 1) / 2, (ymin + ymax + 1) / 2],
                             crops.FACELIFT_CENTER, atol=1.5)
  np.testing.assert_allclose([xmax + 1 - xmin, ymax + 1 - ymin], [100 * scale, 120 * scale],
                             atol=3)
  top = crops.FACELIFT_CENTER[1] - 140 * scale      # where the photo's top edge lands
  assert np.all(out[:int(top) - 2] == 255)          # white canvas above the photo
  assert np.all(out[int(top) + 3:int(top) + 10, 200] == 0)   # the photo's black
