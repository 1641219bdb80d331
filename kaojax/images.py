"""Image preparation as KaoLRM's reference does it, for training, evaluation and
inference alike (one function each).

The reference (its multi-view and monocular datasets and its inference runner)
composites RGBA on a constant background at the file's resolution, resizes with
torch's `interpolate(mode="bicubic", align_corners=True)` (Keys a = -0.75, no
antialiasing) and clamps to [0, 1]; the source image is always on white. Images are
float32 [..., H, W, C] in [0, 1].
"""

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] weights of torch's bicubic interpolate with align_corners=True
  (no antialiasing): source x = i * (in - 1) / (out - 1), four taps of the Keys kernel,
  indices clamped to the border. The source position is computed in float32, as torch
  does for float32 images (in float64 a 512 -> 224 resize differs from torch's by
  6e-5)."""
  scale = np.float32((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = np.float32(i) * scale
    base = int(np.floor(src))
    t = float(src - np.float32(base))
    taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
    for k, w in zip(range(-1, 3), taps):
      weights[i, min(max(base + k, 0), in_size - 1)] += w
  weights = weights.astype(np.float32)
  weights.flags.writeable = False
  return weights


def resize_bicubic(image, size: int):
  """[..., H, W, C] -> [..., size, size, C]: torch's bicubic interpolate with
  align_corners=True, not clamped (the kernel overshoots at edges), as two matrix
  products (rows, then columns)."""
  image = np.asarray(image, np.float32)
  height, width, channels = image.shape[-3:]
  if height == size and width == size:
    return image
  lead = image.shape[:-3]
  tall = bicubic_matrix(height, size) @ image.reshape(lead + (height, width * channels))
  return bicubic_matrix(width, size) @ tall.reshape(lead + (size, width, channels))


def composite(rgba, background):
  """[..., 4] RGBA -> [..., 3] over a background (a scalar or [3])."""
  rgba = np.asarray(rgba, np.float32)
  alpha = rgba[..., 3:]
  return rgba[..., :3] * alpha + np.asarray(background, np.float32) * (1 - alpha)


def check_unit_range(image, what: str = "image"):
  """Raises ValueError unless every value of `image` is finite and in [0, 1] (saying
  which: a 0-255 image passed as floats is the usual mistake)."""
  image = np.asarray(image)
  if not np.all(np.isfinite(image)):
    raise ValueError(f"{what} contains NaN or infinite values")
  low, high = float(image.min(initial=0.0)), float(image.max(initial=0.0))
  if low < 0.0 or high > 1.0:
    hint = " (a 0-255 image? divide it by 255)" if high > 1.0 else ""
    raise ValueError(f"{what} must have values in [0, 1], got [{low:g}, {high:g}]{hint}")


def prepare_source_image(image, size: int):
  """The model's source image: [..., H, W, 3 or 4] in [0, 1] -> [..., size, size, 3]:
  RGBA composited on white, bicubic-resized (align_corners), clamped to [0, 1].
  Non-finite values or values outside [0, 1] are refused."""
  image = np.asarray(image, np.float32)
  if image.ndim < 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"prepare_source_image: image must be [..., H, W, 3|4], got {image.shape}")
  check_unit_range(image, "prepare_source_image: the image")
  if image.shape[-1] == 4:
    image = composite(image, 1.0)
  return np.clip(resize_bicubic(image, size), 0.0, 1.0)
