"""A dense front-to-back compositor in float64 (numpy), written from gsplat's
formulas, for checking the tiled renderers: every pixel composites every splat
whose tile rectangle covers the pixel's tile (gsplat's rectangle: floor / ceil of
(mean -+ radius) / tile_size), in (depth, index) order, with gsplat's rules:
alpha = min(0.999, o exp(-sigma)), skipped when alpha < 1/255 or sigma < 0, stop
(exclusive) when T would drop to <= 1e-4. No tiles, no lists, no cap: what an exact
renderer must give.

Inputs are one view's projection (the renderer's own, so that only binning and
compositing are compared) and optionally a sample of pixels.
"""

import numpy as np

ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4


def tile_rects(means2d, radii, width, height, tile_size=16):
  """gsplat's tile rectangles [N, 4] (x0, y0, x1, y1), upper corner exclusive;
  empty for culled splats (a zero radius)."""
  tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
  lo = np.floor((means2d - radii) / tile_size)
  hi = np.ceil((means2d + radii) / tile_size)
  rect = np.concatenate([np.clip(lo[:, 0:1], 0, tiles_x), np.clip(lo[:, 1:2], 0, tiles_y),
                         np.clip(hi[:, 0:1], 0, tiles_x), np.clip(hi[:, 1:2], 0, tiles_y)], 1)
  live = np.all(radii > 0, -1)
  return np.where(live[:, None], rect, 0).astype(np.int64)


def tile_members(rects, tx, ty):
  """Which splats list tile (tx, ty): rects [N, 4] -> bool [N]."""
  return (rects[:, 0] <= tx) & (tx < rects[:, 2]) & (rects[:, 1] <= ty) & (ty < rects[:, 3])


def _sigma_and_depth(kind, proj, ids, px, py):
  """sigma [P, K], hit [P, K], per-pixel depth [P, K] of splats `ids` at pixels."""
  dx = px[:, None] - proj["means2d"][ids, 0][None]
  dy = py[:, None] - proj["means2d"][ids, 1][None]
  if kind == "gaussian3d":
    c = proj["conics"][ids]
    sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
    depth = np.broadcast_to(proj["depths"][ids][None], sigma.shape)
    return sigma, np.ones(sigma.shape, bool), depth
  M = proj["ray_transforms"][ids]                                  # [K, 3, 3]
  u, v, w = M[:, 0][None], M[:, 1][None], M[:, 2][None]            # [1, K, 3]
  h_u = px[:, None, None] * w - u
  h_v = py[:, None, None] * w - v
  cross = np.cross(h_u, h_v)
  hit = cross[..., 2] != 0
  cz = np.where(hit, cross[..., 2], 1.0)
  s_u, s_v = cross[..., 0] / cz, cross[..., 1] / cz
  rho3d = s_u ** 2 + s_v ** 2
  rho2d = 2.0 * (dx * dx + dy * dy)
  sigma = 0.5 * np.minimum(rho3d, rho2d)
  depth = np.where(rho3d <= rho2d, s_u * w[..., 0] + s_v * w[..., 1] + w[..., 2], w[..., 2])
  return sigma, hit, depth


def composite(kind, proj, opacities, colors, width, height, pixels=None, tile_size=16):
  """Dense compositing of one view in float64.

  kind: "surfel" or "gaussian3d"; proj: the renderer's projection of the view
  (means2d [N, 2], radii [N, 2], depths [N], conics [N, 3] or ray_transforms
  [N, 3, 3] and normals [N, 3]); opacities [N]; colors [N, 3]; pixels: [P, 2] int
  (x, y), default every pixel row by row.
  Returns dict over the pixels: color [P, 3] (black background), alpha [P],
  depth [P] (divided by alpha, 0 where alpha == 0), normal [P, 3] (surfels),
  ambiguous [P] (a splat's alpha within 0.01% of the 1/255 cut or a
  transmittance within 0.1% of the 1e-4 stop: float32 rounding decides there).
  """
  proj = {k: np.asarray(v, np.float64) for k, v in proj.items()}
  opacities = np.asarray(opacities, np.float64)
  colors = np.asarray(colors, np.float64)
  if pixels is None:
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([xs.reshape(-1), ys.reshape(-1)], -1)
  pixels = np.asarray(pixels)
  rects = tile_rects(proj["means2d"], proj["radii"], width, height, tile_size)
  out = {"color": np.zeros((len(pixels), 3)), "alpha": np.zeros(len(pixels)),
         "depth": np.zeros(len(pixels)), "normal": np.zeros((len(pixels), 3)),
         "ambiguous": np.zeros(len(pixels), bool)}
  tile_of = (pixels[:, 1] // tile_size) * 10**6 + pixels[:, 0] // tile_size
  for key in np.unique(tile_of):
    sel = np.nonzero(tile_of == key)[0]
    ty, tx = divmod(int(key), 10**6)
    ids = np.nonzero(tile_members(rects, tx, ty))[0]
    ids = ids[np.lexsort((ids, proj["depths"][ids]))]              # (depth, index) order
    px = pixels[sel, 0] + 0.5
    py = pixels[sel, 1] + 0.5
    sigma, hit, depth = _sigma_and_depth(kind, proj, ids, px, py)
    alpha = np.minimum(0.999, opacities[ids][None] * np.exp(-sigma))
    live = hit & (sigma >= 0)
    use_all = live & (alpha >= ALPHA_MIN)
    T = np.ones(len(sel))
    done = np.zeros(len(sel), bool)
    acc = np.zeros((len(sel), 3))
    acc_d = np.zeros(len(sel))
    acc_n = np.zeros((len(sel), 3))
    ambiguous = np.zeros(len(sel), bool)
    for k, g in enumerate(ids):
      a = alpha[:, k]
      ambiguous |= live[:, k] & ~done & (np.abs(a / ALPHA_MIN - 1.0) < 1e-4)
      use = use_all[:, k] & ~done
      nxt = T * (1.0 - a)
      ambiguous |= use & (np.abs(nxt / T_MIN - 1.0) < 1e-3)
      stop = use & (nxt <= T_MIN)
      done |= stop
      use &= ~stop
      w = np.where(use, a * T, 0.0)
      acc += w[:, None] * colors[g]
      acc_d += w * depth[:, k]
      if kind == "surfel":
        acc_n += w[:, None] * proj["normals"][g]
      T = np.where(use, nxt, T)
    a = 1.0 - T
    out["color"][sel] = acc
    out["alpha"][sel] = a
    out["depth"][sel] = np.where(a > 0, acc_d / np.where(a > 0, a, 1.0), 0.0)
    out["normal"][sel] = acc_n
    out["ambiguous"][sel] = ambiguous
  if kind != "surfel":
    del out["normal"]
  return out
