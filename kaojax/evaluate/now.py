"""The NoW benchmark protocol: layout, landmarks, crop, alignment, scan-to-mesh errors.

Per image (`score_prediction`), as the official evaluation code does it:
  1. the scan's 7 landmarks (MeshLab `.pp`, `read_pp`) in NoW's order: right eye outer,
     right eye inner, left eye inner, left eye outer, nose bottom, right and left mouth
     corner (iBUG 36, 39, 42, 45, 33, 48, 54);
  2. the scan is cropped to a ball around the nose (`crop_ball`): centre = nose bottom
     + 0.3 (nose bridge - nose bottom), nose bridge = mean of the inner eye corners,
     radius = 1.4 (outer eye distance + nose length) / 2; vertices within it are kept;
  3. the prediction is mapped onto the scan by the similarity (Procrustes, scale and
     the best orthogonal matrix) of its 7 landmarks onto the scan's (`procrustes`);
  4. that alignment is refined by minimising the sum of squared unsigned distances from
     the cropped scan's vertices to the predicted surface over scale, rotation and
     translation (`refine_alignment`); the metrical variant keeps unit scale and refines
     rotation and translation only;
  5. the errors are the unsigned distances from every cropped scan vertex to the closest
     point of the aligned predicted surface (`kaojax.evaluate.distances`), in the scan's
     unit (NoW's scans are in millimetres).
Statistics (`summarize`): the errors of all images of a challenge (and of all
challenges: `overall`) pooled, then median, mean and std (population); the cumulative
error curve (`cumulative_curve`) is the percentage of pooled errors <= x, 0-8 mm.

Layout (`now_items`): an image list of lines `SUBJECT/CHALLENGE/NAME.jpg` (the
validation list is `imagepathsvalidation.txt`), scans `scans/SUBJECT/*.obj`, landmarks
`scans_lmks_onlypp/SUBJECT/*.pp`; predictions `PRED/SUBJECT/CHALLENGE/NAME.obj` (or
`.ply`) with `NAME.npy` (or `.txt`) holding the 7 landmarks. A missing scan, landmark
file, prediction or a mesh with the wrong vertex count is reported by name and skipped.

Deviations from the official code:
  - the refinement is our own Levenberg-Marquardt on point-to-surface residuals
    (closest points recomputed every iteration), not chumpy's dogleg; the objective is
    the same (its scale penalty, zero for a positive scale, is a log-scale
    parametrisation here) and the optimum is the same up to the stopping tolerances;
  - the metrical variant's starting translation is the unit-scale Procrustes one (the
    official code starts from the translation of the scaled solution and lets the
    refinement move it); predictions are converted by `unit` (m, cm, mm) as there;
  - `.pp` files are parsed as XML (points in document order) rather than by fixed line
    numbers 8-14, so files with other headers read the same; `write_pp` writes
    MeshLab's layout, whose points sit on those lines;
  - the curve is sampled on a fixed grid (0.01 mm) instead of 100,000 histogram bins;
  - the crop keeps the scan's vertices only (faces are not needed for scan-to-mesh);
  - zero-area predicted faces need no removal (the distance handles them exactly; the
    official code can optionally drop them first, `clean_mesh`).
"""

import dataclasses
import pathlib
import xml.etree.ElementTree as ET
from typing import Optional

import numpy as np

from kaojax.evaluate.distances import MeshDistance

CHALLENGES = ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")
LANDMARK_NAMES = ("right_eye_outer", "right_eye_inner", "left_eye_inner", "left_eye_outer",
                  "nose_bottom", "right_mouth_corner", "left_mouth_corner")
IBUG_INDICES = (36, 39, 42, 45, 33, 48, 54)
UNITS_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
CURVE_MAX_MM, CURVE_STEP_MM = 8.0, 0.01


# ------------------------------------------------------------------ files


def read_pp(path) -> np.ndarray:
  """MeshLab picked points -> [N, 3] float64, in the file's order."""
  root = ET.parse(path).getroot()
  points = [[float(p.get(axis)) for axis in "xyz"] for p in root.iter("point")]
  if not points:
    raise ValueError(f"{path}: no <point> in the picked-points file")
  return np.array(points, np.float64)


