"""3D Gaussian Splatting `.ply` files (the graphdeco/INRIA layout read by 3DGS viewers),
written and read through `plyfile`.

One `vertex` element, all properties float32, binary little-endian, in this order:
  x y z                      position
  nx ny nz                   zeros (unused normals)
  f_dc_0 f_dc_1 f_dc_2       SH degree-0 coefficients (colour = SH_C0 * f_dc + 0.5)
  f_rest_0 .. f_rest_{3K-1}  higher SH coefficients, channel-major (all of R, then G,
                             then B); K = (degree+1)^2 - 1, zeros for degree-0 sets
  opacity                    logit of the opacity
  scale_0 scale_1 scale_2    log of the standard deviations
  rot_0 rot_1 rot_2 rot_3    quaternion (w, x, y, z), not necessarily normalised
"""

import dataclasses
import pathlib
from typing import Optional

import numpy as np
import plyfile

SH_C0 = 0.28209479177387814


@dataclasses.dataclass
class GaussianPly:
  """Activated values (as a renderer uses them), NumPy, N Gaussians.

  means [N, 3]; f_dc [N, 3]; sh_rest [N, K, 3]; opacities [N] in (0, 1);
  scales [N, 3] > 0; quats [N, 4] (w, x, y, z).
  """
  means: np.ndarray
  f_dc: np.ndarray
  sh_rest: np.ndarray
  opacities: np.ndarray
  scales: np.ndarray
  quats: np.ndarray

  @property
  def colors(self) -> np.ndarray:
    """[N, 3] SH degree-0 colour, clamped at 0 like the 3DGS rasterizer."""
    return np.maximum(SH_C0 * self.f_dc + 0.5, 0.0)


def property_names(num_rest: int = 15) -> list:
  """The standard 3DGS vertex property names for `num_rest` higher SH coefficients
  per channel (15 = degree 3, the layout viewers expect)."""
  return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
          + [f"f_rest_{i}" for i in range(3 * num_rest)]
          + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def _logit(p):
  p = np.clip(np.asarray(p, np.float64), 1e-7, 1.0 - 1e-7)
  return np.log(p / (1.0 - p))


def write_gaussian_ply(path, means, scales, quats, opacities, colors=None, f_dc=None,
                       sh_rest=None, num_rest: int = 15) -> pathlib.Path:
  """Write N Gaussians. means [N, 3]; scales [N, 3] (std devs, > 0); quats [N, 4] wxyz;
  opacities [N] or [N, 1] in (0, 1); either `f_dc` [N, 3] or `colors` [N, 3] (RGB,
  converted with f_dc = (c - 0.5) / SH_C0); optional sh_rest [N, K, 3] (K <= num_rest,
  padded with zeros to num_rest)."""
  path = pathlib.Path(path)
  means = _rows(means, 3, "means")
  n = means.shape[0]
  scales, quats = _rows(scales, 3, "scales", n), _rows(quats, 4, "quats", n)
  opacities = np.asarray(opacities, np.float64).reshape(-1)
  if opacities.shape[0] != n:
    raise ValueError(f"opacities must have {n} entries, got {opacities.shape[0]}")
  if not np.all(np.isfinite(opacities)):
    raise ValueError("opacities contain NaN or infinite values: nothing is written")
  if (f_dc is None) == (colors is None):
    raise ValueError("pass exactly one of f_dc and colors")
  f_dc = _rows(f_dc, 3, "f_dc", n) if f_dc is not None else (
      (_rows(colors, 3, "colors", n) - 0.5) / SH_C0)
  if np.any(scales <= 0):
    raise ValueError("scales must be positive standard deviations (they are stored as logs)")
  rest = np.zeros((n, num_rest, 3))
  if sh_rest is not None:
    sh_rest = np.asarray(sh_rest, np.float64)
    if sh_rest.ndim != 3 or sh_rest.shape[0] != n or sh_rest.shape[2] != 3 or sh_rest.shape[1] > num_rest:
      raise ValueError(f"sh_rest must be [{n}, K<={num_rest}, 3], got {sh_rest.shape}")
    rest[:, :sh_rest.shape[1]] = sh_rest
  columns = [means, np.zeros((n, 3)), f_dc,
             rest.transpose(0, 2, 1).reshape(n, 3 * num_rest),   # channel-major
             _logit(opacities)[:, None], np.log(scales), quats]
  data = np.concatenate(columns, axis=1).astype("<f4")
  vertex = np.ascontiguousarray(data).view([(name, "<f4") for name in property_names(num_rest)])
  path.parent.mkdir(parents=True, exist_ok=True)
  plyfile.PlyData([plyfile.PlyElement.describe(vertex.reshape(n), "vertex")],
                  byte_order="<").write(str(path))
  return path


def _rows(a, width, name, n=None):
  a = np.asarray(a, np.float64)
  if a.ndim != 2 or a.shape[1] != width or (n is not None and a.shape[0] != n):
    want = f"[{n if n is not None else 'N'}, {width}]"
    raise ValueError(f"{name} must be {want}, got {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} contain NaN or infinite values: nothing is written")
  return a


