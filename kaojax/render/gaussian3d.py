"""3D Gaussians (3DGS, EWA splatting), pure JAX, following gsplat's pinhole
projection: camera-space covariance R S S^T R^T, Jacobian of the perspective
map with the centre clamped to 1.3x the field of view, a 0.3 px^2 blur (eps2d),
near plane 0.01, radii ceil(3.33 sqrt(diag cov2d)); colours are SH degree 0,
already evaluated (`Gaussians.colors`). Expected depth composites the centre's
camera z, like gsplat's "ED" mode and graphdeco's rasterizer.
"""

import functools

import jax
import jax.numpy as jnp

from kaojax.geometry.rotations import quat_to_matrix
from kaojax.render import native, tiles, views
from kaojax.render.native import ops as native_ops
from kaojax.render.gaussians import Gaussians

EPS2D = 0.3


def project_gaussians(means, quats, scales, viewmats, Ks, width: int, height: int,
                      eps2d: float = EPS2D, near_plane: float = 0.01, far_plane: float = 1e10):
  """gsplat's `_fully_fused_projection` (pinhole, no compensation).

  means [..., N, 3], quats [..., N, 4] wxyz, scales [..., N, 3], viewmats
  [..., 4, 4] world-to-camera, Ks [..., 3, 3] (one camera per batch index).
  Returns dict: means2d [..., N, 2], depths [..., N], conics [..., N, 3]
  (a, b, c of the inverse 2D covariance [[a, b], [b, c]]), radii [..., N, 2].
  """
  R = viewmats[..., None, :3, :3]
  t = viewmats[..., None, :3, 3]
  means_c = jnp.einsum("...ij,...j->...i", R, means) + t
  M = quat_to_matrix(quats) * scales[..., None, :]
  cov_w = M @ jnp.swapaxes(M, -1, -2)
  cov_c = R @ cov_w @ jnp.swapaxes(R, -1, -2)
  tx, ty, tz_raw = means_c[..., 0], means_c[..., 1], means_c[..., 2]
  # culled splats (behind the near plane) get a dummy depth so that nothing
  # downstream (values or gradients) is inf/NaN
  in_front = tz_raw > near_plane
  tz = jnp.where(in_front, tz_raw, 1.0)
  fx, fy = Ks[..., None, 0, 0], Ks[..., None, 1, 1]
  cx, cy = Ks[..., None, 0, 2], Ks[..., None, 1, 2]
  tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
  lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
  lim_x_neg = cx / fx + 0.3 * tan_fovx
  lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
  lim_y_neg = cy / fy + 0.3 * tan_fovy
  tx_c = tz * jnp.clip(tx / tz, -lim_x_neg, lim_x_pos)
  ty_c = tz * jnp.clip(ty / tz, -lim_y_neg, lim_y_pos)
  zero = jnp.zeros_like(tz)
  J = jnp.stack([jnp.stack([fx / tz, zero, -fx * tx_c / tz ** 2], -1),
                 jnp.stack([zero, fy / tz, -fy * ty_c / tz ** 2], -1)], -2)   # [..., N, 2, 3]
  cov2d = J @ cov_c @ jnp.swapaxes(J, -1, -2)
  means2d = jnp.einsum("...ij,...j->...i", Ks[..., None, :2, :3], means_c) / tz[..., None]
  cov2d = cov2d + eps2d * jnp.eye(2, dtype=cov2d.dtype)
  det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
  det_raw = det
  det = jnp.maximum(det, 1e-10)
  conics = jnp.stack([cov2d[..., 1, 1] / det,
                      -(cov2d[..., 0, 1] + cov2d[..., 1, 0]) / 2.0 / det,
                      cov2d[..., 0, 0] / det], -1)
  diag = jnp.stack([cov2d[..., 0, 0], cov2d[..., 1, 1]], -1)
  radii = jax.lax.stop_gradient(jnp.ceil(3.33 * jnp.sqrt(jnp.maximum(diag, 0.0))))
  valid = (det_raw > 0) & in_front & (tz_raw < far_plane)
  inside = ((means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
            & (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height))
  radii = jnp.where(jax.lax.stop_gradient(valid & inside)[..., None], radii, 0.0)
  return dict(means2d=means2d, depths=tz_raw, conics=conics, radii=radii)


def gaussian_alpha(prim, pixels):
  """prim: dict of [B, ...] (means2d, conics, opacities, colors, depths);
  pixels [P, 2]. Returns alpha [B, P] and features [B, P, 4] = (r, g, b, depth)."""
  d = pixels[None] - prim["means2d"][:, None, :]                          # [B, P, 2]
  c = prim["conics"][:, None, :]
  sigma = (0.5 * (c[..., 0] * d[..., 0] ** 2 + c[..., 2] * d[..., 1] ** 2)
           + c[..., 1] * d[..., 0] * d[..., 1])
  alpha = jnp.minimum(0.999, prim["opacities"][:, None] * jnp.exp(-jnp.maximum(sigma, 0.0)))
  alpha = jnp.where((sigma >= 0) & (alpha >= tiles.ALPHA_THRESHOLD), alpha, 0.0)
  b, p = alpha.shape
  feats = jnp.concatenate([jnp.broadcast_to(prim["colors"][:, None], (b, p, 3)),
                           jnp.broadcast_to(prim["depths"][:, None, None], (b, p, 1))], -1)
  return alpha, feats


def _render_one_view(means, quats, scales, opacities, colors, viewmat, K, background, *,
                     grid, eps2d, near_plane, far_plane, budget, block_size, backend):
  proj = project_gaussians(means, quats, scales, viewmat, K, grid.width, grid.height,
                           eps2d, near_plane, far_plane)
  tmin, tmax, active = tiles.gaussian_tile_rect(grid, proj["means2d"], proj["radii"])
  if backend == "native":
    prims = jnp.concatenate([proj["means2d"], proj["conics"], opacities[:, None], colors,
                             proj["depths"][:, None]], -1)
    feats, trans, counts = native_ops.composite(
        "gaussian", grid, prims.astype(jnp.float32), proj["depths"].astype(jnp.float32),
        tiles.tile_rects(tmin, tmax, active))
    overflow = jnp.zeros((), jnp.int32)
  else:
    bins = tiles.bin_to_tiles(grid, tmin, tmax, active, proj["depths"], budget)
    tiles.check_overflow(bins.overflow)
    prim = dict(means2d=proj["means2d"], conics=proj["conics"], opacities=opacities,
                colors=colors, depths=proj["depths"])
    feats, trans = tiles.composite_tiles(grid, bins, prim, gaussian_alpha,
                                         tiles.GAUSSIAN_LAYOUT.features, block_size)
    counts, overflow = bins.counts, bins.overflow
  alpha = 1.0 - trans
  color = feats[..., :3] + trans[..., None] * background
  depth = jnp.where(alpha > 0, feats[..., 3] / jnp.where(alpha > 0, alpha, 1.0), 0.0)
  return dict(color=color, alpha=alpha, depth=depth, overflow=overflow,
              max_tile_count=jnp.max(counts))


def _count_one_view(means, quats, scales, opacities, colors, viewmat, K, background, *,
                    grid, eps2d, near_plane, far_plane):
  """(tile intersections, busiest tile's count) of one view: the binning's first pass."""
  proj = project_gaussians(means, quats, scales, viewmat, K, grid.width, grid.height,
                           eps2d, near_plane, far_plane)
  counts = tiles.tile_counts(grid, *tiles.gaussian_tile_rect(grid, proj["means2d"],
                                                             proj["radii"]))
  return jnp.sum(counts), jnp.max(counts)


@functools.partial(jax.jit, static_argnames=("grid", "eps2d", "near_plane", "far_plane"))
def count_intersections(gaussians, viewmats, Ks, *, grid, eps2d=EPS2D, near_plane=0.01,
                        far_plane=1e10):
  """(intersections [...], busiest tile's count [...]) per view, as rendered."""
  return views.render_gaussian_views(_count_one_view, gaussians, viewmats, Ks, None, grid=grid,
                                     eps2d=eps2d, near_plane=near_plane, far_plane=far_plane)


@functools.partial(jax.jit, static_argnames=("grid", "eps2d", "near_plane", "far_plane",
                                             "budget", "block_size", "backend"))
def _rasterize(gaussians, viewmats, Ks, background, **kwargs):
  return views.render_gaussian_views(_render_one_view, gaussians, viewmats, Ks, background,
                                     **kwargs)


def rasterize_gaussians(gaussians: Gaussians, viewmats, Ks, width: int, height: int,
                        background=None, *, eps2d: float = EPS2D, near_plane: float = 0.01,
                        far_plane: float = 1e10, tile_size: int = 16,
                        block_size: int = 16, intersection_budget=None,
                        backend: str | None = None):
  """Render 3D Gaussians (EWA splatting, SH degree 0 colours).

  gaussians: `Gaussians` [g..., N, *]; viewmats [c..., 4, 4] world-to-camera
  (OpenCV); Ks [c..., 3, 3]; background [..., 3] or None (black). Batch axes
  are aligned from the left (see `rasterize_surfels`).
  Returns dict: color [..., H, W, 3], alpha [..., H, W], depth [..., H, W]
  (expected centre depth, divided by alpha, 0 where alpha == 0), overflow [...]
  (always 0: nothing is dropped) and max_tile_count [...] (see
  `rasterize_surfels`, also for the binning, `intersection_budget` and `backend`).
  """
  grid = tiles.TileGrid(width, height, tile_size)
  backend = native.resolve(backend, jnp.asarray(gaussians.means).dtype)
  budget = None
  if backend == "reference":
    count = functools.partial(count_intersections, grid=grid, eps2d=eps2d,
                              near_plane=near_plane, far_plane=far_plane)
    budget = tiles.plan_budget(intersection_budget, count, jnp.shape(gaussians.means)[-2], grid,
                               gaussians, viewmats, Ks)
  return _rasterize(gaussians, viewmats, Ks, background, grid=grid, eps2d=eps2d,
                    near_plane=near_plane, far_plane=far_plane, budget=budget,
                    block_size=block_size, backend=backend)
