"""A synthetic benchmark in the NoW dataset's layout, from synthetic FLAME heads.

    write_synthetic_now(root, num_subjects=2, images_per_challenge=1)

writes (the layout of NoW's final_release_version/ folder, which `kaojax.evaluate.now`
reads):
  imagepathsvalidation.txt      one line per image: SUBJECT/CHALLENGE/IMG_k.jpg
  iphone_pictures/SUBJECT/CHALLENGE/IMG_k.jpg   shaded renders of the subject's head
  scans/SUBJECT/SUBJECT.obj     the subject's neutral head, millimetres, in a scanner
                                frame of its own (a random rigid motion), subdivided
                                once (4x the triangles), with Gaussian noise on the
                                vertices and holes (balls of vertices removed away
                                from the landmarks)
  scans_lmks_onlypp/SUBJECT/SUBJECT_picked_points.pp   its 7 landmarks (MeshLab)
  subjects.json                 the generating parameters (identity coefficients,
                                scanner frames, noise, holes)

Subjects are random identities of the model (default: `kaojax.flame.synthetic`, which
is NOT the real FLAME). The images show the same identity per challenge:
multiview_neutral (neutral, three head yaws), multiview_expressions (random
expression and jaw), multiview_occlusions (neutral with a grey block over part of the
face), selfie (closer camera, wider field of view).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from kaojax import geometry
from kaojax.evaluate.now import CHALLENGES, IBUG_INDICES, LANDMARK_NAMES, write_pp
from kaojax.export.obj import write_obj
from kaojax.flame.demo import shade
from kaojax.flame.synthetic import make_synthetic_flame

YAWS_DEG = (0.0, -25.0, 25.0)


def subdivide(vertices, faces):
  """One midpoint subdivision: vertices [V, 3], faces [F, 3] -> 4F triangles."""
  edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
  unique, inverse = np.unique(edges, axis=0, return_inverse=True)
  mid = len(vertices) + inverse.reshape(3, -1).T                 # [F, 3]: ab, bc, ca
  vertices = np.concatenate([vertices, vertices[unique].mean(1)])
  a, b, c = faces.T
  ab, bc, ca = mid.T
  faces = np.concatenate([np.stack(x, 1) for x in
                          ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
  return vertices, faces


def make_scan(rng, vertices_m, faces, landmarks_m, noise_mm=0.1, holes=3, hole_mm=6.0):
  """(scan vertices [N, 3] mm, faces, landmarks [7, 3] mm, frame dict): the head
  subdivided, moved by a random rigid motion, noisy, with holes."""
  v, f = subdivide(np.asarray(vertices_m, np.float64) * 1000, np.asarray(faces))
  lm = np.asarray(landmarks_m, np.float64) * 1000
  # Holes: balls around random front-facing vertices, kept clear of the landmarks.
  removed = np.zeros(len(v), bool)
  centres = []
  front = np.nonzero((v[:, 2] > 40) & (np.min(np.linalg.norm(
      v[:, None] - lm[None], axis=-1), 1) > 2.5 * hole_mm))[0]
  for index in rng.choice(front, size=min(holes, len(front)), replace=False):
    centres.append(v[index].tolist())
    removed |= np.linalg.norm(v - v[index], axis=-1) < hole_mm
  keep = ~removed
  new_index = np.cumsum(keep) - 1
  f = new_index[f[np.all(keep[f], 1)]]
  v = v[keep] + rng.normal(scale=noise_mm, size=(int(keep.sum()), 3))
  angles = rng.uniform(-0.3, 0.3, size=3)
  rotation = np.asarray(geometry.axis_angle_to_matrix(jnp.asarray(angles, jnp.float32)),
                        np.float64)
  u, _, vt = np.linalg.svd(rotation)                               # exactly orthonormal
  rotation = u @ vt
  translation = rng.uniform(-200, 200, size=3)
  move = lambda x: x @ rotation.T + translation
  frame = {"rotation": rotation.tolist(), "translation": translation.tolist(),
           "hole_centres_mm": centres, "noise_mm": noise_mm}
  return move(v), f, move(lm), frame


def _camera(image_size, center, distance, fov_deg):
  c2w = geometry.orbit_cameras(jnp.asarray([270.0]), 0.0, distance, up="y", target=center)
  K = geometry.intrinsics_from_fov(fov_deg, image_size, image_size)
  return geometry.invert_pose(c2w), K


def write_synthetic_now(root, num_subjects: int = 2, images_per_challenge: int = 1,
                        seed: int = 0, image_size: int = 128, flame=None,
                        shape_std: float = 1.0, expression_std: float = 1.5) -> dict:
  """Writes the benchmark into `root`; returns its description (also subjects.json)."""
  from kaojax.render import rasterize_mesh  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(root)
  flame = flame or make_synthetic_flame(seed=0)
  rng = np.random.default_rng(seed)
  center = jnp.mean(flame.v_template, axis=0)
  cameras = {"default": _camera(image_size, center, 0.9, 22.0),
             "selfie": _camera(image_size, center, 0.45, 42.0)}
  renders = {name: jax.jit(lambda v, vm=vm, K=K: rasterize_mesh(
      v, flame.faces, vm, K, image_size, image_size)) for name, (vm, K) in cameras.items()}
  forward = jax.jit(flame.__call__)
  lines, subjects = [], []
  for s in range(num_subjects):
    subject = f"SYNTH_{s:03d}_TA"
    shape = (shape_std * rng.normal(size=flame.n_shape)).astype(np.float32)
    zeros_e, zeros_p = np.zeros(flame.n_expr, np.float32), np.zeros(6, np.float32)
    neutral = forward(shape, zeros_e, zeros_p)
    lm7 = np.asarray(neutral.landmarks3d)[list(IBUG_INDICES)]
    scan_v, scan_f, scan_lm, frame = make_scan(rng, neutral.vertices, flame.faces, lm7)
    write_obj(root / "scans" / subject / f"{subject}.obj", scan_v, scan_f)
    write_pp(root / "scans_lmks_onlypp" / subject / f"{subject}_picked_points.pp", scan_lm,
             names=list(LANDMARK_NAMES), mesh_name=f"{subject}.obj")
    images = []
    for challenge in CHALLENGES:
      for k in range(images_per_challenge):
        yaw = np.deg2rad(YAWS_DEG[k % len(YAWS_DEG)])
        expression, jaw = zeros_e, 0.0
        if challenge == "multiview_expressions":
          expression = (expression_std * rng.normal(size=flame.n_expr)).astype(np.float32)
          jaw = float(rng.uniform(0.05, 0.25))
        pose = np.array([0, yaw, 0, jaw, 0, 0], np.float32)
        out = forward(shape, expression, pose)
        maps = renders["selfie" if challenge == "selfie" else "default"](out.vertices)
        rgb = np.array(shade(maps["normal"], maps["mask"]))[0]
        if challenge == "multiview_occlusions":                  # a hand-sized grey block
          y0, x0 = int(rng.integers(image_size // 3, image_size // 2)), image_size // 4
          rgb[y0:y0 + image_size // 4, x0:x0 + image_size // 3] = 0.45
        name = f"IMG_{len(images) + 1:04d}.jpg"
        path = root / "iphone_pictures" / subject / challenge / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path, quality=95)
        line = f"{subject}/{challenge}/{name}"
        lines.append(line)
        images.append({"line": line, "yaw_deg": float(np.rad2deg(yaw)), "jaw": jaw,
                       "expression_norm": float(np.linalg.norm(expression))})
    subjects.append({"subject": subject, "shape": shape.tolist(), "scan_frame": frame,
                     "scan_vertices": len(scan_v), "images": images})
  (root / "imagepathsvalidation.txt").write_text("\n".join(lines) + "\n")
  description = {"root": str(root), "num_subjects": num_subjects,
                 "images": len(lines), "image_size": image_size, "seed": seed,
                 "model": "synthetic FLAME stand-in (kaojax.flame.synthetic), not FLAME",
                 "subjects": subjects}
  (root / "subjects.json").write_text(json.dumps(description, indent=1))
  return description
