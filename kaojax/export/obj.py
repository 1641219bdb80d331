"""Wavefront OBJ export of triangle meshes (optionally with per-vertex colours)."""

import pathlib

import numpy as np


def write_obj(path, vertices, faces, colors=None) -> pathlib.Path:
  """vertices [V, 3], faces [F, 3] (0-based), colors [V, 3] in [0, 1] (optional,
  written as the common 'v x y z r g b' extension)."""
  path = pathlib.Path(path)
  vertices, faces = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
  if vertices.ndim != 2 or vertices.shape[1] != 3:
    raise ValueError(f"vertices must be [V, 3], got {vertices.shape}")
  if faces.ndim != 2 or faces.shape[1] != 3:
    raise ValueError(f"faces must be [F, 3], got {faces.shape}")
  if not np.all(np.isfinite(vertices)):
    raise ValueError(f"{path}: not written, the vertices contain NaN or infinite values")
  if colors is None:
    rows, row = vertices, "v %.6f %.6f %.6f\n"
  else:
    rows = np.concatenate([vertices, np.asarray(colors, np.float64)], 1)
    row = "v %.6f %.6f %.6f %.4f %.4f %.4f\n"
  # One formatting call per block: a few times faster than an f-string per line.
  text = (row * len(rows)) % tuple(rows.ravel().tolist()) + (
      ("f %d %d %d\n" * len(faces)) % tuple((faces + 1).ravel().tolist()))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def read_obj(path):
  """(vertices [V, 3], faces [F, 3]) from an OBJ written by `write_obj` (or any
  triangle OBJ; texture/normal indices are ignored)."""
  verts, faces = [], []
  for line in pathlib.Path(path).read_text().splitlines():
    parts = line.split()
    if not parts:
      continue
    if parts[0] == "v":
      verts.append([float(x) for x in parts[1:4]])
    elif parts[0] == "f":
      faces.append([int(p.split("/")[0]) - 1 for p in parts[1:4]])
  return np.array(verts, np.float32), np.array(faces, np.int64)
