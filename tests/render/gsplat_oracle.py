"""Oracles for the splatting renderers, built from gsplat's pure-PyTorch code.

`gsplat/cuda/_torch_impl.py` and `_torch_impl_2dgs.py` give the projection and
the tile intersection lists; the per-pixel compositing below is written here
from gsplat's formulas (its own compositor needs CUDA / nerfacc): every Gaussian
binned to the pixel's tile, in depth order, alpha = min(0.999, o exp(-sigma)),
skipped when alpha < 1/255 or sigma < 0, stop (exclusive) when T would drop to
<= 1e-4.

`to_kaojax_conventions` is THE list of convention differences between gsplat
and kaojax.render; every test comparing the two goes through it.
"""

import os

os.environ.setdefault("CUDA_HOME", "/nonexistent")  # before gsplat: no JIT CUDA build

import numpy as np
import torch

from gsplat.cuda import _torch_impl as gs3d  # noqa: E402
from gsplat.cuda import _torch_impl_2dgs as gs2d  # noqa: E402

TILE_SIZE = 16


def to_kaojax_conventions(kind: str, gsplat_out: dict, scales=None) -> dict:
  """Map gsplat projection outputs to what kaojax.render computes.

  Differences (everything else is identical: OpenCV world-to-camera viewmats,
  wxyz quaternions normalised inside, pixel centres at +0.5, tile size 16,
  near 0.01, eps2d 0.3, radii ceil(3.33 extent), ALPHA_THRESHOLD 1/255,
  alpha cap 0.999, exclusive stop at T <= 1e-4, FILTER_INV_SQUARE 2):
  1. Layout: gsplat returns radii as int32 [.., 2]; kaojax keeps integer-valued
     floats (0 = culled). Compare as float.
  2. 2DGS normals: gsplat's PyTorch port returns R_c[:, 2] * scales[2]; its CUDA
     kernel (and kaojax) uses the unit column R_c[:, 2]. Divide by |scales[2]|
     (sign kept: both flip the normal to face the camera afterwards).
  3. 2DGS expected depth: gsplat composites the splat-centre depth; kaojax (like
     hbb1's diff-surfel-rasterization used by KaoLRM) composites the per-pixel
     ray-splat intersection depth s_u w_M.x + s_v w_M.y + w_M.z, or w_M.z where the
     2D low-pass filter wins (see `dense_composite`).
  4. gsplat zeroes ray transforms / conics of culled splats only in its CUDA
     kernels; kaojax (like the PyTorch port) keeps them: compare only where the
     radius is positive.
  5. Depth output is divided by alpha (gsplat's "ED" mode); 0 where alpha == 0.
  6. 3DGS culling: gsplat's PyTorch port clamps det(cov2d + eps2d I) to 1e-10
     before its det > 0 test (so never culls on it); kaojax culls det <= 0 like
     gsplat's CUDA kernel. With eps2d = 0.3 added to a PSD covariance this only
     differs for degenerate input.
  7. 3DGS radii: the 3.33-sigma box of gsplat's PyTorch port. gsplat's CUDA
     kernel also shrinks it by opacity (sqrt(2 log(o / (1/255))) sigmas); that
     only removes pixels where alpha < 1/255, which are skipped anyway, so the
     images agree; only tile lists (and `max_tile_count`) can be longer here.
  8. Output dict names: color / alpha / depth / normal, alpha without the
     trailing channel axis.
  """
  out = {k: np.asarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v)
         for k, v in gsplat_out.items()}
  out["radii"] = out["radii"].astype(np.float64)
  if kind == "2dgs":
    s_z = np.asarray(scales)[..., 2]
    out["normals"] = out["normals"] / np.abs(s_z)[..., None]
  return out


def project_2dgs(means, quats, scales, viewmats, Ks, width, height):
  """gsplat `_fully_fused_projection_2dgs` on numpy inputs (gsplat layout:
  means [..., N, 3], viewmats [..., C, 4, 4]) -> dict of numpy arrays."""
  t = lambda a: torch.as_tensor(np.asarray(a, np.float32))
  radii, means2d, depths, M, normals = gs2d._fully_fused_projection_2dgs(
      t(means), t(quats), t(scales), t(viewmats), t(Ks), width, height)
  raw = dict(radii=radii, means2d=means2d, depths=depths, ray_transforms=M, normals=normals)
  return to_kaojax_conventions("2dgs", raw, scales=np.asarray(scales)[..., None, :, :])


def project_3dgs(means, quats, scales, viewmats, Ks, width, height):
  """gsplat `_fully_fused_projection` (eps2d 0.3, near 0.01) -> dict of numpy."""
  t = lambda a: torch.as_tensor(np.asarray(a, np.float32))
  covars, _ = gs3d._quat_scale_to_covar_preci(t(quats), t(scales), compute_preci=False)
  radii, means2d, depths, conics, _ = gs3d._fully_fused_projection(
      t(means), covars, t(viewmats), t(Ks), width, height)
  raw = dict(radii=radii, means2d=means2d, depths=depths, conics=conics)
  return to_kaojax_conventions("3dgs", raw)


