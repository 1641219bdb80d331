"""A synthetic FLAME-format head: a stand-in for the real (licensed) FLAME model.

It is NOT FLAME. It is a procedural head (cranium, brow, eye sockets, nose, lips,
chin, ears, neck, two eyeballs) in FLAME's conventions - metres, Y up, face
looking along +Z, 5 joints (root, neck, jaw, left eye, right eye) - with smooth
identity and expression bases, smooth pose correctives, skinning weights in which
the jaw joint opens a real mouth slit, a landmark embedding in DECA's layout
(51 static, 79 x 17 dynamic contour, 68 full) and FLAME_masks-style regions.
Tests and the built-in demo use it; users point configs at their own FLAME files.

`write_synthetic_flame(folder)` writes the files in the official layouts:
generic_model.pkl (plain numpy, official keys, 300 + 100 shapedirs columns),
FLAME_NEUTRAL.pkl (the same, as smplx expects), flame_static_embedding.pkl +
flame_dynamic_embedding.npy (RingNet/smplx), landmark_embedding.npz (DECA keys),
FLAME_masks.pkl.
"""

import copy
import functools
import pathlib
import pickle

import numpy as np

from kaojax.flame.io import facial_region_face_mask
from kaojax.flame.model import FLAME_PARENTS, FlameModel, build_flame_model

N_LAT, N_LON = 56, 72          # head grid (rows from crown to neck base, columns)
EYE_RES = (8, 12)              # eyeball sphere grid
MOUTH_Y, MOUTH_HALF_WIDTH = -0.047, 0.024
EYE_CENTRES = np.array([[0.032, 0.016, 0.052], [-0.032, 0.016, 0.052]])  # left (+x), right
EYE_RADIUS = 0.0125


def _bump(p, centre, sigma):
  d = (p - np.asarray(centre)) / np.asarray(sigma)
  return np.exp(-0.5 * np.sum(d * d, -1))


def _head_surface():
  """Grid positions [N_LAT, N_LON, 3] of the head + neck surface."""
  t = (np.arange(N_LAT) + 0.5) / N_LAT                       # 0 at crown, 1 at neck base
  phi = 2 * np.pi * np.arange(N_LON) / N_LON                 # 0 = front (+Z)
  t, phi = np.meshgrid(t, phi, indexing="ij")
  theta = np.pi * np.minimum(t, 0.72) / 0.96                  # polar angle on the cranium
  radii = np.array([0.076, 0.100, 0.092])
  centre = np.array([0.0, 0.012, -0.006])
  d = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)
  p = centre + radii * d
  # Below t = 0.72 the surface narrows into the neck and goes down to y = -0.17.
  neck = np.clip((t - 0.72) / 0.28, 0, 1)[..., None]
  neck_r = np.array([0.050, 0, 0.052])
  ring_dir = np.stack([np.sin(phi), np.zeros_like(phi), np.cos(phi)], -1)
  neck_pos = np.array([0, 0, -0.012]) + neck_r * ring_dir
  blend = 1 - (1 - neck) ** 2
  p_low = (1 - blend) * p + blend * neck_pos
  p_low[..., 1] = p[..., 1] * (1 - neck[..., 0]) + (-0.17) * neck[..., 0]
  p = np.where(t[..., None] > 0.72, p_low, p)
  # Facial features as displacements along the outward (horizontal + vertical) normal.
  normal = (p - centre) / np.linalg.norm(p - centre, axis=-1, keepdims=True)
  front = np.clip(p[..., 2] / 0.06, 0, 1)
  x, y = p[..., 0], p[..., 1]
  ax = np.abs(x)
  disp = (0.026 * _bump(p[..., :2], (0, -0.012), (0.009, 0.018)) * front        # nose
          + 0.007 * _bump(p[..., :2], (0, 0.036), (0.035, 0.007)) * front       # brow ridge
          - 0.010 * _bump(np.stack([ax, y], -1), (0.032, 0.016), (0.013, 0.010)) * front
          + 0.006 * _bump(p[..., :2], (0, MOUTH_Y + 0.004), (0.018, 0.005)) * front  # upper lip
          + 0.006 * _bump(p[..., :2], (0, MOUTH_Y - 0.006), (0.016, 0.005)) * front  # lower lip
          + 0.010 * _bump(p[..., :2], (0, -0.078), (0.022, 0.012)) * front      # chin
          + 0.006 * _bump(np.stack([ax, y], -1), (0.045, -0.010), (0.015, 0.020)) * front
          + 0.016 * _bump(np.stack([ax, y, p[..., 2]], -1), (0.078, 0.002, -0.008),
                          (0.008, 0.022, 0.014)))                               # ears
  p = p + disp[..., None] * normal
  # Jaw: narrow the lower face a little towards the chin.
  lower = np.clip((-0.03 - y) / 0.06, 0, 1) * (t < 0.75)
  p[..., 0] *= 1 - 0.18 * lower
  return p


