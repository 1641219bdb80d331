"""Which photos an inference job reads, and how it decodes them.

`list_inputs(spec)`: `spec` is an image or video file, a folder (searched recursively
for IMAGE_SUFFIXES and `kaojax.infer.video.VIDEO_SUFFIXES`, sorted), a glob pattern
(`*`, `?`, `[`; `**` recursive) or a text file of paths (one a line; blank lines and
lines starting with '#' skipped; relative paths are relative to the text file's
folder). Returns absolute paths in a stable order, no duplicates. A text file is
anything not ending in an image or video suffix.

`read_image(path)`: uint8 [H, W, 3] RGB, EXIF orientation applied
(`ImageOps.exif_transpose`), RGBA / LA / transparent palettes composited on white,
grey / palette / CMYK / 16-bit images converted to RGB. Unreadable files raise
`UnreadableImage` (the job turns it into an `unreadable` row).
"""

import glob
import os
import pathlib

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UnreadableImage(Exception):
  """A file that cannot be decoded as an image."""


def is_image_path(path) -> bool:
  return pathlib.Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_input_path(path) -> bool:
  """An image or a video, by its suffix."""
  from kaojax.infer.video import is_video_path   # video reads UnreadableImage from here
  return is_image_path(path) or is_video_path(path)


def _images_under(folder: pathlib.Path) -> list:
  return sorted(p for p in folder.rglob("*") if p.is_file() and is_input_path(p))


def list_inputs(spec) -> list:
  """The image paths an input spec names (module doc). Raises FileNotFoundError when
  the spec names nothing that exists."""
  spec = str(spec)
  if not spec:
    raise ValueError("no input given (--config.input=PATH)")
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    found = _images_under(path)
  elif path.is_file() and is_input_path(path):
    found = [path]
  elif path.is_file():
    found = []
    for line in path.read_text(errors="replace").splitlines():
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      entry = pathlib.Path(line).expanduser()
      found.append(entry if entry.is_absolute() else path.parent / entry)
  elif glob.has_magic(spec):
    found = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                   if os.path.isfile(p) and is_input_path(p))
  else:
    raise FileNotFoundError(f"input {spec!r}: no such file, folder or matching glob")
  seen, out = set(), []
  for p in found:
    p = pathlib.Path(os.path.abspath(p))
    if p not in seen:
      seen.add(p)
      out.append(p)
  return out


def to_rgb(image: Image.Image) -> np.ndarray:
  """A decoded PIL image -> uint8 [H, W, 3] RGB (transparency composited on white)."""
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(image, np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L")
                                            and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert("RGB"), np.uint8).copy()


def read_image(path) -> np.ndarray:
  """uint8 [H, W, 3] (module doc); UnreadableImage on any decoding failure."""
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      rgb = to_rgb(image)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
    raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from e
  if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise UnreadableImage(f"{path}: empty image {rgb.shape}")
  return rgb
