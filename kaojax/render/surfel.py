"""2D Gaussian surfels (2DGS), pure JAX, following gsplat's 2DGS math.

Projection (per view): the ray transform T = K [R s_u, R s_v, mu_c] (rows
u_M, v_M, w_M) maps splat-plane coordinates (u, v, 1) to homogeneous pixels.
A pixel (x, y) (pixel centres at +0.5) hits the splat plane at
s = (h_u x h_v)[:2] / (h_u x h_v)[2] with h_u = x w_M - u_M, h_v = y w_M - v_M.
The kernel uses min(|s|^2, 2 |p - mean2d|^2) (gsplat's 3D/2D low-pass mix);
alpha = min(0.999, opacity exp(-kernel / 2)).

Outputs differ from gsplat in two documented ways (see tests/render/conventions):
- normals are the unit rotation column R_wl[:, 2] (gsplat's CUDA kernel; its
  PyTorch port multiplies by scales[2]);
- depth is the per-pixel intersection depth s_u w_M.x + s_v w_M.y + w_M.z, or the
  centre depth w_M.z where the 2D filter wins (as hbb1's diff-surfel-rasterization,
  the KaoLRM reference); gsplat composites the centre depth.
"""

import functools

import jax
import jax.numpy as jnp

from kaojax.geometry.rotations import quat_to_matrix
from kaojax.render import native, tiles, views
from kaojax.render.native import ops as native_ops
from kaojax.render.gaussians import Gaussians

FILTER_INV_SQUARE = 2.0