def _grid_faces(n_rows, n_cols, offset=0, skip=None):
  faces = []
  for i in range(n_rows - 1):
    for j in range(n_cols):
      if skip is not None and skip(i, j):
        continue
      a, b = offset + i * n_cols + j, offset + i * n_cols + (j + 1) % n_cols
      c, d = a + n_cols, b + n_cols
      faces += [(a, c, b), (b, c, d)]   # counter-clockwise seen from outside
  return faces


def _sphere(centre, radius, n_lat, n_lon):
  t = (np.arange(n_lat) + 0.5) / n_lat
  phi = 2 * np.pi * np.arange(n_lon) / n_lon
  t, phi = np.meshgrid(t, phi, indexing="ij")
  th = np.pi * t
  d = np.stack([np.sin(th) * np.sin(phi), np.cos(th), np.sin(th) * np.cos(phi)], -1)
  return (centre + radius * d).reshape(-1, 3)


def _mesh():
  """(vertices [V, 3], faces [F, 3], index ranges of head/left eye/right eye,
  positions of the upper and lower lip-edge vertices along the mouth slit)."""
  grid = _head_surface()
  head = grid.reshape(-1, 3)
  front_col = lambda j: min(j, N_LON - j) < N_LON * MOUTH_HALF_WIDTH / (2 * np.pi * 0.07)
  # The mouth slit: the row whose front vertices are closest to MOUTH_Y.
  mouth_row = int(np.argmin(np.abs(grid[:, 0, 1] - MOUTH_Y)))
  skip = lambda i, j: i == mouth_row and front_col(j) and front_col((j + 1) % N_LON)
  faces = _grid_faces(N_LAT, N_LON, 0, skip)
  # Close the crown with a fan around a top vertex.
  top = len(head)
  verts = [head, np.array([[0.0, grid[0, :, 1].max() + 0.004, -0.006]])]
  faces += [(top, (j + 1) % N_LON, j) for j in range(N_LON)]
  ranges = {"head": (0, top + 1)}
  start = top + 1
  for name, centre in (("left_eyeball", EYE_CENTRES[0]), ("right_eyeball", EYE_CENTRES[1])):
    eye = _sphere(centre, EYE_RADIUS, *EYE_RES)
    faces += _grid_faces(EYE_RES[0], EYE_RES[1], start)
    verts.append(eye)
    ranges[name] = (start, start + len(eye))
    start += len(eye)
  cols = [j for j in range(N_LON) if front_col(j)]
  lip_edges = (grid[mouth_row, cols], grid[mouth_row + 1, cols])  # upper, lower [n, 3]
  return np.concatenate(verts).astype(np.float32), np.array(faces, np.int64), ranges, lip_edges


def _smooth_fields(rng, points, count, amplitude, freq=12.0, weight=None):
  """count smooth random displacement fields [V, 3, count] (sums of cosines)."""
  fields = np.zeros((len(points), 3, count))
  for k in range(count):
    for _ in range(3):
      omega = rng.normal(size=3) * freq
      phase = rng.uniform(0, 2 * np.pi)
      direction = rng.normal(size=3)
      fields[:, :, k] += np.cos(points @ omega + phase)[:, None] * direction
    fields[:, :, k] *= amplitude[k] / np.sqrt(3 * 3)
  if weight is not None:
    fields *= weight[:, None, None]
  return fields


