"""Synthetic 360-degree heads for FaceLift training, in `data_pipeline.facelift_layout`.

Each subject is a FLAME-format head (kaojax's synthetic stand-in by default, the
user's FLAME when given) with random shape, expression, jaw and head pose and a
procedural appearance (skin, brows, lips, eyes, hair over the scalp and the back of
the head: `data_pipeline.synthetic.vertex_albedo`), moved into FaceLift's world (Z up,
facing -Y, the head's bounding box centred and scaled into [-HEAD_EXTENT,
HEAD_EXTENT]^3) and rendered with Lambertian shading (`synthetic.SubjectRenderer`,
exact: no face dropped) at
  frames 0-5: FaceLift's six fixed cameras (radius 2.7, elevation 0, 50 deg FOV), the
              multi-view diffusion model's views;
  frames 6..: `num_random` cameras at radius 2.7 looking at the origin, uniform in
              azimuth and in height on the sphere between RANDOM_ELEVATION degrees,
              the reconstructor's views (the paper renders 32 random views).
Images are RGBA (alpha = coverage); the loaders composite them on white.

    python -m data_pipeline.heads --out data/heads --subjects 64 --size 512
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data_pipeline import facelift_layout, synthetic
from data_pipeline.layout import write_split
from kaojax.geometry.cameras import (FACELIFT_FOV_DEG, FACELIFT_RADIUS, FACELIFT_VIEWS,
                                     facelift_cameras, flame_to_triplane, intrinsics_from_fov,
                                     look_at)

HEAD_EXTENT = 0.9                 # half-size of the head's bounding box (world units)
RANDOM_ELEVATION = (-20.0, 45.0)  # degrees, range of the random cameras
HAIR_PROBABILITY = 0.85           # subjects with hair over the scalp and back


def random_cameras(rng: np.random.Generator, num: int, radius: float = FACELIFT_RADIUS):
  """c2w [num, 4, 4] (OpenCV, Z up) looking at the origin from random points of the
  sphere band between RANDOM_ELEVATION."""
  lo, hi = np.sin(np.deg2rad(RANDOM_ELEVATION))
  z = rng.uniform(lo, hi, num)
  azimuth = rng.uniform(0.0, 2 * np.pi, num)
  r = np.sqrt(1.0 - z ** 2)
  eyes = radius * np.stack([r * np.cos(azimuth), r * np.sin(azimuth), z], -1)
  return np.asarray(look_at(eyes, np.zeros(3), (0.0, 0.0, 1.0)), np.float32)


def subject_cameras(rng: np.random.Generator, size: int, num_random: int):
  """-> (c2w [6 + num_random, 4, 4], K [6 + num_random, 3, 3], view names)."""
  fixed, K = facelift_cameras(size=size)
  c2w = np.concatenate([np.asarray(fixed, np.float32), random_cameras(rng, num_random)])
  K = np.broadcast_to(np.asarray(intrinsics_from_fov(FACELIFT_FOV_DEG, size, size),
                                 np.float32), (len(c2w), 3, 3))
  return c2w, K, list(FACELIFT_VIEWS) + ["random"] * num_random


def head_geometry(flame, forward, rng, masks):
  """One random head -> (vertices [V, 3] in FaceLift's world, colours [V, 3])."""
  params = synthetic.sample_parameters(rng, flame.n_shape, flame.n_expr)
  mesh = forward(params["shape"], params["expression"], params["pose"])
  vertices = np.asarray(mesh.vertices[0])
  center = (vertices.max(0) + vertices.min(0)) / 2
  scale = HEAD_EXTENT / np.abs(vertices - center).max()
  vertices = (vertices - center) * scale
  landmarks = (np.asarray(mesh.landmarks3d[0]) - center) * scale
  colors = synthetic.vertex_albedo(rng, vertices, landmarks, masks)
  if "scalp" in masks and rng.uniform() < HAIR_PROBABILITY:
    hair = synthetic.HAIR_COLOURS[rng.integers(len(synthetic.HAIR_COLOURS))]
    colors[masks["scalp"]] = hair * rng.uniform(0.9, 1.1)
  return np.asarray(flame_to_triplane(vertices), np.float32), np.clip(colors, 0, 1)


def generate(out, num_subjects: int, num_random: int = 26, image_size: int = 512,
             seed: int = 0, flame_path: str = "", val_fraction: float = 0.1,
             progress: bool = True):
  """Writes `num_subjects` heads (6 fixed + `num_random` random views each) and the
  train/val splits (the last `val_fraction` held out) to `out`; returns the uids.
  Deterministic from `seed`."""
  out = pathlib.Path(out)
  flame, masks = synthetic.load_generator_flame(flame_path, seed)
  forward = jax.jit(lambda s, e, p: flame(s[None], e[None], p[None]))
  render = synthetic.SubjectRenderer(flame.faces, image_size)
  rng = np.random.default_rng(seed)
  uids = []
  for index in tqdm(range(num_subjects), desc="synthetic heads", disable=not progress):
    uid = f"head_{index:05d}"
    vertices, colors = head_geometry(flame, forward, rng, masks)
    c2w, K, views = subject_cameras(rng, image_size, num_random)
    # Light from the front-above half of the sphere, some ambient everywhere.
    light = rng.normal(size=3) * 0.4 + [0.0, -1.0, 0.5]
    light = (light / np.linalg.norm(light)).astype(np.float32)
    rgba, _, _ = render(jnp.asarray(vertices), jnp.asarray(colors, jnp.float32),
                        jnp.asarray(np.linalg.inv(c2w), jnp.float32), jnp.asarray(K[0]),
                        jnp.asarray(light))
    facelift_layout.write_subject(out, uid, rgba, c2w, K, views)
    uids.append(uid)
  num_val = max(1, int(round(val_fraction * num_subjects))) if num_subjects > 1 else 0
  write_split(out, "train", uids[:num_subjects - num_val])
  write_split(out, "val", uids[num_subjects - num_val:])
  return uids


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--subjects", type=int, default=64)
  parser.add_argument("--random-views", type=int, default=26)
  parser.add_argument("--size", type=int, default=512, help="image size in pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--flame", default="", help="FLAME file/folder (default: synthetic)")
  args = parser.parse_args(argv)
  generate(args.out, args.subjects, args.random_views, args.size, args.seed, args.flame)


if __name__ == "__main__":
  main()
