"""The on-disk layout of FaceLift's training data (the reference's data loader reads
the same per-subject files):

  root/{uid}/opencv_cameras.json   {"id": uid, "frames": [frame, ...]}
  root/{uid}/images/cam_{NNN}.png  RGBA image of frame NNN (alpha: coverage; the
                                   loaders composite it on the training background)
  root/{split}.json                list of uids (as `data_pipeline.layout`); without
                                   it every subject folder is used

A frame is {"w", "h", "fx", "fy", "cx", "cy" (pixels), "w2c" (4 x 4 world-to-camera,
OpenCV: x right, y down, z forward), "file_path" (relative to the subject folder),
"view" (optional: "front", ..., "front_left" for FaceLift's six fixed cameras,
"random" otherwise)}.

The world is FaceLift's: Z up, the subject facing -Y, the head inside [-1, 1]^3.
kaojax's synthetic heads (`data_pipeline.heads`) put FaceLift's six fixed cameras
(`kaojax.geometry.cameras.facelift_cameras`) in frames 0-5, in FACELIFT_VIEWS order
(the multi-view diffusion model's views), then random cameras on the sphere (the
reconstructor's views).
"""

import json
import pathlib

import numpy as np

from data_pipeline import layout
from data_pipeline.layout import DatasetError, read_png, write_png

CAMERAS_FILE = "opencv_cameras.json"


def image_path(index: int) -> str:
  return f"images/cam_{index:03d}.png"


def write_subject(root, uid: str, rgba, c2w, K, views=None) -> pathlib.Path:
  """rgba [N, H, W, 4] in [0, 1]; c2w [N, 4, 4] OpenCV; K [N, 3, 3] (or [3, 3]);
  views: N view names (default "random"). Returns the subject folder."""
  subject = pathlib.Path(root) / uid
  rgba = np.asarray(rgba)
  n, height, width = rgba.shape[:3]
  K = np.broadcast_to(np.asarray(K, np.float64), (n, 3, 3))
  w2c = np.linalg.inv(np.asarray(c2w, np.float64))
  frames = []
  for i in range(n):
    write_png(subject / image_path(i), rgba[i])
    frames.append({"w": int(width), "h": int(height),
                   "fx": float(K[i, 0, 0]), "fy": float(K[i, 1, 1]),
                   "cx": float(K[i, 0, 2]), "cy": float(K[i, 1, 2]),
                   "w2c": w2c[i].tolist(), "file_path": image_path(i),
                   "view": views[i] if views is not None else "random"})
  (subject / CAMERAS_FILE).write_text(json.dumps({"id": uid, "frames": frames}))
  return subject


def read_cameras(subject_dir):
  """-> (c2w [N, 4, 4] float32, K [N, 3, 3] float32, sizes [N, 2] (w, h), file paths
  [N], view names [N]). Raises DatasetError (naming the file) when the file is
  missing, unreadable, or a frame is malformed or not finite."""
  path = pathlib.Path(subject_dir) / CAMERAS_FILE
  if not path.is_file():
    raise DatasetError(f"missing camera file {path}")
  try:
    frames = json.loads(path.read_text())["frames"]
    w2c = np.asarray([f["w2c"] for f in frames], np.float64)
    K = np.zeros((len(frames), 3, 3))
    K[:, 0, 0] = [f["fx"] for f in frames]
    K[:, 1, 1] = [f["fy"] for f in frames]
    K[:, 0, 2] = [f["cx"] for f in frames]
    K[:, 1, 2] = [f["cy"] for f in frames]
    K[:, 2, 2] = 1.0
    sizes = np.asarray([[f["w"], f["h"]] for f in frames], np.int64)
    files = [str(f["file_path"]) for f in frames]
    views = [str(f.get("view", "random")) for f in frames]
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise DatasetError(f"unreadable camera file {path}: {err}") from err
  if not frames or w2c.shape[1:] != (4, 4):
    raise DatasetError(f"{path}: expected frames with 4 x 4 w2c matrices")
  if not (np.all(np.isfinite(w2c)) and np.all(np.isfinite(K))):
    raise DatasetError(f"{path}: non-finite camera values")
  try:
    c2w = np.linalg.inv(w2c)
  except np.linalg.LinAlgError as err:
    raise DatasetError(f"{path}: singular w2c matrix") from err
  return c2w.astype(np.float32), K.astype(np.float32), sizes, files, views


def read_image(subject_dir, file_path: str, width: int, height: int):
  """RGBA [H, W, 4] float32 of one frame, checked against the frame's size."""
  rgba = read_png(pathlib.Path(subject_dir) / file_path, 4)
  if rgba.shape[:2] != (height, width):
    raise DatasetError(f"{pathlib.Path(subject_dir) / file_path} is {rgba.shape[1]}x"
                       f"{rgba.shape[0]}, its camera says {width}x{height}")
  return rgba


def read_split(root, split: str):
  """The uids of `split` (root/{split}.json, as `data_pipeline.layout.read_split`), or
  every folder holding a camera file when there is no split file."""
  root = pathlib.Path(root)
  if (root / f"{split}.json").is_file() or not root.is_dir():
    return layout.read_split(root, split)
  uids = sorted(p.name for p in root.iterdir() if (p / CAMERAS_FILE).is_file())
  if not uids:
    raise DatasetError(f"no subjects for split {split!r} in {root}")
  return uids