def read_gaussian_ply(path) -> GaussianPly:
  """Read a 3DGS .ply (binary little/big endian or ascii; vertex element with the
  standard property names, in any order, any number of f_rest_*)."""
  path = pathlib.Path(path)
  try:
    ply = plyfile.PlyData.read(str(path))
  except (plyfile.PlyParseError, ValueError, UnicodeDecodeError) as err:
    raise ValueError(f"{path}: not a readable PLY file ({err})") from None
  if not ply.elements or ply.elements[0].name != "vertex":
    raise ValueError(f"{path}: the first element must be 'vertex'")
  vertex = ply.elements[0]
  for prop in vertex.properties:
    if isinstance(prop, plyfile.PlyListProperty):
      raise ValueError(f"{path}: list property {prop.name!r} is not supported")
  n = vertex.count
  table = {prop.name: np.asarray(vertex.data[prop.name], np.float64)
           for prop in vertex.properties}

  def cols(*names):
    missing = [m for m in names if m not in table]
    if missing:
      raise ValueError(f"{path}: missing 3DGS properties {missing}")
    return np.stack([table[m] for m in names], -1)

  num_rest3 = len([k for k in table if k.startswith("f_rest_")])
  if num_rest3 % 3:
    raise ValueError(f"{path}: {num_rest3} f_rest_* properties is not a multiple of 3")
  rest = (cols(*[f"f_rest_{i}" for i in range(num_rest3)]) if num_rest3
          else np.zeros((n, 0))).reshape(n, 3, num_rest3 // 3)
  return GaussianPly(
      means=cols("x", "y", "z"),
      f_dc=cols("f_dc_0", "f_dc_1", "f_dc_2"),
      sh_rest=rest.transpose(0, 2, 1),
      opacities=1.0 / (1.0 + np.exp(-cols("opacity")[:, 0])),
      scales=np.exp(cols("scale_0", "scale_1", "scale_2")),
      quats=cols("rot_0", "rot_1", "rot_2", "rot_3"))


def write_gslrm_ply(path, output, index: int = 0, mask: Optional[np.ndarray] = None):
  """Write scene `index` of a `kaojax.models.gslrm.GSLRMOutput` (optionally only the
  Gaussians where mask [N] is true, e.g. `post_filter_mask`)."""
  keep = slice(None) if mask is None else np.asarray(mask, bool)
  take = lambda a: np.asarray(a)[index][keep]
  return write_gaussian_ply(path, take(output.xyz), take(output.scales),
                            take(output.rotations), take(output.opacities),
                            f_dc=take(output.f_dc))


def write_mesh_ply(path, vertices, faces) -> pathlib.Path:
  """A triangle mesh as a binary PLY (vertex x, y, z float32; face vertex_indices),
  the layout trimesh writes and reads. vertices [V, 3], faces [F, 3] (0-based)."""
  path = pathlib.Path(path)
  vertices = _rows(vertices, 3, "vertices")
  faces = np.asarray(faces, np.int64)
  if faces.ndim != 2 or faces.shape[1] != 3 or faces.size and (
      faces.min() < 0 or faces.max() >= len(vertices)):
    raise ValueError(f"faces must be [F, 3] indices below {len(vertices)}, got {faces.shape}")
  vertex = np.empty(len(vertices), [("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
  for i, axis in enumerate("xyz"):
    vertex[axis] = vertices[:, i]
  face = np.empty(len(faces), [("vertex_indices", "i4", (3,))])
  face["vertex_indices"] = faces
  path.parent.mkdir(parents=True, exist_ok=True)
  plyfile.PlyData([plyfile.PlyElement.describe(vertex, "vertex"),
                   plyfile.PlyElement.describe(face, "face")]).write(str(path))
  return path


SURFEL_THICKNESS_RATIO = 1e-3
MIN_SURFEL_SCALE = 1e-8


def write_surfel_ply(path, gaussians) -> pathlib.Path:
  """Write 2D Gaussian surfels (a `kaojax.render.Gaussians`, no batch axis: means
  [N, 3], quats [N, 4] wxyz, scales [N, 3] of which the first two are used, opacities
  [N], colors [N, 3] RGB in [0, 1]) as a standard 3DGS .ply (the layout of
  `write_gaussian_ply`), so that 3DGS viewers show each surfel as a thin disc.

  A surfel's two in-plane standard deviations are kept; its normal axis (the third
  column of the quaternion's rotation, where 2DGS has no extent) gets
  SURFEL_THICKNESS_RATIO (1e-3) times the larger in-plane one: thin enough that the
  disc's 3D covariance R diag(s0^2, s1^2, s2^2) R^T is the surfel's tangent-plane
  covariance up to a term a million times smaller, thick enough that the stored log
  scale stays an ordinary float. Every scale is floored at MIN_SURFEL_SCALE (1e-8 m),
  so a collapsed surfel (a scale activation underflowing to 0) keeps a finite log.
  Colours are written as SH degree-0 coefficients, f_dc = (c - 0.5) / SH_C0."""
  scales = np.asarray(gaussians.scales, np.float64)
  if scales.ndim != 2 or scales.shape[1] != 3:
    raise ValueError(f"gaussians.scales must be [N, 3] (no batch axis), got {scales.shape}")
  in_plane = scales[:, :2]
  thickness = SURFEL_THICKNESS_RATIO * np.max(in_plane, axis=1, keepdims=True)
  disc = np.maximum(np.concatenate([in_plane, thickness], 1), MIN_SURFEL_SCALE)
  return write_gaussian_ply(path, gaussians.means, disc, gaussians.quats,
                            gaussians.opacities, colors=gaussians.colors)