def write_pp(path, points, names=None, mesh_name: str = "") -> pathlib.Path:
  """Writes points [N, 3] as MeshLab does (header on lines 0-7, one point a line)."""
  path = pathlib.Path(path)
  names = names or [str(i) for i in range(len(points))]
  lines = ["<!DOCTYPE PickingPointsFile>", "<PickedPoints>", " <DocumentData>",
           '  <DateTime time="00:00:00" date="2026-01-01"/>', '  <User name="kaojax"/>',
           f'  <DataFileName name="{mesh_name}"/>', '  <templateName name=""/>',
           " </DocumentData>"]
  for (x, y, z), name in zip(np.asarray(points, np.float64), names):
    lines.append(f' <point x="{x:.6f}" y="{y:.6f}" z="{z:.6f}" active="1" name="{name}"/>')
  lines.append("</PickedPoints>")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")
  return path


def read_landmarks(path) -> np.ndarray:
  """A prediction's 7 landmarks from .npy or whitespace-separated .txt -> [7, 3]."""
  path = pathlib.Path(path)
  points = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
  points = np.asarray(points, np.float64)
  if points.shape != (7, 3):
    raise ValueError(f"{path}: landmarks must be [7, 3], got {points.shape}")
  return points


def read_mesh(path):
  """(vertices [V, 3] float64, faces [F, 3] int64) of a triangle .obj or .ply."""
  path = pathlib.Path(path)
  if path.suffix == ".ply":
    from plyfile import PlyData  # pylint: disable=import-outside-toplevel
    ply = PlyData.read(str(path))
    v = np.stack([ply["vertex"][a] for a in "xyz"], -1).astype(np.float64)
    f = np.stack(ply["face"].data[ply["face"].data.dtype.names[0]]).astype(np.int64)
    return v, f
  vertices, faces = [], []
  with open(path) as handle:
    for line in handle:
      if line.startswith("v "):
        vertices.append(line.split()[1:4])
      elif line.startswith("f "):
        corners = [int(c.split("/")[0]) for c in line.split()[1:]]
        corners = [c - 1 if c > 0 else len(vertices) + c for c in corners]
        faces += [(corners[0], corners[k], corners[k + 1]) for k in range(1, len(corners) - 1)]
  return np.array(vertices, np.float64).reshape(-1, 3), np.array(faces, np.int64).reshape(-1, 3)


# ------------------------------------------------------------------ geometry


def crop_ball(landmarks):
  """Scan landmarks [7, 3] -> (centre [3], radius) of NoW's face crop."""
  lm = np.asarray(landmarks, np.float64)
  bridge = 0.5 * (lm[1] + lm[2])
  centre = lm[4] + 0.3 * (bridge - lm[4])
  radius = 1.4 * (np.linalg.norm(lm[0] - lm[3]) + np.linalg.norm(bridge - lm[4])) / 2
  return centre, float(radius)


def crop_scan(vertices, landmarks):
  """Scan vertices [N, 3] within NoW's crop ball -> [M, 3]."""
  centre, radius = crop_ball(landmarks)
  vertices = np.asarray(vertices, np.float64)
  return vertices[np.linalg.norm(vertices - centre, axis=-1) <= radius]


