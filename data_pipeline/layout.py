"""The on-disk dataset layouts of KaoLRM (spec: kaolrm.md, "Datasets").

Multi-view (FaceScape, Multiface, Headspace, FaceVerse, and kaojax's synthetic set):

  root/{uid}/pose/{NNN}.npy     camera-to-world [3, 4] (OpenCV), one per view
  root/{uid}/rgba/{NNN}.png     RGBA image of the view
  root/{uid}/intrinsics.npy     [3, 2]: [[fx, fy], [cx, cy], [W, H]] in pixels
  root/{uid}/lmks2d.npy         [V, 68, 2] landmark pixels per view (<= 0: missing)
  root/{uid}/gt/                (synthetic only) params.npz, mesh.obj, mask/{NNN}.png

Monocular (FFHQ, CelebA):

  root/rgba/{uid}.png, root/mask/{uid}.png, root/lmks.npz (uid -> [68, 2] pixels)

Splits: `root/{split}.json` holds a list of uids; without it every subject is used.
"""

import json
import pathlib
import threading

import numpy as np
from PIL import Image


class DatasetError(ValueError):
  """A dataset file is missing or unreadable; the message names the path."""


def view_name(index: int) -> str:
  return f"{index:03d}"


def write_png(path, image):
  """image [H, W, C] float in [0, 1] or uint8 -> PNG."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


# Largest image read_png decodes (8192 x 8192); a corrupt header can claim far more.
MAX_IMAGE_PIXELS = 1 << 26


def read_png(path, channels: int = 4):
  """PNG -> float32 [H, W, channels] in [0, 1] (alpha 1 if the file has none)."""
  path = pathlib.Path(path)
  mode = {4: "RGBA", 3: "RGB", 1: "L"}[channels]
  if not path.is_file():
    raise DatasetError(f"missing image {path}")
  try:
    with Image.open(path) as image:
      if image.width * image.height > MAX_IMAGE_PIXELS:
        raise DatasetError(f"image {path} is {image.width} x {image.height} pixels, more "
                           f"than the {MAX_IMAGE_PIXELS} read_png accepts")
      array = np.asarray(image.convert(mode), np.float32) / 255.0
  except DatasetError:
    raise
  except (OSError, SyntaxError, ValueError, EOFError, MemoryError,
          Image.DecompressionBombError) as err:  # PIL's errors for corrupt files
    raise DatasetError(f"unreadable image {path}: {err}") from err
  return array.reshape(array.shape[:2] + (channels,))


# np.load parses each .npy header with ast.literal_eval, and CPython 3.11's AST
# constructor keeps its recursion counter in state shared by all threads: parses in
# two threads at once can fail with a spurious "SystemError: AST constructor recursion
# depth mismatch" (python/cpython#106905). The loader threads take this lock, and a
# parse that still collides with another thread's is retried.
_NPY_LOCK = threading.Lock()
_NPY_ATTEMPTS = 3


def _load_npy(path):
  for attempt in range(_NPY_ATTEMPTS):
    try:
      with _NPY_LOCK:
        return np.load(path, allow_pickle=False)
    except SystemError:
      if attempt == _NPY_ATTEMPTS - 1:
        raise


def read_npy(path, shape=None):
  """Loads an .npy array (never pickles), checking its shape where given
  (None entries match any size)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DatasetError(f"missing array {path}")
  try:
    array = _load_npy(path)
  except (OSError, ValueError, EOFError) as err:
    raise DatasetError(f"unreadable array {path}: {err}") from err
  if shape is not None and (array.ndim != len(shape) or any(
      want is not None and got != want for got, want in zip(array.shape, shape))):
    raise DatasetError(f"{path} has shape {array.shape}, expected {shape}")
  return array


def intrinsics_to_file(K, width: int, height: int):
  """K [3, 3] -> the [3, 2] intrinsics file layout."""
  K = np.asarray(K, np.float32)
  return np.array([[K[0, 0], K[1, 1]], [K[0, 2], K[1, 2]], [width, height]], np.float32)


def intrinsics_from_file(array):
  """[3, 2] intrinsics file -> (K [3, 3], width, height)."""
  (fx, fy), (cx, cy), (w, h) = np.asarray(array, np.float32)
  K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], np.float32)
  return K, int(round(w)), int(round(h))


