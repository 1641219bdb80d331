"""Exports of the KaoLRM photo-inference job: surfels as a 3DGS .ply
(kaojax.export.ply.write_surfel_ply), the turntable and the photo overlay
(kaojax.infer.exports)."""

import imageio.v2 as imageio
import numpy as np
import plyfile
import pytest
from scipy.spatial.transform import Rotation

from data_pipeline.sources import CANONICAL_C2W
from kaojax.export import ply
from kaojax.export.animation import to_uint8, write_animation
from kaojax.infer import crops, exports
from kaojax.render import Gaussians, rasterize_gaussians, rasterize_surfels

SIZE = 32                       # every render: one image side, so compilations are shared
NUM = 6                         # surfels per scene
BACKGROUND = np.ones(3, np.float32)
CANONICAL_VIEW = np.linalg.inv(CANONICAL_C2W).astype(np.float32)
K = exports.intrinsics(SIZE, 0.75)


def _surfels(seed, quats=None, spread=0.3, scale=(0.08, 0.16)):
  """NUM surfels around the FLAME origin (metres), random unnormalised quaternions,
  in-plane scales 8-16 cm (1-2 px at SIZE, distance 2), a junk third scale (2DGS
  ignores it)."""
  rng = np.random.default_rng(seed)
  if quats is None:
    quats = rng.normal(size=(NUM, 4)) * rng.uniform(0.5, 2.0, (NUM, 1))
  scales = np.concatenate([rng.uniform(*scale, (NUM, 2)), rng.uniform(1, 5, (NUM, 1))], 1)
  return Gaussians(means=rng.uniform(-spread, spread, (NUM, 3)).astype(np.float32),
                   quats=np.asarray(quats, np.float32), scales=scales.astype(np.float32),
                   opacities=rng.uniform(0.5, 0.95, NUM).astype(np.float32),
                   colors=rng.uniform(0, 1, (NUM, 3)).astype(np.float32))


def _rotation(quats_wxyz):
  """[N, 3, 3] from scipy (scalar-last quaternions, normalised there)."""
  q = np.asarray(quats_wxyz, np.float64)
  return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()


def _render_surfels(g, viewmat=CANONICAL_VIEW):
  return np.asarray(rasterize_surfels(g, viewmat, K, SIZE, SIZE, BACKGROUND)["color"])


# ------------------------------------------------------------------ surfels as 3DGS .ply


def test_surfel_ply_covariance_is_the_tangent_plane_covariance(tmp_path):
  g = _surfels(0)
  path = ply.write_surfel_ply(tmp_path / "surfels.ply", g)
  data = plyfile.PlyData.read(str(path))
  vertex = data["vertex"]
  assert [p.name for p in vertex.properties] == ply.property_names(15)
  col = lambda *names: np.stack([np.asarray(vertex[n], np.float64) for n in names], -1)
  np.testing.assert_allclose(col("x", "y", "z"), g.means, atol=1e-7)
  np.testing.assert_array_equal(col("nx", "ny", "nz"), 0.0)
  np.testing.assert_array_equal(col(*[f"f_rest_{i}" for i in range(45)]), 0.0)
  np.testing.assert_allclose(ply.SH_C0 * col("f_dc_0", "f_dc_1", "f_dc_2") + 0.5, g.colors,
                             atol=1e-6)
  np.testing.assert_allclose(1 / (1 + np.exp(-col("opacity")[:, 0])), g.opacities, atol=1e-6)

  # The file's 3D covariance R diag(s^2) R^T ...
  scales = np.exp(col("scale_0", "scale_1", "scale_2"))
  rot = _rotation(col("rot_0", "rot_1", "rot_2", "rot_3"))
  written = rot @ (scales[:, :, None] ** 2 * np.swapaxes(rot, 1, 2))
  # ... is the surfel's: the in-plane axes with s0, s1, plus a 1e-3 x thinner normal.
  r = _rotation(g.quats)
  s = np.asarray(g.scales, np.float64)
  thickness = 1e-3 * s[:, :2].max(1)
  outer = lambda a: a[:, :, None] * a[:, None, :]
  expected = (s[:, 0, None, None] ** 2 * outer(r[:, :, 0])
              + s[:, 1, None, None] ** 2 * outer(r[:, :, 1])
              + thickness[:, None, None] ** 2 * outer(r[:, :, 2]))
  np.testing.assert_allclose(written, expected, rtol=0, atol=1e-6 * s.max() ** 2)
  # Along the normal the disc is a thousand times thinner than its larger axis.
  normal_var = np.einsum("ni,nij,nj->n", r[:, :, 2], written, r[:, :, 2])
  np.testing.assert_allclose(np.sqrt(normal_var), thickness, rtol=1e-4)