def procrustes(src, dst, with_scale: bool = True, reflection: bool = True):
  """Similarity (s, R [3, 3], t [3]) minimising sum ||dst - (s R src + t)||^2 for
  src, dst [N, 3]. reflection=True: R is the best orthogonal matrix (the official
  code's reflection='best'); False: a proper rotation."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  xs, xd = src - mu_s, dst - mu_d
  u, sig, vt = np.linalg.svd(xd.T @ xs)
  d = np.ones(3)
  if not reflection and np.linalg.det(u @ vt) < 0:
    d[2] = -1
  rotation = (u * d) @ vt
  scale = float(np.sum(sig * d) / np.sum(xs * xs)) if with_scale else 1.0
  return scale, rotation, mu_d - scale * rotation @ mu_s


def apply(transform, points):
  """(s, R, t) applied to points [N, 3]."""
  s, r, t = transform
  return s * np.asarray(points, np.float64) @ r.T + t


def _rodrigues(omega):
  angle = np.linalg.norm(omega)
  if angle < 1e-300:
    return np.eye(3)
  k = omega / angle
  kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
  return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def scan_to_mesh(scan, mesh: MeshDistance, transform):
  """Unsigned distances [N] of scan points [N, 3] to the mesh mapped by (s, R, t),
  with the closest points [N, 3] (scan frame) and their faces [N]."""
  s, r, t = transform
  local = (np.asarray(scan, np.float64) - t) @ r / s             # into the mesh's frame
  d, face, closest = mesh.query(local)
  return s * d, apply(transform, closest), face


def refine_alignment(scan, mesh: MeshDistance, transform, with_scale: bool = True,
                     iterations: int = 30, tolerance: float = 1e-10):
  """Levenberg-Marquardt over (log scale, rotation, translation) of the mesh's
  similarity, minimising sum_i dist(scan_i, s R mesh + t)^2 from `transform`
  (s, R, t). Returns (the refined transform, the final distances [N])."""
  scan = np.asarray(scan, np.float64)
  origin = scan.mean(0)                                           # for conditioning
  d, closest, face = scan_to_mesh(scan, mesh, transform)
  cost, damping = float(np.sum(d * d)), 1e-3
  tri = mesh.triangles
  for _ in range(iterations):
    normal = np.cross(tri[face, 1] - tri[face, 0], tri[face, 2] - tri[face, 0]) @ transform[1].T
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-300)
    u = np.where((d > 1e-12)[:, None], (scan - closest) / np.maximum(d, 1e-300)[:, None],
                 normal)
    x = closest - origin
    jac = np.concatenate([np.sum(u * x, -1, keepdims=True), np.cross(x, u), u], -1)
    if not with_scale:
      jac = jac[:, 1:]
    jtj, jtr = jac.T @ jac, jac.T @ d
    improved, done = False, False
    while damping < 1e12:
      step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), jtr)
      # The linearised model's decrease of the cost: too small -> converged.
      if 2 * step @ jtr - step @ jtj @ step <= tolerance * cost:
        done = True
        break
      if with_scale:
        ds, step6 = step[0], step[1:]
      else:
        ds, step6 = 0.0, step
      g_rot = _rodrigues(step6[:3])
      g_scale = np.exp(ds)
      s, r, t = transform
      candidate = (s * g_scale, g_rot @ r,
                   g_scale * g_rot @ (t - origin) + origin + step6[3:])
      d_new, closest_new, face_new = scan_to_mesh(scan, mesh, candidate)
      cost_new = float(np.sum(d_new * d_new))
      if cost_new < cost:
        improved = True
        done = cost - cost_new <= tolerance * cost
        transform, d, closest, face, cost = candidate, d_new, closest_new, face_new, cost_new
        damping = max(damping / 10, 1e-9)
        break
      damping *= 10
    if done or not improved:
      break
  return transform, d


# ------------------------------------------------------------------ one image


@dataclasses.dataclass
class Score:
  """One image's result: errors [N] (cropped scan vertices, scan units), the final
  similarity (scale, rotation [3, 3], translation [3]) of the prediction."""
  errors: np.ndarray
  scale: float
  rotation: np.ndarray
  translation: np.ndarray


def score_prediction(scan_vertices, scan_landmarks, pred_vertices, pred_faces,
                     pred_landmarks, metrical: bool = False, unit: str = "m",
                     refine: bool = True, iterations: int = 30) -> Score:
  """NoW's errors of one prediction (vertices [V, 3], faces [F, 3], landmarks [7, 3])
  against one scan (vertices [N, 3], its 7 landmarks [7, 3])."""
  crop = crop_scan(scan_vertices, scan_landmarks)
  if len(crop) == 0:
    raise ValueError("the crop around the scan's nose holds no vertex")
  mesh = MeshDistance(pred_vertices, pred_faces)
  if metrical:
    factor = UNITS_TO_MM[unit]
    _, r, t = procrustes(factor * np.asarray(pred_landmarks), scan_landmarks, with_scale=False)
    transform = (factor, r, t)
  else:
    transform = procrustes(pred_landmarks, scan_landmarks)
  if refine:
    transform, errors = refine_alignment(crop, mesh, transform, with_scale=not metrical,
                                         iterations=iterations)
  else:
    errors = scan_to_mesh(crop, mesh, transform)[0]
  return Score(errors, float(transform[0]), transform[1], transform[2])


# ------------------------------------------------------------------ benchmark layout


@dataclasses.dataclass
class Item:
  """One image of the list: its line, subject, challenge, name (stem) and the files
  found for it (None when missing)."""
  line: str
  subject: str
  challenge: str
  name: str
  scan: Optional[pathlib.Path] = None
  scan_landmarks: Optional[pathlib.Path] = None
  mesh: Optional[pathlib.Path] = None
  landmarks: Optional[pathlib.Path] = None


def image_list(now_root, image_set: str = "val", path: str = ""):
  """The lines of NoW's image list (validation: imagepathsvalidation.txt)."""
  root = pathlib.Path(now_root)
  path = pathlib.Path(path) if path else root / (
      "imagepathsvalidation.txt" if image_set == "val" else "imagepathstest.txt")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _first(folder, pattern):
  found = sorted(folder.glob(pattern)) if folder.is_dir() else []
  return found[0] if found else None