def project_surfels(means, quats, scales, viewmats, Ks, width: int, height: int,
                    near_plane: float = 0.01, far_plane: float = 1e10):
  """gsplat's 2DGS projection.

  means [..., N, 3], quats [..., N, 4] (wxyz), scales [..., N, 3] (first two used),
  viewmats [..., 4, 4] world-to-camera, Ks [..., 3, 3] (one camera per batch index;
  leading axes broadcast). Returns a dict:
    means2d [..., N, 2]   centre of the projected splat's bounding box (gsplat)
    depths  [..., N]      camera z of the centre
    ray_transforms [..., N, 3, 3]  rows u_M, v_M, w_M (K [R s_u, R s_v, mu_c])
    normals [..., N, 3]   unit normals in camera space, facing the camera
    radii   [..., N, 2]   pixel radii (integer-valued floats, 0 = culled)
  """
  R = viewmats[..., None, :3, :3]
  t = viewmats[..., None, :3, 3]
  means_c = jnp.einsum("...ij,...j->...i", R, means) + t                 # [..., N, 3]
  R_wl = quat_to_matrix(quats)                                             # [..., N, 3, 3]
  R_cl = R @ R_wl
  normals = R_cl[..., 2]
  facing = jnp.sum(-normals * means_c, -1, keepdims=True) > 0
  normals = jnp.where(facing, normals, -normals)
  T_cl = jnp.stack([R_cl[..., 0] * scales[..., 0:1], R_cl[..., 1] * scales[..., 1:2], means_c],
                   -1)                                                      # [..., N, 3, 3]
  T_sl = Ks[..., None, :, :] @ T_cl                                        # rows u_M, v_M, w_M
  u_M, v_M, w_M = T_sl[..., 0, :], T_sl[..., 1, :], T_sl[..., 2, :]
  test = jnp.array([1.0, 1.0, -1.0], means.dtype)
  d = jnp.sum(w_M * w_M * test, -1, keepdims=True)
  ok = d != 0
  f = jnp.where(ok, test / jnp.where(ok, d, 1.0), 0.0)                     # [..., N, 3]
  means2d = jnp.stack([jnp.sum(f * u_M * w_M, -1), jnp.sum(f * v_M * w_M, -1)], -1)
  second = jnp.stack([jnp.sum(f * u_M * u_M, -1), jnp.sum(f * v_M * v_M, -1)], -1)
  extents = jnp.sqrt(jnp.maximum(means2d ** 2 - second, 1e-4))
  depths = means_c[..., 2]
  radii = jax.lax.stop_gradient(jnp.ceil(3.33 * extents))
  valid = ok[..., 0] & (depths > near_plane) & (depths < far_plane)
  inside = ((means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
            & (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height))
  radii = jnp.where((valid & jax.lax.stop_gradient(inside))[..., None], radii, 0.0)
  return dict(means2d=means2d, depths=depths, ray_transforms=T_sl, normals=normals, radii=radii)


def surfel_alpha(prim, pixels):
  """Per (surfel, pixel) alpha and features for compositing.

  prim: dict of [B, ...] arrays (means2d, ray_transforms, opacities, colors,
  normals); pixels [P, 2] pixel-centre coordinates.
  Returns alpha [B, P] (0 where gsplat skips) and features [B, P, 7]
  = (r, g, b, depth, nx, ny, nz).
  """
  M = prim["ray_transforms"][:, None]                                     # [B, 1, 3, 3]
  px = pixels[None, :, 0:1]
  py = pixels[None, :, 1:2]
  h_u = px * M[..., 2, :] - M[..., 0, :]                                  # [B, P, 3]
  h_v = py * M[..., 2, :] - M[..., 1, :]
  c = jnp.cross(h_u, h_v)
  hit = c[..., 2] != 0
  cz = jnp.where(hit, c[..., 2], 1.0)
  s_u, s_v = c[..., 0] / cz, c[..., 1] / cz
  rho3d = s_u * s_u + s_v * s_v
  delta = prim["means2d"][:, None, :] - pixels[None]
  rho2d = FILTER_INV_SQUARE * jnp.sum(delta * delta, -1)
  use_3d = rho3d <= rho2d
  sigma = 0.5 * jnp.minimum(rho3d, rho2d)
  alpha = jnp.minimum(0.999, prim["opacities"][:, None] * jnp.exp(-jnp.maximum(sigma, 0.0)))
  keep = hit & (sigma >= 0) & (alpha >= tiles.ALPHA_THRESHOLD)
  alpha = jnp.where(keep, alpha, 0.0)
  w_M = M[..., 2, :]
  depth = jnp.where(use_3d, s_u * w_M[..., 0] + s_v * w_M[..., 1] + w_M[..., 2], w_M[..., 2])
  b, p = alpha.shape
  feats = jnp.concatenate([
      jnp.broadcast_to(prim["colors"][:, None], (b, p, 3)),
      depth[..., None],
      jnp.broadcast_to(prim["normals"][:, None], (b, p, 3)),
  ], -1)
  return alpha, feats


def _render_one_view(means, quats, scales, opacities, colors, viewmat, K, background, *,
                     grid, near_plane, far_plane, budget, block_size, backend):
  proj = project_surfels(means, quats, scales, viewmat, K, grid.width, grid.height,
                         near_plane, far_plane)
  tmin, tmax, active = tiles.gaussian_tile_rect(grid, proj["means2d"], proj["radii"])
  if backend == "native":
    prims = jnp.concatenate([proj["means2d"], proj["ray_transforms"].reshape(-1, 9),
                             opacities[:, None], colors, proj["normals"]], -1)
    feats, trans, counts = native_ops.composite(
        "surfel", grid, prims.astype(jnp.float32), proj["depths"].astype(jnp.float32),
        tiles.tile_rects(tmin, tmax, active))
    overflow = jnp.zeros((), jnp.int32)
  else:
    bins = tiles.bin_to_tiles(grid, tmin, tmax, active, proj["depths"], budget)
    tiles.check_overflow(bins.overflow)
    prim = dict(means2d=proj["means2d"], ray_transforms=proj["ray_transforms"],
                opacities=opacities, colors=colors, normals=proj["normals"])
    feats, trans = tiles.composite_tiles(grid, bins, prim, surfel_alpha,
                                         tiles.SURFEL_LAYOUT.features, block_size)
    counts, overflow = bins.counts, bins.overflow
  alpha = 1.0 - trans
  color = feats[..., :3] + trans[..., None] * background
  depth = jnp.where(alpha > 0, feats[..., 3] / jnp.where(alpha > 0, alpha, 1.0), 0.0)
  return dict(color=color, alpha=alpha, depth=depth, normal=feats[..., 4:7],
              overflow=overflow, max_tile_count=jnp.max(counts))


def _count_one_view(means, quats, scales, opacities, colors, viewmat, K, background, *,
                    grid, near_plane, far_plane):
  """(tile intersections, busiest tile's count) of one view: the binning's first pass."""
  proj = project_surfels(means, quats, scales, viewmat, K, grid.width, grid.height,
                         near_plane, far_plane)
  counts = tiles.tile_counts(grid, *tiles.gaussian_tile_rect(grid, proj["means2d"],
                                                             proj["radii"]))
  return jnp.sum(counts), jnp.max(counts)


@functools.partial(jax.jit, static_argnames=("grid", "near_plane", "far_plane"))
def count_intersections(gaussians, viewmats, Ks, *, grid, near_plane=0.01, far_plane=1e10):
  """(intersections [...], busiest tile's count [...]) per view, as rendered."""
  return views.render_gaussian_views(_count_one_view, gaussians, viewmats, Ks, None, grid=grid,
                                     near_plane=near_plane, far_plane=far_plane)


@functools.partial(jax.jit, static_argnames=("grid", "near_plane", "far_plane", "budget",
                                             "block_size", "backend"))
def _rasterize(gaussians, viewmats, Ks, background, **kwargs):
  return views.render_gaussian_views(_render_one_view, gaussians, viewmats, Ks, background,
                                     **kwargs)


def rasterize_surfels(gaussians: Gaussians, viewmats, Ks, width: int, height: int,
                      background=None, *, near_plane: float = 0.01, far_plane: float = 1e10,
                      tile_size: int = 16, block_size: int = 16,
                      intersection_budget=None, backend: str | None = None):
  """Render 2D Gaussian surfels.

  gaussians: `Gaussians` with means [g..., N, 3] etc. (scales[..., 2] ignored)
  viewmats: [c..., 4, 4] world-to-camera (OpenCV), Ks: [c..., 3, 3] pixels
  background: [..., 3] colour (broadcast against the output batch), None = black
  Batch axes of Gaussians and cameras are aligned from the left (gsplat layout:
  Gaussians [B, N, *] with cameras [B, C, 4, 4] give [B, C, H, W, *]).
  Returns dict:
    color [..., H, W, 3]   sum_i w_i c_i + T background
    alpha [..., H, W]      1 - T
    depth [..., H, W]      sum_i w_i z_i / alpha (0 where alpha == 0), z_i the
                           ray-surfel intersection depth (centre depth where the
                           2D filter wins)
    normal [..., H, W, 3]  sum_i w_i n_i (camera space, facing the camera; not
                           normalised, as gsplat / diff-surfel-rasterization)
    overflow [...] int32   always 0: nothing is dropped (kept for callers)
    max_tile_count [...]   largest number of surfels covering one tile
  Tiling (gsplat's, no per-tile cap): every surfel is expanded into its (tile,
  depth) intersections, sorted once; each tile_size^2 tile composites its whole
  range front to back (see kaojax/render/tiles.py). The pure-JAX path needs a static intersection budget: counted
  exactly and rounded up to a power of two when the inputs are concrete, the worst
  case (every surfel on every tile) inside a caller's jit/vmap/grad, or
  `intersection_budget` (an int per view, or a `tiles.Budget`), which raises at run
  time when too small. `block_size` surfels are composited per scan step (a
  checkpointed step: backward memory is one carry per block; the pure-JAX path
  only).
  backend: "native" (C++/CUDA kernels through XLA FFI), "reference" (pure
  JAX), "auto" or None (the process default, see kaojax.render.native). Both
  paths give the same images and gradients.
  """
  grid = tiles.TileGrid(width, height, tile_size)
  backend = native.resolve(backend, jnp.asarray(gaussians.means).dtype)
  budget = None
  if backend == "reference":
    count = functools.partial(count_intersections, grid=grid, near_plane=near_plane,
                              far_plane=far_plane)
    budget = tiles.plan_budget(intersection_budget, count, jnp.shape(gaussians.means)[-2], grid,
                               gaussians, viewmats, Ks)
  return _rasterize(gaussians, viewmats, Ks, background, grid=grid, near_plane=near_plane,
                    far_plane=far_plane, budget=budget, block_size=block_size, backend=backend)