def _closest_surface_point(vertices, faces, targets):
  """For each target [L, 3], the closest point on the mesh: (face index, bary)."""
  tri = vertices[faces]
  out_f, out_b = [], []
  for q in targets:
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac, aq = b - a, c - a, q - a
    d00 = np.sum(ab * ab, -1); d01 = np.sum(ab * ac, -1); d11 = np.sum(ac * ac, -1)
    d20 = np.sum(aq * ab, -1); d21 = np.sum(aq * ac, -1)
    den = d00 * d11 - d01 * d01
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.clip(np.stack([1 - v - w, v, w], -1), 0, 1)
    bary /= bary.sum(-1, keepdims=True)
    proj = np.einsum("fk,fkc->fc", bary, tri)
    best = int(np.argmin(np.sum((proj - q) ** 2, -1)))
    out_f.append(best)
    out_b.append(bary[best])
  return np.array(out_f, np.int64), np.array(out_b, np.float32)


def _surface_points_towards(vertices, faces, origins, directions, chunk: int = 64):
  """Where each ray origins[r] + s * directions[r] (s > 0) leaves the head.
  origins, directions [R, 3] -> (faces [R] int64, bary [R, 3] float32)."""
  tri = vertices[faces]
  a, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]   # [F, 3]
  out_f, out_b = [], []
  for start in range(0, len(origins), chunk):
    o = origins[start:start + chunk, None]                             # [r, 1, 3]
    d = directions[start:start + chunk, None]
    h = np.cross(d, e2)                                                # [r, F, 3]
    det = np.sum(e1 * h, -1)
    safe = np.where(np.abs(det) > 1e-12, det, 1.0)
    s = o - a
    u = np.sum(s * h, -1) / safe
    q = np.cross(s, e1)
    v = np.sum(d * q, -1) / safe
    dist = np.sum(e2 * q, -1) / safe
    hit = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (dist > 0)
    missed = ~hit.any(-1)
    if missed.any():
      r = int(np.argmax(missed))
      raise ValueError(f"no surface along {d[r, 0]} from {o[r, 0]}")
    best = np.argmax(np.where(hit, dist, -np.inf), -1)
    rows = np.arange(len(best))
    ub, vb = u[rows, best], v[rows, best]
    out_f.append(best.astype(np.int64))
    out_b.append(np.stack([1 - ub - vb, ub, vb], -1).astype(np.float32))
  return np.concatenate(out_f), np.concatenate(out_b)


