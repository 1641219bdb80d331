"""A synthetic multi-view face dataset in the real datasets' on-disk layout.

Subjects are sampled from a FLAME-format model (kaojax's synthetic stand-in by
default, the user's FLAME when given): random shape, expression, jaw and head pose,
procedural appearance (skin tone, brows, lips, eyes, optional hair cap) as per-vertex
colours with Lambertian shading, rendered by `kaojax.render.rasterize_mesh` under
the paper's protocol: the head normalised into [-1, 1]^3, `num_views` cameras at
distance 2 on the frontal hemisphere looking at the origin, shared intrinsics
(normalised focal 0.75). Written as `data_pipeline.layout` describes, plus ground
truth the real data lacks (gt/params.npz with the parameters and vertices, gt/mesh.obj,
gt/mask/NNN.png facial masks), and optionally the monocular layout (most frontal view
of each subject).

    python -m data_pipeline.synthetic --out data/synthetic --subjects 64 --seed 0
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data_pipeline import layout
from kaojax import geometry
from kaojax.export.obj import write_obj
from kaojax.flame.io import load_flame, read_masks
from kaojax.flame.synthetic import make_synthetic_flame, make_synthetic_flame_files

CAMERA_DISTANCE = 2.0
FOCAL = 0.75           # normalised focal, as KaoLRM's multi-view data
MAX_VIEW_ANGLE = 70.0  # degrees from the frontal direction (+Z, FLAME world)
SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.70, 0.56], [0.78, 0.57, 0.44],
                       [0.62, 0.43, 0.31], [0.45, 0.30, 0.21]], np.float32)
HAIR_COLOURS = np.array([[0.10, 0.07, 0.05], [0.35, 0.22, 0.12], [0.70, 0.55, 0.30],
                         [0.45, 0.15, 0.08], [0.55, 0.55, 0.55]], np.float32)


def load_generator_flame(flame_path: str = "", seed: int = 0):
  """-> (FlameModel, {region: vertex indices} or {}). Empty path: synthetic model."""
  if not flame_path:
    return make_synthetic_flame(seed=seed), make_synthetic_flame_files(seed)["masks"]
  flame = load_flame(flame_path)
  folder = pathlib.Path(flame_path)
  folder = folder if folder.is_dir() else folder.parent
  masks_file = folder / "FLAME_masks.pkl"
  return flame, (read_masks(masks_file) if masks_file.is_file() else {})


def sample_parameters(rng: np.random.Generator, n_shape: int, n_expr: int):
  """Random subject: shape [n_shape], expression [n_expr], pose [6]."""
  head = np.deg2rad(rng.uniform([-12, -20, -6], [12, 20, 6]))  # pitch, yaw, roll
  jaw = rng.uniform(0.0, 0.25)
  return {
      "shape": rng.normal(size=n_shape).astype(np.float32),
      "expression": (0.7 * rng.normal(size=n_expr)).astype(np.float32),
      "pose": np.array([*head, jaw, 0.0, 0.0], np.float32),
  }


def sample_views(rng: np.random.Generator, num: int):
  """Unit directions [num, 3] on the frontal hemisphere (within MAX_VIEW_ANGLE of +Z);
  the first is nearly frontal."""
  cos_max = np.cos(np.deg2rad(MAX_VIEW_ANGLE))
  z = rng.uniform(cos_max, 1.0, num)
  z[0] = rng.uniform(np.cos(np.deg2rad(15.0)), 1.0)
  phi = rng.uniform(0, 2 * np.pi, num)
  r = np.sqrt(1 - z ** 2)
  return np.stack([r * np.cos(phi), r * np.sin(phi), z], -1).astype(np.float32)


def vertex_albedo(rng, vertices, landmarks, masks):
  """Procedural per-vertex colours [V, 3] from region masks and brow landmarks."""
  colors = np.tile(SKIN_TONES[rng.integers(len(SKIN_TONES))] *
                   rng.uniform(0.92, 1.05), (len(vertices), 1))
  lips = masks.get("lips")
  if lips is not None:
    colors[lips] = colors[lips] * np.array([0.85, 0.55, 0.55]) + [0.08, 0, 0]
  # Brows: skin near the 10 brow landmarks (17-26), within 12% of the head size.
  size = np.ptp(vertices, axis=0).max()
  brow_dist = np.linalg.norm(vertices[:, None] - landmarks[None, 17:27], axis=-1).min(1)
  brow_colour = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
  colors[brow_dist < 0.035 * size] = brow_colour
  for side in ("left_eyeball", "right_eyeball"):
    idx = masks.get(side)
    if idx is None or len(idx) == 0:
      continue
    eye = vertices[idx]
    front = (eye[:, 2] - eye[:, 2].min()) / max(np.ptp(eye[:, 2]), 1e-6)
    colors[idx] = np.where(front[:, None] > 0.8, [0.15, 0.1, 0.08], [0.95, 0.95, 0.93])
  if "scalp" in masks and rng.uniform() < 0.6:
    colors[masks["scalp"]] = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
  return np.clip(colors, 0, 1).astype(np.float32)


class SubjectRenderer:
  """(vertices [V,3], colours [V,3], viewmats [N,4,4], K [3,3], light [3]) ->
  (rgba [N,H,W,4], facial mask source data: face_id [N,H,W], mask [N,H,W]), exact
  (the mesh rasterizer drops no face)."""

  def __init__(self, faces, size: int):
    self.faces, self.size = jnp.asarray(faces), size
    # Tiles of 1/16 of the image side (4 px at least): the head fills the image,
    # so a tile sees a few hundred faces of its front and back surfaces.
    self.tile_size = max(4, size // 16)
    self._jitted = jax.jit(self._render)

  def __call__(self, *args):
    return [np.asarray(a) for a in self._jitted(*args)]

  def _render(self, vertices, colors, viewmats, K, light):
    from kaojax.render import rasterize_mesh  # pylint: disable=import-outside-toplevel
    faces, size = self.faces, self.size
    maps = rasterize_mesh(vertices, faces, viewmats, K, size, size, tile_size=self.tile_size)
    tri = faces[maps["face_id"]]                                  # [N, H, W, 3]
    albedo = jnp.einsum("...k,...kc->...c", maps["bary"], colors[tri])
    world_normals = geometry.vertex_normals(vertices, faces)
    normal = jnp.einsum("...k,...kc->...c", maps["bary"], world_normals[tri])
    normal = normal / jnp.maximum(jnp.linalg.norm(normal, axis=-1, keepdims=True), 1e-8)
    shade = 0.35 + 0.65 * jnp.clip(normal @ light, 0.0, 1.0)
    mask = maps["mask"]
    rgb = jnp.where(mask[..., None], albedo * shade[..., None], 0.0)
    rgba = jnp.concatenate([rgb, mask[..., None].astype(rgb.dtype)], -1)
    return rgba, maps["face_id"], mask


def generate(out, num_subjects: int, num_views: int = 32, image_size: int = 128,
             seed: int = 0, flame_path: str = "", val_fraction: float = 0.125,
             monocular_out=None, progress: bool = True):
  """Writes the dataset to `out` (and the monocular layout to `monocular_out`);
  returns the list of uids. Deterministic from `seed`."""
  out = pathlib.Path(out)
  flame, masks = load_generator_flame(flame_path, seed)
  forward = jax.jit(lambda s, e, p: flame(s[None], e[None], p[None]))
  render = SubjectRenderer(flame.faces, image_size)
  K = np.array([[FOCAL * image_size, 0, image_size / 2],
                [0, FOCAL * image_size, image_size / 2], [0, 0, 1]], np.float32)
  face_mask = np.asarray(flame.face_mask)
  rng = np.random.default_rng(seed)
  uids, mono_landmarks = [], {}
  for index in tqdm(range(num_subjects), desc="synthetic subjects", disable=not progress):
    uid = f"subject_{index:05d}"
    params = sample_parameters(rng, flame.n_shape, flame.n_expr)
    mesh = forward(params["shape"], params["expression"], params["pose"])
    vertices = np.asarray(mesh.vertices[0])
    center = (vertices.max(0) + vertices.min(0)) / 2
    scale = 1.0 / np.abs(vertices - center).max()
    vertices = (vertices - center) * scale
    landmarks3d = (np.asarray(mesh.landmarks3d[0]) - center) * scale
    colors = vertex_albedo(rng, vertices, landmarks3d, masks)
    eyes = sample_views(rng, num_views) * CAMERA_DISTANCE
    c2w = np.asarray(geometry.look_at(eyes, np.zeros(3), (0.0, 1.0, 0.0)))
    viewmats = np.linalg.inv(c2w)
    light = rng.normal(size=3) * 0.4 + [0.0, 0.3, 1.0]
    light = (light / np.linalg.norm(light)).astype(np.float32)
    rgba, face_id, mask = render(
        jnp.asarray(vertices), jnp.asarray(colors), jnp.asarray(viewmats, jnp.float32),
        jnp.asarray(K), jnp.asarray(light))
    pixels, _ = geometry.project_points(jnp.asarray(landmarks3d), jnp.asarray(viewmats),
                                        jnp.asarray(K))
    pixels = np.asarray(pixels, np.float32)
    subject = layout.write_multiview_subject(
        out, uid, c2w, rgba, K, pixels,
        gt={**params, "vertices": vertices, "landmarks3d": landmarks3d,
            "normalization_scale": scale, "normalization_center": center})
    write_obj(subject / "gt" / "mesh.obj", vertices, flame.faces, colors)
    facial = face_mask[face_id] & mask
    for v in range(num_views):
      layout.write_png(subject / "gt" / "mask" / f"{layout.view_name(v)}.png",
                       facial[v].astype(np.float32))
    if monocular_out is not None:
      front = int(np.argmax(eyes[:, 2]))
      layout.write_monocular_sample(monocular_out, uid, rgba[front], facial[front])
      mono_landmarks[uid] = pixels[front]
    uids.append(uid)
  num_val = max(1, int(round(val_fraction * num_subjects))) if num_subjects > 1 else 0
  for root in [out] + ([pathlib.Path(monocular_out)] if monocular_out else []):
    layout.write_split(root, "train", uids[:num_subjects - num_val])
    layout.write_split(root, "val", uids[num_subjects - num_val:])
  if monocular_out is not None:
    layout.write_monocular_landmarks(monocular_out, mono_landmarks)
  return uids


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="multi-view dataset folder")
  parser.add_argument("--monocular-out", default=None, help="also write the monocular layout here")
  parser.add_argument("--subjects", type=int, default=64)
  parser.add_argument("--views", type=int, default=32)
  parser.add_argument("--size", type=int, default=128, help="image size in pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--flame", default="", help="FLAME file/folder (default: synthetic)")
  args = parser.parse_args(argv)
  generate(args.out, args.subjects, args.views, args.size, args.seed, args.flame,
           monocular_out=args.monocular_out)


if __name__ == "__main__":
  main()