def now_items(now_root, predictions, lines, challenge: str = ""):
  """Items of `lines` (optionally one challenge) with their scan and prediction files."""
  root, pred = pathlib.Path(now_root), pathlib.Path(predictions)
  items = []
  for line in lines:
    parts = line.replace("\\", "/").split("/")
    subject, chal, filename = parts[-3], parts[-2], parts[-1]
    if challenge and chal != challenge:
      continue
    stem = filename.rsplit(".", 1)[0]
    folder = pred / subject / chal
    items.append(Item(
        line, subject, chal, stem,
        scan=_first(root / "scans" / subject, "*.obj"),
        scan_landmarks=_first(root / "scans_lmks_onlypp" / subject, "*.pp"),
        mesh=next((p for p in (folder / f"{stem}.obj", folder / f"{stem}.ply") if p.is_file()), None),
        landmarks=next((p for p in (folder / f"{stem}.npy", folder / f"{stem}.txt")
                        if p.is_file()), None)))
  return items


def missing_reason(item: Item, vertices=None, num_vertices: int = 0) -> str:
  """Why an item cannot be scored ('' when it can)."""
  for what, path in (("scan", item.scan), ("scan landmarks (.pp)", item.scan_landmarks),
                     ("predicted mesh", item.mesh), ("predicted landmarks", item.landmarks)):
    if path is None:
      return f"missing {what}"
  if vertices is not None and num_vertices and len(vertices) != num_vertices:
    return f"predicted mesh has {len(vertices)} vertices, expected {num_vertices}"
  return ""


# ------------------------------------------------------------------ statistics


def summarize(errors_by_challenge: dict) -> dict:
  """{challenge: [errors arrays]} -> {challenge and 'overall': {median, mean, std,
  images, points}} over the pooled errors (NaN statistics for an empty challenge)."""
  out, pooled = {}, []
  for name, arrays in errors_by_challenge.items():
    pooled += list(arrays)
    out[name] = _stats(arrays)
  out["overall"] = _stats(pooled)
  return out


def _stats(arrays):
  values = np.concatenate(arrays) if arrays else np.zeros(0)
  stat = (lambda f: float(f(values))) if len(values) else (lambda f: float("nan"))
  return {"median": stat(np.median), "mean": stat(np.mean), "std": stat(np.std),
          "images": len(arrays), "points": int(len(values))}


def cumulative_curve(errors, max_mm: float = CURVE_MAX_MM, step: float = CURVE_STEP_MM):
  """(x [K] in mm, percentage [K] of errors <= x) on 0..max_mm."""
  x = np.round(np.arange(0, max_mm + step / 2, step), 6)
  values = np.sort(np.asarray(errors, np.float64).ravel())
  if len(values) == 0:
    return x, np.zeros_like(x)
  return x, 100.0 * np.searchsorted(values, x, side="right") / len(values)