def tile_membership(means2d, radii, depths, width, height):
  """gsplat `_isect_tiles` -> bool [I, tiles, N] (which splats each tile lists)."""
  tw, th = -(-width // TILE_SIZE), -(-height // TILE_SIZE)
  I, N = means2d.shape[0], means2d.shape[1]
  _, isect_ids, flatten_ids = gs3d._isect_tiles(
      torch.as_tensor(means2d, dtype=torch.float32), torch.as_tensor(radii, dtype=torch.float32),
      torch.as_tensor(depths, dtype=torch.float32), TILE_SIZE, tw, th)
  member = np.zeros((I, tw * th, N), bool)
  tile_n_bits = (tw * th).bit_length()
  hi = (isect_ids >> 32).numpy()
  image = hi >> tile_n_bits
  tile = hi & ((1 << tile_n_bits) - 1)
  flat = flatten_ids.numpy()
  member[image, tile, flat % N] = True
  return member


def keep_nearest(member, depths, capacity):
  """Restrict tile lists member [I, tiles, N] to their `capacity` nearest splats
  (depths [I, N]) - what a capped renderer keeps."""
  out = np.zeros_like(member)
  for i in range(member.shape[0]):
    for t in range(member.shape[1]):
      ids = np.nonzero(member[i, t])[0]
      ids = ids[np.argsort(depths[i, ids], kind="stable")][:capacity]
      out[i, t, ids] = True
  return out


def dense_composite(kind, proj, opacities, colors, width, height, background, member=None):
  """Dense front-to-back compositor from gsplat's formulas.

  kind: "2dgs" or "3dgs"; proj: flattened views, arrays [I, N, ...];
  opacities [I, N], colors [I, N, 3], background [I, 3].
  Returns color [I, H, W, 3], alpha [I, H, W], depth [I, H, W], (2dgs)
  normal [I, H, W, 3] and `ambiguous` [I, H, W]: pixels where a splat's alpha
  lies within 0.1% of the 1/255 cut or a transmittance within 0.1% of the 1e-4
  stop, so float32 rounding (not the method) decides whether it is composited.
  float32 throughout, sequential over depth-sorted splats.
  """
  I, N = opacities.shape
  if member is None:
    member = tile_membership(proj["means2d"], proj["radii"], proj["depths"], width, height)
  tw = -(-width // TILE_SIZE)
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  tile_of_pixel = ((ys // TILE_SIZE) * tw + xs // TILE_SIZE).reshape(-1)
  px = (xs.reshape(-1) + 0.5).astype(np.float32)
  py = (ys.reshape(-1) + 0.5).astype(np.float32)
  f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
  px, py = f32(px), f32(py)
  outs = {k: [] for k in ("color", "alpha", "depth", "normal", "ambiguous")}
  for i in range(I):
    order = np.argsort(proj["depths"][i], kind="stable")
    T = torch.ones(px.shape)
    done = torch.zeros(px.shape, dtype=torch.bool)
    color = torch.zeros(px.shape + (3,))
    depth = torch.zeros(px.shape)
    normal = torch.zeros(px.shape + (3,))
    ambiguous = torch.zeros(px.shape, dtype=torch.bool)
    for g in order:
      if not np.all(proj["radii"][i, g] > 0):
        continue
      listed = f32(member[i, tile_of_pixel, g]) > 0
      mean2d = f32(proj["means2d"][i, g])
      dx, dy = px - mean2d[0], py - mean2d[1]
      if kind == "2dgs":
        M = f32(proj["ray_transforms"][i, g])
        h_u = -M[0][None] + M[2][None] * px[:, None]
        h_v = -M[1][None] + M[2][None] * py[:, None]
        cr = torch.cross(h_u, h_v, dim=-1)
        ok = cr[:, 2] != 0
        us = cr[:, 0] / torch.where(ok, cr[:, 2], torch.ones_like(cr[:, 2]))
        vs = cr[:, 1] / torch.where(ok, cr[:, 2], torch.ones_like(cr[:, 2]))
        s3 = us ** 2 + vs ** 2
        s2 = 2.0 * (dx ** 2 + dy ** 2)
        sigma = 0.5 * torch.minimum(s3, s2)
        z = torch.where(s3 <= s2, us * M[2, 0] + vs * M[2, 1] + M[2, 2], M[2, 2])
      else:
        c = f32(proj["conics"][i, g])
        sigma = 0.5 * (c[0] * dx ** 2 + c[2] * dy ** 2) + c[1] * dx * dy
        ok = torch.ones_like(listed)
        z = torch.full_like(px, float(proj["depths"][i, g]))
      alpha = torch.clamp_max(float(opacities[i, g]) * torch.exp(-sigma), 0.999)
      use = listed & ok & ~done & (sigma >= 0) & (alpha >= 1.0 / 255.0)
      next_T = T * (1.0 - alpha)
      live = listed & ok & ~done & (sigma >= 0)
      ambiguous |= live & (torch.abs(alpha * 255.0 - 1.0) < 1e-3)
      ambiguous |= live & (alpha >= 1.0 / 255.0) & (torch.abs(next_T * 1e4 - 1.0) < 1e-3)
      stop = use & (next_T <= 1e-4)
      done = done | stop
      use = use & ~stop
      w = torch.where(use, alpha * T, torch.zeros_like(T))
      color += w[:, None] * f32(colors[i, g])[None]
      depth += w * z
      if kind == "2dgs":
        normal += w[:, None] * f32(proj["normals"][i, g])[None]
      T = torch.where(use, next_T, T)
    a = 1.0 - T
    outs["color"].append(color + T[:, None] * f32(background[i])[None])
    outs["alpha"].append(a)
    outs["depth"].append(torch.where(a > 0, depth / torch.where(a > 0, a, torch.ones_like(a)),
                                     torch.zeros_like(a)))
    outs["normal"].append(normal)
    outs["ambiguous"].append(ambiguous)
  shape = (I, height, width)
  res = {k: torch.stack(v).numpy().reshape(shape + ((3,) if k in ("color", "normal") else ()))
         for k, v in outs.items()}
  if kind != "2dgs":
    del res["normal"]
  return res
