"""Extra exports of the KaoLRM photo-inference job: a turntable of the surfels and an
overlay of a crop-space render on the original photo.

* `orbit_viewmats` / `turntable_frames`: the canonical camera (`CANONICAL_C2W`: at
  distance 2 on +z looking at the FLAME origin, world y up, metres) carried around the
  vertical axis through the head, azimuth 0..360 degrees (endpoint excluded; frame 0
  is the canonical view, positive azimuth moves the camera towards world +x, the
  subject's left), optionally raised by `elevation_deg` (the camera still looks at the
  origin). The surfels are rendered with `kaojax.render.rasterize_surfels` at the
  job's intrinsics (focal synth_focal * size, principal point at the image centre).
* `photo_overlay`: a render of the crop (side R pixels covering the crop square of side
  crop_size) resampled onto the photo through the crop transform (photo pixels ->
  crop pixels, `kaojax.infer.crops` conventions: pixel centres at +0.5) and
  alpha-blended where the render's mask is, with optional landmark dots
  (`draw_points`).
"""

import numpy as np

from data_pipeline.sources import CANONICAL_C2W
from kaojax.export.animation import to_uint8
from kaojax.infer import crops
from kaojax.render import rasterize_surfels

LANDMARK_COLOR = (0, 255, 0)


def _rotation_y(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rotation_x(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def orbit_viewmats(num_frames: int, elevation_deg: float = 0.0) -> np.ndarray:
  """-> [F, 4, 4] float32 world-to-camera (OpenCV) matrices of the orbit: frame k is
  CANONICAL_C2W turned by azimuth 360 k / F degrees about the world y axis, after
  raising it by `elevation_deg` (positive: the camera above the head, looking down)."""
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  tilt = np.eye(4)
  tilt[:3, :3] = _rotation_x(-np.deg2rad(elevation_deg))
  viewmats = []
  for k in range(num_frames):
    turn = np.eye(4)
    turn[:3, :3] = _rotation_y(2 * np.pi * k / num_frames)
    c2w = turn @ tilt @ CANONICAL_C2W.astype(np.float64)
    viewmats.append(np.linalg.inv(c2w))
  return np.stack(viewmats).astype(np.float32)


def intrinsics(size: int, synth_focal: float) -> np.ndarray:
  """[3, 3] the job's render intrinsics: focal synth_focal * size, centre size / 2."""
  f, c = synth_focal * size, size / 2
  return np.array([[f, 0, c], [0, f, c], [0, 0, 1]], np.float32)


def turntable_renders(gaussians, size: int, num_frames: int, synth_focal: float = 0.75,
                      elevation_deg: float = 0.0, background=(1.0, 1.0, 1.0), *,
                      chunk_size: int = 8) -> np.ndarray:
  """gaussians: `kaojax.render.Gaussians` of one face (means [N, 3], ..., no batch
  axis) -> float32 [F, size, size, 3] surfel colours over `background`, in [0, 1].
  Frames are rendered `chunk_size` at a time (the last chunk padded with frame 0, so
  one compilation serves all chunks)."""
  viewmats = orbit_viewmats(num_frames, elevation_deg)
  K = intrinsics(size, synth_focal)
  chunk = max(1, min(int(chunk_size), num_frames))
  frames = []
  for start in range(0, num_frames, chunk):
    views = viewmats[start:start + chunk]
    count = len(views)
    views = np.concatenate([views, np.repeat(viewmats[:1], chunk - count, 0)])
    out = rasterize_surfels(gaussians, views, np.broadcast_to(K, (chunk, 3, 3)), size, size,
                            np.asarray(background, np.float32))
    frames.append(np.asarray(out["color"])[:count])
  return np.clip(np.concatenate(frames), 0.0, 1.0).astype(np.float32)


def turntable_frames(gaussians, size: int, num_frames: int, synth_focal: float = 0.75,
                     elevation_deg: float = 0.0, background=(1.0, 1.0, 1.0),
                     **render_options) -> np.ndarray:
  """-> uint8 [F, size, size, 3]: `turntable_renders` rounded to bytes, ready for
  `kaojax.export.animation.write_animation(path, frames, fps)`."""
  renders = turntable_renders(gaussians, size, num_frames, synth_focal, elevation_deg,
                              background, **render_options)
  return np.stack([to_uint8(frame) for frame in renders])


def draw_points(image, points, radius: float, color=LANDMARK_COLOR) -> np.ndarray:
  """A copy of image uint8 [H, W, 3] with a filled disc of `radius` pixels in `color`
  at each of points [K, 2] (x, y photo pixels, centres at +0.5): every pixel whose
  centre is within `radius` of the point. Discs are clipped to the image; non-finite
  points are skipped."""
  out = np.array(image, copy=True)
  height, width = out.shape[:2]
  for x, y in np.asarray(points, np.float64).reshape(-1, 2):
    if not (np.isfinite(x) and np.isfinite(y)):
      continue
    x0, x1 = max(0, int(np.floor(x - radius))), min(width, int(np.ceil(x + radius)) + 1)
    y0, y1 = max(0, int(np.floor(y - radius))), min(height, int(np.ceil(y + radius)) + 1)
    if x0 >= x1 or y0 >= y1:
      continue
    cols = np.arange(x0, x1) + 0.5 - x
    rows = np.arange(y0, y1) + 0.5 - y
    inside = rows[:, None] ** 2 + cols[None, :] ** 2 <= radius ** 2
    out[y0:y1, x0:x1][inside] = color
  return out


def sample_bilinear(image, coords) -> np.ndarray:
  """image [R, C, D] float, coords [..., 2] continuous (x, y) pixel coordinates (pixel
  centres at +0.5) -> [..., D]; the image is zero outside its pixels."""
  image = np.asarray(image, np.float64)
  rows, cols = image.shape[:2]
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  u = np.clip(coords[..., 0] - 0.5, -1.0, cols)    # continuous column index
  v = np.clip(coords[..., 1] - 0.5, -1.0, rows)
  u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
  fu, fv = (u - u0)[..., None], (v - v0)[..., None]
  at = lambda r, c: padded[r + 1, c + 1]
  u1, v1 = np.minimum(u0 + 1, cols), np.minimum(v0 + 1, rows)
  return ((1 - fv) * ((1 - fu) * at(v0, u0) + fu * at(v0, u1))
          + fv * ((1 - fu) * at(v1, u0) + fu * at(v1, u1)))


def photo_overlay(image, shaded, mask, transform, crop_size: int, landmarks2d=None,
                  opacity: float = 0.6, landmark_color=LANDMARK_COLOR) -> np.ndarray:
  """The crop-space render blended onto the original photo.

  image: uint8 [H, W, 3] the photo; shaded: [R, R, 3] in [0, 1] a render covering the
  crop square (side crop_size crop pixels); mask: [R, R] bool or float in [0, 1] where
  the render has the mesh; transform: [2, 3] photo pixels -> crop pixels; landmarks2d:
  optional [K, 2] photo pixels, drawn as dots of radius max(1, H / 300).
  Returns uint8 [H, W, 3]: each photo pixel centre p samples the render (bilinear,
  premultiplied by the mask, zero outside the render) at (R / crop_size) transform(p),
  then photo * (1 - opacity m) + opacity * (shaded m); pixels where m = 0 keep the
  photo exactly."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  shaded = np.asarray(shaded, np.float64)
  size = shaded.shape[0]
  if shaded.shape != (size, size, 3):
    raise ValueError(f"shaded must be [R, R, 3], got {shaded.shape}")
  mask = np.asarray(mask, np.float64)
  if mask.shape != (size, size):
    raise ValueError(f"mask must be [{size}, {size}], got {mask.shape}")
  mask = np.clip(mask, 0.0, 1.0)
  to_render = np.asarray(transform, np.float64) * (size / crop_size)   # photo -> render
  out = image.copy()
  height, width = image.shape[:2]
  # Only the photo's pixels under the render square (and one pixel around it) can change.
  corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
  box = crops.apply_affine(crops.invert_affine(to_render), corners)
  x0, y0 = np.maximum(np.floor(box.min(0)).astype(int) - 1, 0)
  x1 = min(width, int(np.ceil(box[:, 0].max())) + 1)
  y1 = min(height, int(np.ceil(box[:, 1].max())) + 1)
  if x0 < x1 and y0 < y1:
    xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    coords = crops.apply_affine(to_render, np.stack([xs, ys], -1))
    rgba = np.concatenate([np.clip(shaded, 0, 1) * mask[..., None], mask[..., None]], -1)
    sampled = sample_bilinear(rgba, coords)
    alpha = opacity * sampled[..., 3:]
    photo = image[y0:y1, x0:x1].astype(np.float64)
    blended = photo * (1 - alpha) + opacity * sampled[..., :3] * 255.0
    blended = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(alpha > 0, blended, image[y0:y1, x0:x1])
  if landmarks2d is not None:
    out = draw_points(out, landmarks2d, max(1.0, height / 300), landmark_color)
  return out