def write_multiview_subject(root, uid: str, c2w, rgba, K, landmarks, gt=None):
  """c2w [V, 4, 4] or [V, 3, 4]; rgba [V, H, W, 4]; K [3, 3]; landmarks [V, 68, 2].
  `gt` (optional): dict of extra arrays saved to gt/params.npz."""
  subject = pathlib.Path(root) / uid
  (subject / "pose").mkdir(parents=True, exist_ok=True)
  rgba = np.asarray(rgba)
  height, width = rgba.shape[1:3]
  for i in range(rgba.shape[0]):
    np.save(subject / "pose" / f"{view_name(i)}.npy", np.asarray(c2w[i][:3], np.float32))
    write_png(subject / "rgba" / f"{view_name(i)}.png", rgba[i])
  np.save(subject / "intrinsics.npy", intrinsics_to_file(K, width, height))
  np.save(subject / "lmks2d.npy", np.asarray(landmarks, np.float32))
  if gt:
    (subject / "gt").mkdir(exist_ok=True)
    np.savez(subject / "gt" / "params.npz", **{k: np.asarray(v) for k, v in gt.items()})
  return subject


def num_views(subject_dir) -> int:
  """The subject's view count: one camera pose file per view."""
  subject_dir = pathlib.Path(subject_dir)
  return len(list((subject_dir / "pose").glob("*.npy")))


def check_view_files(subject_dir, total: int):
  """Raises DatasetError naming the first missing pose or image file of views
  0 .. total - 1 (the views that lmks2d.npy describes)."""
  subject_dir = pathlib.Path(subject_dir)
  for index in range(total):
    for path in (subject_dir / "pose" / f"{view_name(index)}.npy",
                 subject_dir / "rgba" / f"{view_name(index)}.png"):
      if not path.is_file():
        raise DatasetError(f"missing {path} (lmks2d.npy describes {total} views)")


def read_multiview_view(subject_dir, index: int):
  """-> (rgba [H, W, 4] float, c2w [4, 4] float32) of one view."""
  subject_dir = pathlib.Path(subject_dir)
  pose = read_npy(subject_dir / "pose" / f"{view_name(index)}.npy", (3, 4))
  c2w = np.concatenate([pose, np.array([[0, 0, 0, 1]], pose.dtype)]).astype(np.float32)
  if not np.all(np.isfinite(c2w)):
    raise DatasetError(f"non-finite camera pose in {subject_dir}/pose/{view_name(index)}.npy")
  rgba = read_png(subject_dir / "rgba" / f"{view_name(index)}.png", 4)
  return rgba, c2w


def read_multiview_meta(subject_dir):
  """-> (K [3, 3], width, height, landmarks [V, 68, 2])."""
  subject_dir = pathlib.Path(subject_dir)
  K, width, height = intrinsics_from_file(read_npy(subject_dir / "intrinsics.npy", (3, 2)))
  landmarks = read_npy(subject_dir / "lmks2d.npy", (None, 68, 2)).astype(np.float32)
  return K, width, height, landmarks


def write_monocular_sample(root, uid: str, rgba, mask):
  """rgba [H, W, 4], mask [H, W] -> rgba/{uid}.png, mask/{uid}.png (landmarks of all
  samples go to one file: `write_monocular_landmarks`)."""
  root = pathlib.Path(root)
  write_png(root / "rgba" / f"{uid}.png", rgba)
  write_png(root / "mask" / f"{uid}.png", np.asarray(mask, np.float32))


def write_monocular_landmarks(root, landmarks: dict):
  """{uid: [68, 2]} -> root/lmks.npz."""
  np.savez(pathlib.Path(root) / "lmks.npz",
           **{uid: np.asarray(v, np.float32) for uid, v in landmarks.items()})


def write_split(root, split: str, uids):
  path = pathlib.Path(root) / f"{split}.json"
  path.write_text(json.dumps(sorted(uids), indent=0))
  return path


def read_split(root, split: str, monocular: bool = False):
  """The uids of `split` (root/{split}.json), or every subject when the file is
  absent. Raises DatasetError when the dataset has no subjects."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DatasetError(f"dataset folder {root} does not exist")
  path = root / f"{split}.json"
  if path.is_file():
    try:
      uids = json.loads(path.read_text())
    except json.JSONDecodeError as err:
      raise DatasetError(f"split file {path} is not valid JSON: {err}") from err
    if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
      raise DatasetError(f"split file {path} must hold a list of uid strings")
  elif monocular:
    uids = sorted(p.stem for p in (root / "rgba").glob("*.png"))
  else:
    uids = sorted(p.name for p in root.iterdir() if (p / "pose").is_dir())
  if not uids:
    raise DatasetError(f"no subjects for split {split!r} in {root}")
  return uids