def _landmarks(vertices, faces, lip_edges):
  """DECA-layout landmark embedding for the synthetic head."""
  def on_face(points2d):
    # Project (x, y) points onto the front of the face along -z.
    origins = np.array([[x, y, 0.0] for x, y in points2d])
    return _surface_points_towards(vertices, faces, origins,
                                   np.broadcast_to([0.0, 0.0, 1.0], origins.shape))

  brows = [(x, 0.040 - 0.00045 * (abs(x) * 1000 - 30) ** 2 / 10) for x in
           (-0.058, -0.048, -0.037, -0.026, -0.014, 0.014, 0.026, 0.037, 0.048, 0.058)]
  nose = [(0, 0.018), (0, 0.006), (0, -0.005), (0, -0.015),
          (-0.012, -0.026), (-0.006, -0.028), (0, -0.029), (0.006, -0.028), (0.012, -0.026)]
  def eye(cx, sign):
    xs = cx + sign * np.array([-0.013, -0.006, 0.006, 0.013, 0.006, -0.006])
    ys = 0.016 + np.array([0, 0.005, 0.005, 0, -0.004, -0.004])
    return list(zip(xs, ys))
  my = MOUTH_Y
  outer = [(-0.022, my), (-0.014, my + 0.007), (-0.006, my + 0.009), (0, my + 0.008),
           (0.006, my + 0.009), (0.014, my + 0.007), (0.022, my), (0.014, my - 0.009),
           (0.006, my - 0.012), (0, my - 0.012), (-0.006, my - 0.012), (-0.014, my - 0.009)]
  # Inner lips (60-67) sit on the slit's edge vertices, upper then lower.
  def edge_point(edge, x):
    return edge[np.argmin(np.abs(edge[:, 0] - x))]
  inner_targets = np.stack([edge_point(lip_edges[0], x) for x in (-0.018, -0.006, 0, 0.006, 0.018)]
                           + [edge_point(lip_edges[1], x) for x in (0.006, 0, -0.006)])
  # iBUG order: 17-26 brows (subject's right to left = image left to right, i.e. -x
  # to +x seen from the front), 27-35 nose, 36-41 right eye, 42-47 left eye, 48-67 mouth.
  static_f, static_b = on_face(brows + nose + eye(-0.032, 1) + eye(0.032, 1) + outer)
  inner_f, inner_b = _closest_surface_point(vertices, faces, inner_targets)
  static_f = np.concatenate([static_f, inner_f])
  static_b = np.concatenate([static_b, inner_b]).astype(np.float32)

  def contour(shift_deg):
    # 17 points along the jaw line from the right ear (-x) round the chin to the
    # left ear (+x); a turned head shows a contour shifted by half the yaw.
    angles = np.deg2rad(np.clip(np.linspace(-80, 80, 17) - 0.5 * shift_deg, -88, 88))
    heights = -0.010 - 0.068 * np.cos(np.linspace(-np.pi / 2, np.pi / 2, 17)) ** 1.5
    origins = np.stack([np.zeros(17), heights, np.full(17, -0.01)], -1)
    directions = np.stack([np.sin(angles), np.zeros(17), np.cos(angles)], -1)
    return _surface_points_towards(vertices, faces, origins, directions)

  yaws = list(range(0, 40)) + [-a for a in range(1, 40)]  # row r <-> bin r
  dyn = [contour(a) for a in yaws]
  full0 = contour(0.0)
  return {
      "static_lmk_faces_idx": static_f, "static_lmk_bary_coords": static_b,
      "dynamic_lmk_faces_idx": np.stack([d[0] for d in dyn]),
      "dynamic_lmk_bary_coords": np.stack([d[1] for d in dyn]).astype(np.float32),
      "full_lmk_faces_idx": np.concatenate([full0[0], static_f])[None],
      "full_lmk_bary_coords": np.concatenate([full0[1], static_b])[None].astype(np.float32),
  }


def _sigmoid(x):
  return 0.5 * (1 + np.tanh(0.5 * x))


def _masks(v, ranges):
  x, y, z = v[:, 0], v[:, 1], v[:, 2]
  idx = lambda m: np.nonzero(m)[0].astype(np.int64)
  head = np.zeros(len(v), bool)
  head[slice(*ranges["head"])] = True
  face = head & (z > 0.02) & (y > -0.095) & (y < 0.05) & (np.abs(x) < 0.07)
  forehead = head & (z > 0.0) & (y >= 0.04) & (y < 0.085)
  nose = head & (np.abs(x) < 0.018) & (y > -0.032) & (y < 0.022) & (z > 0.06)
  lips = head & (np.abs(x) < 0.026) & (np.abs(y - MOUTH_Y) < 0.014) & (z > 0.04)
  ears = lambda s: head & (s * x > 0.065) & (np.abs(y) < 0.035) & (np.abs(z + 0.008) < 0.03)
  eye_region = lambda s: head & (np.abs(x - s * 0.032) < 0.022) & (np.abs(y - 0.016) < 0.016) & (z > 0.03)
  eyeball = lambda n: idx(np.isin(np.arange(len(v)), np.arange(*ranges[n])))
  neck = head & (y < -0.095)
  scalp = head & ((y >= 0.085) | ((z <= 0.0) & (y > -0.06)))
  return {
      "face": idx(face), "forehead": idx(forehead), "nose": idx(nose), "lips": idx(lips),
      "left_ear": idx(ears(1)), "right_ear": idx(ears(-1)),
      "left_eye_region": idx(eye_region(1)), "right_eye_region": idx(eye_region(-1)),
      "eye_region": idx(eye_region(1) | eye_region(-1)),
      "left_eyeball": eyeball("left_eyeball"), "right_eyeball": eyeball("right_eyeball"),
      "neck": idx(neck), "scalp": idx(scalp), "boundary": idx(head & (y < -0.165)),
  }


