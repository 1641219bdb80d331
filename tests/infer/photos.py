"""Real photos for the inference tests, composed from images that ship in
scikit-image (no multi-face photo ships in the installed packages)."""

import numpy as np
import skimage.data
from PIL import Image


def resize(a, s):
  size = (round(a.shape[1] * s), round(a.shape[0] * s))
  return np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC))


def rgb(gray):
  return np.repeat(gray[..., None], 3, -1)


def group_photo():
  """Four faces: the astronaut at full size, the cameraman at 0.55, the astronaut at
  0.3 and mirrored at 0.18 (boxes down to ~15 x 18 px)."""
  ast, cam = skimage.data.astronaut(), rgb(skimage.data.camera())
  canvas = np.full((560, 960, 3), 200, np.uint8)
  canvas[20:532, 20:532] = ast
  for img, s, (y, x) in [(cam, 0.55, (10, 620)), (ast, 0.3, (300, 560)),
                         (np.ascontiguousarray(ast[:, ::-1]), 0.18, (460, 820))]:
    small = resize(img, s)
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
  return canvas


def lfw_grid():
  """Eight different people of skimage's LFW subset, upscaled 4x, on a grey grid."""
  faces = skimage.data.lfw_subset()  # [200, 25, 25] float in [0, 1], 100 faces first
  grid = np.full((260, 520), 128, np.uint8)
  for i in range(8):
    face = resize((faces[i] * 255).round().astype(np.uint8), 4.0)
    r, c = divmod(i, 4)
    grid[r * 130 + 15:r * 130 + 115, c * 130 + 15:c * 130 + 115] = face
  return rgb(grid)
