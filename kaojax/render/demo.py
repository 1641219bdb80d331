"""Visual check of the renderers on a FLAME head.

  python -m kaojax.render.demo --out DIR [--size 192] [--num-surfels 8000]

Writes DIR/mesh_depth.png, mesh_normal.png (FLAME mesh), surfel_color.png,
surfel_alpha.png, surfel_depth.png, surfel_normal.png (2D Gaussian surfels bound
to the same surface, KaoLRM style) and gaussians_color.png (the same set as 3D
Gaussians), three views side by side. Uses the synthetic FLAME model unless
--flame points at a FLAME pickle/npz.
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from kaojax.geometry import cameras
from kaojax.geometry.mesh import face_normals, sample_surface
from kaojax.geometry.rotations import matrix_to_quat
from kaojax.render.gaussian3d import rasterize_gaussians
from kaojax.render.gaussians import Gaussians
from kaojax.render.mesh import rasterize_mesh
from kaojax.render.surfel import rasterize_surfels


def head_vertices(flame_path=None):
  """FLAME head (neutral shape, slightly open jaw) -> vertices [V, 3], faces [F, 3]."""
  if flame_path:
    from kaojax.flame.io import load_flame
    model = load_flame(flame_path)
  else:
    from kaojax.flame.synthetic import make_synthetic_flame
    model = make_synthetic_flame()
  pose = jnp.array([[0.0, 0.0, 0.0, 0.12, 0.0, 0.0]])
  out = model(jnp.zeros((1, model.n_shape)), jnp.zeros((1, model.n_expr)), pose)
  return out.vertices[0], jnp.asarray(model.faces)


def surfels_on_surface(key, vertices, faces, num: int, radius: float) -> Gaussians:
  """Surfels at area-weighted surface samples, lying in the face planes, coloured
  by the (world) face normal."""
  points, face_idx, _ = sample_surface(key, vertices, faces, num)
  n = face_normals(vertices, faces)[face_idx]                          # [N, 3]
  helper = jnp.where(jnp.abs(n[:, :1]) < 0.9, jnp.array([1.0, 0, 0]), jnp.array([0, 1.0, 0]))
  t1 = jnp.cross(helper, n)
  t1 = t1 / jnp.linalg.norm(t1, axis=-1, keepdims=True)
  t2 = jnp.cross(n, t1)
  quats = matrix_to_quat(jnp.stack([t1, t2, n], -1))
  scales = jnp.broadcast_to(jnp.array([radius, radius, 1e-4]), points.shape)
  return Gaussians(means=points, quats=quats, scales=scales,
                   opacities=jnp.full(points.shape[:1], 0.9),
                   colors=0.5 + 0.5 * n)


def head_cameras(vertices, size: int, num_views: int = 3):
  """Cameras around the face (FLAME world: Y up, face towards +Z)."""
  centre = jnp.mean(vertices, 0)
  extent = float(jnp.max(jnp.linalg.norm(vertices - centre, axis=-1)))
  distance = 4.0 * extent
  azimuth = 270.0 + jnp.linspace(-45.0, 45.0, num_views)
  c2w = cameras.orbit_cameras(azimuth, jnp.full((num_views,), 10.0), distance, up="y",
                              target=tuple(np.asarray(centre).tolist()))
  focal = size * distance / (2.4 * extent)
  K = cameras.intrinsics(jnp.float32(focal), jnp.float32(focal), jnp.float32(size / 2),
                         jnp.float32(size / 2))
  return cameras.invert_pose(c2w), jnp.broadcast_to(K, (num_views, 3, 3))


def facelift_head_scene(num: int, size: int = 512, num_views: int = 6, key=None):
  """A FaceLift-size 3D Gaussian scene: `num` flattened Gaussians (third scale 0.3x
  the others, opacity 0.9) covering the FLAME head, scaled to a unit radius in
  FaceLift's Z-up world and seen by FaceLift's first `num_views` cameras
  (radius 2.7, 50 degree FOV) at size x size. Returns (Gaussians, viewmats
  [num_views, 4, 4], Ks [num_views, 3, 3])."""
  vertices, faces = head_vertices()
  centre = jnp.mean(vertices, 0)
  vertices = (vertices - centre) / jnp.max(jnp.linalg.norm(vertices - centre, axis=-1))
  vertices = jnp.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], -1)   # Y up -> Z up
  mean_edge = float(jnp.mean(jnp.linalg.norm(vertices[faces[:, 0]] - vertices[faces[:, 1]],
                                             axis=-1)))
  g = surfels_on_surface(jax.random.key(0) if key is None else key, vertices, faces, num,
                         radius=0.8 * mean_edge * (8000 / num) ** 0.5)
  g = g.replace(scales=g.scales.at[:, 2].set(0.3 * g.scales[:, 0]))
  c2w, K = cameras.facelift_cameras(size)
  return g, cameras.invert_pose(c2w)[:num_views], K[:num_views]


def _to_png(path, images):
  from PIL import Image
  strip = np.concatenate(list(np.asarray(images)), axis=1)
  strip = np.clip(strip, 0.0, 1.0)
  Image.fromarray((strip * 255 + 0.5).astype(np.uint8)).save(path)


def _depth_image(depth, mask):
  d = np.asarray(depth)
  m = np.asarray(mask) > 0
  lo, hi = d[m].min(), d[m].max()
  return np.where(m, 1.0 - 0.8 * (d - lo) / max(hi - lo, 1e-9), 0.0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder for the PNGs")
  parser.add_argument("--size", type=int, default=192)
  parser.add_argument("--num-surfels", type=int, default=8000)
  parser.add_argument("--flame", default=None, help="FLAME model file (default: synthetic)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  vertices, faces = head_vertices(args.flame)
  viewmats, Ks = head_cameras(vertices, args.size)
  mesh = rasterize_mesh(vertices, faces, viewmats, Ks, args.size, args.size)
  _to_png(out / "mesh_depth.png", _depth_image(mesh["depth"], mesh["mask"]))
  # OpenCV camera normals (x right, y down, z forward) shown as 0.5 - 0.5 n so the
  # visible side (n_z < 0) is bright
  _to_png(out / "mesh_normal.png",
          np.where(np.asarray(mesh["mask"])[..., None], 0.5 - 0.5 * np.asarray(mesh["normal"]), 0))

  mean_edge = float(jnp.mean(jnp.linalg.norm(vertices[faces[:, 0]] - vertices[faces[:, 1]], axis=-1)))
  gaussians = surfels_on_surface(jax.random.key(0), vertices, faces, args.num_surfels,
                                 radius=0.8 * mean_edge * (8000 / args.num_surfels) ** 0.5)
  surf = rasterize_surfels(gaussians, viewmats, Ks, args.size, args.size, jnp.zeros(3))
  _to_png(out / "surfel_color.png", surf["color"])
  _to_png(out / "surfel_alpha.png", np.repeat(np.asarray(surf["alpha"])[..., None], 3, -1))
  _to_png(out / "surfel_depth.png", _depth_image(surf["depth"], surf["alpha"] > 0.5))
  n = np.asarray(surf["normal"])
  n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
  _to_png(out / "surfel_normal.png", np.where(np.asarray(surf["alpha"])[..., None] > 0.5,
                                              0.5 - 0.5 * n, 0))
  g3 = gaussians.replace(scales=gaussians.scales.at[:, 2].set(0.3 * gaussians.scales[:, 0]))
  gs = rasterize_gaussians(g3, viewmats, Ks, args.size, args.size, jnp.ones(3))
  _to_png(out / "gaussians_color.png", gs["color"])

  both = (np.asarray(mesh["mask"]) & (np.asarray(surf["alpha"]) > 0.5))
  depth_gap = np.abs(np.asarray(surf["depth"]) - np.asarray(mesh["depth"]))[both]
  print(f"wrote {sorted(p.name for p in out.glob('*.png'))} to {out}")
  print(f"surfel vs mesh depth on covered pixels: median |diff| {np.median(depth_gap):.2e}, "
        f"overflow surfels {np.asarray(surf['overflow']).tolist()}, "
        f"mesh {np.asarray(mesh['overflow']).tolist()}")


if __name__ == "__main__":
  main()