def make_synthetic_flame_files(seed: int = 0) -> dict:
  """All synthetic FLAME data as plain numpy: {'model': official-key dict,
  'landmarks': DECA-key dict, 'masks': region dict}. Deterministic in `seed`; a
  fresh copy of what the process built for that seed the first time (seconds)."""
  return copy.deepcopy(_build_synthetic_flame_files(seed))


@functools.lru_cache(maxsize=4)
def _build_synthetic_flame_files(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  v, faces, ranges, lip_edges = _mesh()
  slit_y = 0.5 * (lip_edges[0][:, 1].mean() + lip_edges[1][:, 1].mean())
  n_v = len(v)
  x, y, z = v[:, 0], v[:, 1], v[:, 2]
  head = np.zeros(n_v, bool)
  head[slice(*ranges["head"])] = True

  # Skinning: eyes to their joints; below the mouth slit in front -> jaw; neck base ->
  # root; everything else -> neck. Smooth transitions except across the slit.
  w = np.zeros((n_v, 5))
  jaw = _sigmoid((slit_y - y) / 0.0006) * _sigmoid((z - 0.01) / 0.012) * (y > -0.115)
  jaw *= _sigmoid((-0.085 - y) / -0.01)  # fade out under the chin towards the throat
  root = _sigmoid((-0.125 - y) / 0.008)
  w[:, 2] = jaw * (1 - root)
  w[:, 0] = root
  w[:, 1] = 1 - w[:, 0] - w[:, 2]
  for j, name in ((3, "left_eyeball"), (4, "right_eyeball")):
    sl = slice(*ranges[name])
    w[sl] = 0
    w[sl, j] = 1
  w = w * rng.uniform(0.9, 1.1, size=w.shape) * (w > 1e-4) + 1e-6
  w /= w.sum(1, keepdims=True)

  # Joint regressor: averages of the head ring at the root / neck / jaw-pivot
  # heights (on the head's vertical axis) and of each eyeball's vertices.
  j_reg = np.zeros((5, n_v))
  for j, height in ((0, -0.150), (1, -0.095), (2, -0.028)):
    ring = np.nonzero(head & (np.abs(y - height) < 0.006))[0]
    j_reg[j, ring] = 1.0 / len(ring)
  for j, name in ((3, "left_eyeball"), (4, "right_eyeball")):
    sl = np.arange(*ranges[name])
    j_reg[j, sl] = 1.0 / len(sl)

  # Identity: a few interpretable global modes, then smooth random fields.
  centred = v - v[head].mean(0)
  n_id, n_ex = 300, 100
  shapedirs = np.zeros((n_v, 3, n_id + n_ex))
  shapedirs[:, 0, 0] = 0.08 * centred[:, 0]          # head width
  shapedirs[:, 1, 1] = 0.06 * centred[:, 1]          # head height
  shapedirs[:, 2, 2] = 0.06 * centred[:, 2]          # head depth
  nose_w = _bump(v[:, :2], (0, -0.012), (0.012, 0.022)) * (z > 0.04)
  shapedirs[:, 2, 3] = 0.004 * nose_w                # nose length
  chin_w = _bump(v[:, :2], (0, -0.078), (0.03, 0.02)) * (z > 0.0)
  shapedirs[:, 1, 4] = -0.004 * chin_w               # chin height
  amp = 0.003 / np.sqrt(1 + np.arange(n_id) / 10.0)
  shapedirs[:, :, 5:n_id] = _smooth_fields(rng, v, n_id - 5, amp[5:])
  # Expression: front-of-face fields (mouth, cheeks, brows), decaying amplitude.
  front = _sigmoid((z - 0.03) / 0.01) * head
  mouth_w = _bump(v[:, :2], (0, MOUTH_Y), (0.03, 0.02)) * front
  brow_w = _bump(v[:, :2], (0, 0.036), (0.05, 0.012)) * front
  shapedirs[:, 1, n_id + 0] = 0.004 * brow_w                          # brows up
  shapedirs[:, 0, n_id + 1] = 0.006 * mouth_w * np.sign(x) * np.abs(x) / 0.02  # smile width
  shapedirs[:, 1, n_id + 1] = 0.003 * mouth_w * (np.abs(x) / 0.02) ** 2       # corners up
  shapedirs[:, 2, n_id + 2] = 0.004 * mouth_w                          # pucker
  amp_e = 0.002 / np.sqrt(1 + np.arange(n_ex) / 10.0)
  shapedirs[:, :, n_id + 3:] = _smooth_fields(rng, v, n_ex - 3, amp_e[3:], weight=front)
  posedirs = _smooth_fields(rng, v, 36, np.full(36, 1e-3))

  model = {
      "v_template": v.astype(np.float32),
      "f": faces.astype(np.uint32),
      "shapedirs": shapedirs.astype(np.float32),
      "posedirs": posedirs.astype(np.float32),
      "J_regressor": j_reg.astype(np.float32),
      "weights": w.astype(np.float32),
      "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
      "J": (j_reg @ v).astype(np.float32),
      "bs_style": "lbs",
      "bs_type": "lrotmin",
  }
  return {"model": model, "landmarks": _landmarks(v, faces, lip_edges),
          "masks": _masks(v, ranges)}


def write_synthetic_flame(folder, seed: int = 0) -> pathlib.Path:
  """Writes the synthetic model in the official file layouts into `folder`
  (see the module docstring) and returns the folder."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  data = make_synthetic_flame_files(seed)
  for name in ("generic_model.pkl", "FLAME_NEUTRAL.pkl"):
    with open(folder / name, "wb") as f:
      pickle.dump(data["model"], f, protocol=2)
  lm = data["landmarks"]
  with open(folder / "flame_static_embedding.pkl", "wb") as f:
    pickle.dump({"lmk_face_idx": lm["static_lmk_faces_idx"].astype(np.uint32),
                 "lmk_b_coords": lm["static_lmk_bary_coords"]}, f, protocol=2)
  np.save(folder / "flame_dynamic_embedding.npy",
          np.array({"lmk_face_idx": lm["dynamic_lmk_faces_idx"],
                    "lmk_b_coords": lm["dynamic_lmk_bary_coords"]}, dtype=object),
          allow_pickle=True)
  np.savez(folder / "landmark_embedding.npz", **lm)
  with open(folder / "FLAME_masks.pkl", "wb") as f:
    pickle.dump(data["masks"], f, protocol=2)
  (folder / "README.txt").write_text(
      "SYNTHETIC FLAME-format model written by kaojax.flame.synthetic. It is NOT the "
      "FLAME model: a procedural stand-in for tests and demos.\n")
  return folder


def make_synthetic_flame(seed: int = 0, n_shape: int = 100, n_expr: int = 50,
                         yaw_sign: str = "deca") -> FlameModel:
  """The synthetic model as a FlameModel, without touching the disk."""
  data = make_synthetic_flame_files(seed)
  m = data["model"]
  arrays = {
      "v_template": m["v_template"], "shapedirs": m["shapedirs"][..., :300],
      "exprdirs": m["shapedirs"][..., 300:], "posedirs": m["posedirs"],
      "j_regressor": m["J_regressor"], "weights": m["weights"],
      "faces": m["f"].astype(np.int64), "parents": np.array(FLAME_PARENTS),
  }
  lm = data["landmarks"]
  arrays.update({
      "static_lmk_faces": lm["static_lmk_faces_idx"], "static_lmk_bary": lm["static_lmk_bary_coords"],
      "dynamic_lmk_faces": lm["dynamic_lmk_faces_idx"],
      "dynamic_lmk_bary": lm["dynamic_lmk_bary_coords"],
      "full_lmk_faces": lm["full_lmk_faces_idx"][0], "full_lmk_bary": lm["full_lmk_bary_coords"][0],
  })
  arrays["face_mask"] = facial_region_face_mask(arrays["faces"], data["masks"], len(m["v_template"]))
  return build_flame_model(arrays, n_shape, n_expr, yaw_sign, "synthetic FLAME")
