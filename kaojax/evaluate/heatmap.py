"""Per-vertex values as a colour-coded render of a mesh (the paper's Fig. 4 heat maps).

    render_heatmap(path, vertices [V, 3], faces [F, 3], values [V], vmax, title)

The mesh is rasterised (`kaojax.render.rasterize_mesh`) from the front (+Z, FLAME's
facing direction, Y up), framed on its bounding sphere; each pixel's colour is the
barycentric interpolation of the per-vertex colours (values mapped 0..vmax through a
blue-cyan-yellow-red ramp), lightly shaded by the surface normal, on white. A colour
bar with the 0 and vmax labels is drawn under the image (PIL).
"""

import pathlib

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from kaojax import geometry

# value 0 .. 1 -> colour: dark blue, cyan, yellow, red.
RAMP = np.array([[0.05, 0.10, 0.55], [0.0, 0.75, 0.95], [1.0, 0.9, 0.1], [0.85, 0.05, 0.05]])
FOV_DEG = 25.0


def colormap(values, vmax: float):
  """values [N] -> RGB [N, 3] in [0, 1] (values clipped to 0..vmax)."""
  t = np.clip(np.asarray(values, np.float64) / max(float(vmax), 1e-30), 0.0, 1.0)
  x = t * (len(RAMP) - 1)
  low = np.minimum(np.floor(x).astype(int), len(RAMP) - 2)
  frac = (x - low)[:, None]
  return (1 - frac) * RAMP[low] + frac * RAMP[low + 1]


def front_camera(vertices, size: int):
  """A camera on +Z looking at the mesh's bounding-sphere centre, framing it:
  (viewmat [1, 4, 4], K [3, 3])."""
  v = np.asarray(vertices, np.float64)
  centre = 0.5 * (v.min(0) + v.max(0))
  radius = float(np.max(np.linalg.norm(v - centre, axis=-1)))
  distance = 1.1 * radius / np.sin(np.deg2rad(FOV_DEG / 2))
  eye = centre + np.array([0.0, 0.0, distance])
  c2w = np.asarray(geometry.look_at(jnp.asarray(eye[None], jnp.float32),
                                    jnp.asarray(centre, jnp.float32), (0.0, 1.0, 0.0)))
  return np.linalg.inv(c2w).astype(np.float32), np.asarray(
      geometry.intrinsics_from_fov(FOV_DEG, size, size), np.float32)


def render_vertex_colors(vertices, faces, colors, size: int = 256):
  """vertices [V, 3], faces [F, 3], colors [V, 3] -> image [size, size, 3] in [0, 1]
  (white background)."""
  from kaojax.render import rasterize_mesh  # pylint: disable=import-outside-toplevel
  viewmat, K = front_camera(vertices, size)
  faces = np.asarray(faces, np.int64)
  maps = rasterize_mesh(jnp.asarray(vertices, jnp.float32), jnp.asarray(faces), viewmat,
                        K, size, size)
  face_id = np.asarray(maps["face_id"])[0]                         # [H, W]
  mask = np.asarray(maps["mask"])[0]
  bary = np.asarray(maps["bary"])[0]                               # [H, W, 3]
  corners = np.asarray(colors, np.float64)[faces[np.maximum(face_id, 0)]]   # [H, W, 3, 3]
  rgb = np.einsum("hwk,hwkc->hwc", bary, corners)
  normal = np.asarray(maps["normal"])[0]                           # camera space
  shade = 0.55 + 0.45 * np.clip(-normal[..., 2], 0.0, 1.0)         # facing the camera
  return np.where(mask[..., None], np.clip(rgb * shade[..., None], 0, 1), 1.0)


def render_heatmap(path, vertices, faces, values, vmax: float, title: str = "",
                   size: int = 256) -> pathlib.Path:
  """Writes the heat map PNG (module doc) to `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = render_vertex_colors(vertices, faces, colormap(values, vmax), size)
  canvas = Image.new("RGB", (size, size + 44), "white")
  canvas.paste(Image.fromarray((image * 255).round().astype(np.uint8)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  bar = colormap(np.linspace(0, vmax, size - 40), vmax)
  for x, colour in enumerate((bar * 255).round().astype(int)):
    draw.line([20 + x, size + 4, 20 + x, size + 16], fill=tuple(colour))
  draw.text((20, size + 20), "0", fill="black")
  label = f"{vmax:.3g}"
  draw.text((size - 20 - 6 * len(label), size + 20), label, fill="black")
  if title:
    draw.text((4, 4), title, fill="black")
  canvas.save(path)
  return path