def test_surfel_ply_collapsed_surfel_stays_finite(tmp_path):
  g = _surfels(1)
  scales = np.array(g.scales)
  scales[0, :2] = 0.0              # a scale activation that underflowed
  g = g.replace(scales=scales)
  back = ply.read_gaussian_ply(ply.write_surfel_ply(tmp_path / "s.ply", g))
  assert np.all(np.isfinite(back.scales))
  np.testing.assert_allclose(back.scales[0], ply.MIN_SURFEL_SCALE, rtol=1e-5)
  nonfinite = g.replace(means=np.full((NUM, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match="NaN or infinite"):
    ply.write_surfel_ply(tmp_path / "bad.ply", nonfinite)


def test_surfel_ply_renders_like_the_surfels_face_on(tmp_path):
  """Surfels whose normals are along the canonical camera's optical axis (world z):
  their plane is parallel to the image, the perspective map of that plane is affine,
  so EWA splatting of the thin disc (3DGS) and the ray-splat intersection (2DGS)
  draw the same Gaussian (the file's normal term adds f^2 x^2 s_n^2 / z^4, ~1e-6 px^2).
  With the 3DGS renderer's 0.3 px^2 screen blur (eps2d) switched off they agree to
  float rounding (measured 3e-7). With it, as a viewer shows them, each footprint's
  variance grows by 0.3 px^2 at an unchanged peak, which changes alpha by up to about
  opacity * 0.3 / (e sigma^2) = 0.95 * 0.3 / (2.72 * 4.4) = 0.024 for the smallest
  surfel here (sigma = 24 px * 0.2 m / 2.3 m = 2.1 px); measured 0.014."""
  rng = np.random.default_rng(2)
  spin = rng.uniform(0, 2 * np.pi, NUM)          # in-plane rotation about world z
  quats = np.stack([np.cos(spin / 2), 0 * spin, 0 * spin, np.sin(spin / 2)], 1)
  # sigma 2-5 px: wider than the 2DGS screen low-pass (0.7 px), which would win otherwise
  g = _surfels(2, quats * rng.uniform(0.5, 2, (NUM, 1)), scale=(0.2, 0.33))
  ours = _render_surfels(g)
  back = ply.read_gaussian_ply(ply.write_surfel_ply(tmp_path / "s.ply", g))
  disc = Gaussians(means=back.means.astype(np.float32), quats=back.quats.astype(np.float32),
                   scales=back.scales.astype(np.float32),
                   opacities=back.opacities.astype(np.float32),
                   colors=back.colors.astype(np.float32))
  assert np.abs(ours - 1.0).max() > 0.3          # the surfels are in the picture
  sharp = np.asarray(rasterize_gaussians(disc, CANONICAL_VIEW, K, SIZE, SIZE, BACKGROUND,
                                         eps2d=0.0)["color"])
  np.testing.assert_allclose(sharp, ours, atol=2e-5)
  blurred = np.asarray(rasterize_gaussians(disc, CANONICAL_VIEW, K, SIZE, SIZE,
                                           BACKGROUND)["color"])
  np.testing.assert_allclose(blurred, ours, atol=2e-2)


# --------------------------------------------------------------------------- turntable


@pytest.mark.parametrize("elevation", [0.0, 25.0])
def test_orbit_viewmats_geometry(elevation):
  frames = 8
  viewmats = exports.orbit_viewmats(frames, elevation)
  assert viewmats.shape == (frames, 4, 4) and viewmats.dtype == np.float32
  if elevation == 0:
    np.testing.assert_array_equal(viewmats[0], CANONICAL_VIEW)
  c2w = np.linalg.inv(viewmats.astype(np.float64))
  centres, forward, right = c2w[:, :3, 3], c2w[:, :3, 2], c2w[:, :3, 0]
  e = np.deg2rad(elevation)
  # The distance to the vertical (world y) axis and the height are kept ...
  np.testing.assert_allclose(np.hypot(centres[:, 0], centres[:, 2]), 2 * np.cos(e), atol=1e-6)
  np.testing.assert_allclose(centres[:, 1], 2 * np.sin(e), atol=1e-6)
  # ... the camera looks at the head (the origin, on the axis) with no roll ...
  np.testing.assert_allclose(centres + 2 * forward, 0.0, atol=1e-6)
  np.testing.assert_allclose(right[:, 1], 0.0, atol=1e-6)
  # ... and turns 360 / F degrees per frame, towards +x first.
  azimuth = np.unwrap(np.arctan2(centres[:, 0], centres[:, 2]))
  np.testing.assert_allclose(np.diff(azimuth), 2 * np.pi / frames, atol=1e-6)
  # Frame F/2 is the back view: the camera centre mirrored through the axis.
  np.testing.assert_allclose(centres[frames // 2], centres[0] * [-1, 1, -1], atol=1e-6)


def test_orbit_starts_at_the_jobs_canonical_camera():
  from kaojax.infer.kaolrm import canonical_camera
  _, viewmats, Ks = canonical_camera(1, 48, 0.6)
  np.testing.assert_array_equal(exports.orbit_viewmats(3)[0], np.asarray(viewmats)[0, 0])
  np.testing.assert_array_equal(exports.intrinsics(48, 0.6), np.asarray(Ks)[0, 0])


def test_turntable_frame_zero_is_the_canonical_render():
  g = _surfels(3)
  renders = exports.turntable_renders(g, SIZE, 4, chunk_size=4)
  assert renders.shape == (4, SIZE, SIZE, 3) and renders.dtype == np.float32
  direct = _render_surfels(g)
  assert np.abs(direct - 1.0).max() > 0.3
  np.testing.assert_allclose(renders[0], np.clip(direct, 0, 1), atol=1e-6)
  frames = exports.turntable_frames(g, SIZE, 4, chunk_size=4)
  assert frames.dtype == np.uint8 and frames.shape == (4, SIZE, SIZE, 3)
  assert np.abs(frames[0].astype(int) - to_uint8(direct)).max() <= 1


def test_turntable_frames_are_the_turned_head():
  """Frame k (camera turned by +theta about world y) is the head turned by -theta seen
  from the canonical camera; k = F/2 is the back view. Chunks (3 frames, the last one
  padded) give the frames of one call."""
  g = _surfels(4)
  renders = exports.turntable_renders(g, SIZE, 4, chunk_size=3)
  np.testing.assert_allclose(renders, exports.turntable_renders(g, SIZE, 4, chunk_size=4),
                             atol=1e-6)
  for k in (1, 2):
    turn = Rotation.from_euler("y", -2 * np.pi * k / 4)
    quats = (turn * Rotation.from_quat(np.asarray(g.quats)[:, [1, 2, 3, 0]])).as_quat()
    turned = g.replace(means=turn.apply(g.means).astype(np.float32),
                       quats=quats[:, [3, 0, 1, 2]].astype(np.float32))
    np.testing.assert_allclose(renders[k], np.clip(_render_surfels(turned), 0, 1), atol=1e-4)
  assert np.abs(renders[2] - renders[0]).max() > 0.1


def test_turntable_writes_an_animation(tmp_path):
  frames = exports.turntable_frames(_surfels(5), SIZE, 4, chunk_size=4)
  path = write_animation(tmp_path / "turntable.mp4", frames, fps=8)
  assert path.suffix == ".mp4" and path.stat().st_size > 0
  reader = imageio.get_reader(path, format="FFMPEG")
  assert reader.count_frames() == 4
  read = np.stack([frame for frame in reader.iter_data()])   # (its len() is inf)
  reader.close()
  assert read.shape == (4, SIZE, SIZE, 3)
  # H.264 is lossy: the frames come back close, not equal.
  assert np.abs(read.astype(float) - frames).mean() < 12


# ----------------------------------------------------------------------- photo overlay


def _inside(points, quad, margin=0.0):
  """points [..., 2] strictly inside the convex quad [4, 2] (corners in order, either
  way round), by more than `margin` from every edge."""
  (ax, ay), (bx, by) = quad[1] - quad[0], quad[2] - quad[1]
  turn = np.sign(ax * by - ay * bx)
  inside = np.ones(points.shape[:-1], bool)
  for a, b in zip(quad, np.roll(quad, -1, 0)):
    edge = b - a
    cross = edge[0] * (points[..., 1] - a[1]) - edge[1] * (points[..., 0] - a[0])
    inside &= turn * cross / np.hypot(*edge) > margin
  return inside


def _pixel_centres(height, width):
  xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
  return np.stack([xs, ys], -1)


def _box_render(size, x0, x1, y0, y1, color):
  """A render of side `size`: colour in the box of pixels [y0, y1) x [x0, x1), white
  elsewhere (as `shade` draws the background); and its mask."""
  mask = np.zeros((size, size), bool)
  mask[y0:y1, x0:x1] = True
  shaded = np.where(mask[..., None], np.asarray(color, np.float64), 1.0)
  return shaded, mask


def _photo_quad(transform, render_size, crop_size, x0, x1, y0, y1):
  """Corners (in order) of the render box [x0, x1] x [y0, y1] (render pixels) on the
  photo, mapped with the crop transform's inverse."""
  corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
  return crops.apply_affine(crops.invert_affine(transform), corners * crop_size / render_size)


def test_overlay_scale_translation_closed_form():
  """photo -> crop: x 4 then -21 / -13 (odd), crop 64 -> render 32: photo pixel centres
  land exactly on render pixel centres (2j - 10, 2i - 7), so the bilinear mask is 0 or
  1 and the covered photo pixels are those whose centres lie in the mapped box."""
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
  transform = np.array([[4.0, 0, -21.0], [0, 4.0, -13.0]])
  color = (0.2, 0.4, 0.9)
  shaded, mask = _box_render(32, 8, 24, 12, 28, color)
  out = exports.photo_overlay(photo, shaded, mask, transform, crop_size=64, opacity=0.6)
  assert out.dtype == np.uint8 and out.shape == photo.shape
  quad = _photo_quad(transform, 32, 64, 8, 24, 12, 28)
  covered = _inside(_pixel_centres(24, 28), quad)
  assert covered.sum() == 8 * 8     # 16 x 16 render pixels, two per photo pixel each way
  np.testing.assert_array_equal(out[~covered], photo[~covered])
  expected = 0.4 * photo[covered] + 0.6 * 255 * np.asarray(color)
  assert np.abs(out[covered] - expected).max() <= 0.5 + 1e-9
  # Fully opaque: the render's colour itself.
  solid = exports.photo_overlay(photo, shaded, mask, transform, crop_size=64, opacity=1.0)
  np.testing.assert_array_equal(solid[covered], np.broadcast_to(
      np.round(255 * np.asarray(color)), (covered.sum(), 3)))


def test_overlay_rotated_similarity():
  """A rotated, scaled crop: photo pixels whose centres map more than half a render
  pixel inside the box (in the render's axes) are fully blended, those more than half
  a render pixel outside keep the photo exactly; the blended area is the box's."""
  angle, scale = np.deg2rad(30.0), 1.5
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  # photo -> crop 48: photo point (30, 34) to the crop centre
  shift = np.array([24.0, 24.0]) - scale * rot @ [30.0, 34.0]
  transform = np.concatenate([scale * rot, shift[:, None]], 1)
  render, crop_size = 32, 48
  x0, x1, y0, y1 = 10, 22, 9, 23
  color = (0.9, 0.5, 0.1)
  shaded, mask = _box_render(render, x0, x1, y0, y1, color)
  rng = np.random.default_rng(1)
  photo = rng.integers(0, 256, (64, 60, 3), dtype=np.uint8)
  out = exports.photo_overlay(photo, shaded, mask, transform, crop_size, opacity=0.6)
  centres = _pixel_centres(64, 60)
  inner = _inside(centres, _photo_quad(transform, render, crop_size,
                                       x0 + 0.5, x1 - 0.5, y0 + 0.5, y1 - 0.5))
  outer = _inside(centres, _photo_quad(transform, render, crop_size,
                                       x0 - 0.5, x1 + 0.5, y0 - 0.5, y1 + 0.5))
  assert inner.sum() > 60
  expected = 0.4 * photo[inner] + 0.6 * 255 * np.asarray(color)
  assert np.abs(out[inner] - expected).max() <= 0.5 + 1e-9
  np.testing.assert_array_equal(out[~outer], photo[~outer])
  assert np.any(out[outer & ~inner] != photo[outer & ~inner])

  # On a grey photo the blend weight can be read back: it integrates to the box's area
  # on the photo (render px -> crop px x 1.5 -> photo px / 1.5), and the band carries
  # the box's colour only (the white outside the mask does not bleed in).
  grey = np.full_like(photo, 40)
  out = exports.photo_overlay(grey, shaded, mask, transform, crop_size, opacity=1.0)
  target = 255 * np.asarray(color) - 40
  weight = (out.astype(float) - 40) / target                       # [H, W, 3]
  area = (x1 - x0) * (y1 - y0) * (crop_size / render / scale) ** 2
  assert abs(weight[..., 0].sum() - area) < 0.01 * area      # measured 0.2 %
  np.testing.assert_allclose(weight[..., 0], weight[..., 1], atol=0.5 / target[1] + 0.5 / target[0])


def test_overlay_landmarks_and_empty_mask():
  photo = np.random.default_rng(2).integers(0, 200, (64, 48, 3), dtype=np.uint8)
  shaded, mask = np.ones((16, 16, 3)), np.zeros((16, 16))
  transform = np.array([[0.5, 0, 0], [0, 0.5, 0]])
  points = np.array([[10.5, 20.5], [0.2, 0.1], [500.0, 500.0], [np.nan, 3.0]])
  out = exports.photo_overlay(photo, shaded, mask, transform, 32, landmarks2d=points)
  changed = np.any(out != photo, -1)
  # radius max(1, 64 / 300) = 1: the pixel under the point and its four neighbours.
  dot = [(20, 10), (19, 10), (21, 10), (20, 9), (20, 11)]
  corner = [(0, 0)]
  for i, j in dot + corner:
    np.testing.assert_array_equal(out[i, j], exports.LANDMARK_COLOR)
  assert changed.sum() == len(dot) + len(corner)


def test_draw_points_discs():
  image = np.zeros((20, 20, 3), np.uint8)
  out = exports.draw_points(image, [[10.0, 8.0]], radius=2.5, color=(255, 0, 0))
  centres = _pixel_centres(20, 20)
  disc = np.hypot(centres[..., 0] - 10.0, centres[..., 1] - 8.0) <= 2.5
  np.testing.assert_array_equal(out[..., 0] == 255, disc)
  assert not np.any(image)                      # the input is not drawn on
  clipped = exports.draw_points(image, [[-1.0, 19.5]], radius=2.0, color=(0, 0, 255))
  near = np.hypot(centres[..., 0] + 1.0, centres[..., 1] - 19.5) <= 2.0
  np.testing.assert_array_equal(clipped[..., 2] == 255, near)
