"""Training pictures: one row per view of the first eval subject:
source | target | surfel render | mesh (shaded normals) with landmarks."""

import pathlib

import numpy as np
from PIL import Image, ImageDraw


def _to_uint8(image):
  return (np.clip(np.asarray(image, np.float32), 0, 1) * 255).round().astype(np.uint8)


def _resize(image, size):
  return np.asarray(Image.fromarray(_to_uint8(image)).resize((size, size), Image.BILINEAR))


def _landmarks(tile, pred, target):
  image = Image.fromarray(tile)
  draw = ImageDraw.Draw(image)
  for points, colour in ((target, (40, 200, 40)), (pred, (220, 30, 30))):
    for x, y in points:
      if x > 0 and y > 0:
        draw.rectangle([x - 1, y - 1, x + 1, y + 1], fill=colour)
  return np.asarray(image)


def render_grid(batch, outputs, index: int = 0):
  """batch: an eval batch; outputs: `evaluate`'s per-subject outputs -> uint8 image
  [V * R, 4 * R, 3] for subject `index` (landmarks: green truth, red prediction)."""
  targets = batch.target_rgb[index]
  size = targets.shape[-2]
  source = _resize(batch.source[index], size)
  rows = []
  for v in range(targets.shape[0]):
    normal = outputs["mesh_normal"][index, v]
    shade = np.clip(-normal[..., 2], 0, 1)[..., None] * np.array([0.85, 0.75, 0.7])
    mesh = np.where(outputs["mesh_mask"][index, v][..., None], shade, 1.0)
    mesh = _landmarks(_to_uint8(mesh), outputs["landmarks_px"][index, v],
                      batch.landmarks[index, v])
    rows.append(np.concatenate([source if v == 0 else np.full_like(source, 255),
                                _to_uint8(targets[v]),
                                _to_uint8(outputs["render"][index, v]), mesh], 1))
  return np.concatenate(rows, 0)


def save_grid(path, batch, outputs, index: int = 0):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(render_grid(batch, outputs, index)).save(path)
  return path
