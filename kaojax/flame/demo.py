"""The FLAME demo job: random heads from a FLAME-format model.

For `config.num_subjects` random subjects (shape, expression, jaw, head yaw drawn
from the config's seed) it writes into the work directory:

  subjects/NNN.obj        the mesh (FLAME world, metres, Y up)
  subjects/NNN.npz        the parameters, 68 landmarks (2D-contour and full 3D)
  heads.png               one row per subject: shaded front and three-quarter
                          renders from `kaojax.render.rasterize_mesh`, landmarks
                          (dynamic contour + static, `landmarks2d`) drawn in red
  summary.json            what was run and where things are

Without `config.flame_path` it uses the built-in synthetic stand-in model
(`kaojax.flame.synthetic`), which is head-shaped but is NOT the real FLAME.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageDraw
from tqdm import tqdm

from kaojax import geometry
from kaojax.export.obj import write_obj
from kaojax.flame.io import load_flame
from kaojax.flame.synthetic import make_synthetic_flame

SKIN = np.array([0.86, 0.69, 0.58], np.float32)
VIEW_AZIMUTHS = (270.0, 315.0)  # front and three-quarter (see geometry.orbit_positions)
CAMERA_DISTANCE = 0.9
CAMERA_FOV_DEG = 22.0


def sample_parameters(key, num, n_shape, n_expr, config):
  """Random FLAME parameters -> dict of shape [num, n_shape], expression
  [num, n_expr], pose [num, 6] (global yaw + jaw opening)."""
  k_shape, k_expr, k_yaw, k_jaw = jax.random.split(key, 4)
  yaw = jax.random.uniform(k_yaw, (num,), minval=-1.0, maxval=1.0)
  yaw = yaw * jnp.deg2rad(config.max_yaw_deg)
  jaw = jax.random.uniform(k_jaw, (num,), maxval=config.max_jaw_rad)
  zeros = jnp.zeros((num,))
  pose = jnp.stack([zeros, yaw, zeros, jaw, zeros, zeros], -1)
  return {
      "shape": config.shape_std * jax.random.normal(k_shape, (num, n_shape)),
      "expression": config.expression_std * jax.random.normal(k_expr, (num, n_expr)),
      "pose": pose,
  }


def demo_cameras(image_size, center):
  """World-to-camera [V, 4, 4] and K [3, 3] for the demo views around `center`."""
  c2w = geometry.orbit_cameras(jnp.asarray(VIEW_AZIMUTHS), 0.0, CAMERA_DISTANCE,
                               up="y", target=center)
  K = geometry.intrinsics_from_fov(CAMERA_FOV_DEG, image_size, image_size)
  return geometry.invert_pose(c2w), K


def shade(normal, mask):
  """Camera-space normals [..., H, W, 3] + mask [..., H, W] -> RGB [..., H, W, 3]:
  Lambertian skin lit from the camera on a white background."""
  lambert = jnp.clip(-normal[..., 2], 0.0, 1.0)
  rgb = SKIN * (0.25 + 0.75 * lambert)[..., None]
  return jnp.where(mask[..., None], rgb, 1.0)


def _draw_landmarks(image, points):
  draw = ImageDraw.Draw(image)
  radius = max(1.0, image.width / 160)
  for x, y in points:
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(220, 30, 30))
  return image


def run(config, workdir):
  """Runs the demo; returns the summary dict (also written to summary.json)."""
  workdir = pathlib.Path(workdir)
  if config.flame_path:
    flame = load_flame(config.flame_path, n_shape=config.n_shape, n_expr=config.n_expr)
    source = str(config.flame_path)
  else:
    flame = make_synthetic_flame(seed=config.seed, n_shape=config.n_shape,
                                 n_expr=config.n_expr)
    source = "synthetic stand-in (kaojax.flame.synthetic), not the real FLAME"
  logging.info("FLAME demo: %d subjects from %s", config.num_subjects, source)

  params = sample_parameters(jax.random.key(config.seed), config.num_subjects,
                             flame.n_shape, flame.n_expr, config)
  out = jax.jit(flame.__call__)(params["shape"], params["expression"], params["pose"])
  center = jnp.mean(flame.v_template, axis=0)
  viewmats, K = demo_cameras(config.image_size, center)

  from kaojax.render import rasterize_mesh  # pylint: disable=import-outside-toplevel
  render = jax.jit(lambda v: rasterize_mesh(v, flame.faces, viewmats, K,
                                            config.image_size, config.image_size))
  subjects = workdir / "subjects"
  subjects.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in tqdm(range(config.num_subjects), desc="heads", unit="subject"):
    vertices = out.vertices[i]
    write_obj(subjects / f"{i:03d}.obj", vertices, flame.faces)
    np.savez(subjects / f"{i:03d}.npz",
             **{k: np.asarray(v[i]) for k, v in params.items()},
             landmarks2d=np.asarray(out.landmarks2d[i]),
             landmarks3d=np.asarray(out.landmarks3d[i]))
    maps = render(vertices)
    rgb = np.asarray(shade(maps["normal"], maps["mask"]))
    tiles = [Image.fromarray((rgb[v] * 255).round().astype(np.uint8))
             for v in range(len(VIEW_AZIMUTHS))]
    pixels, _ = geometry.project_points(out.landmarks2d[i], viewmats[0], K)
    _draw_landmarks(tiles[0], np.asarray(pixels))
    rows.append(np.concatenate([np.asarray(t) for t in tiles], axis=1))
  Image.fromarray(np.concatenate(rows, axis=0)).save(workdir / "heads.png")

  summary = {
      "job": "flame_demo",
      "flame": source,
      "num_subjects": config.num_subjects,
      "num_vertices": int(flame.v_template.shape[0]),
      "seed": config.seed,
      "picture": "heads.png",
      "meshes": [f"subjects/{i:03d}.obj" for i in range(config.num_subjects)],
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  logging.info("FLAME demo written to %s (picture: %s)", workdir, workdir / "heads.png")
  return summary
