"""Face crops for inference, each with its transform back to the original photo.

Every crop function returns a 2x3 affine `M` (float64) mapping original-photo pixel
coordinates to crop pixel coordinates, p_crop = M @ (x, y, 1); `invert_affine(M)`
maps crop (or model-output) coordinates back onto the photo. Coordinates are
continuous with pixel (i, j) covering [j, j + 1) x [i, i + 1) (its centre at +0.5),
the convention of MTCNN's boxes and landmarks and of PIL's geometric transforms.
`warp(image, M, size)` resamples the photo into the crop (white outside it).

The crops:
  * `framing_transform(box, size, framing)`: a `Framing` (the face box's mean side
    and centre as fractions of the crop side) applied to a detected box: scale
    size * face_size / mean(box w, h), the box centre placed at size * center.
  * `facelift_transform`: FaceLift's reference protocol (spec facelift.md, section 3),
    the framing FACELIFT_FRAMING: scale s = 194.2749650813705 / mean(box w, h), the
    box centre placed at (251.8327, 280.0134) of a 512 x 512 white canvas.
  * `ffhq_transform`: KaoLRM's monocular model (trained on FFHQ-aligned portraits):
    the FFHQ alignment recipe (NVlabs/ffhq-dataset `recreate_aligned_images`) applied
    to MTCNN's 5 landmarks (eye centres, nose tip, mouth corners) instead of the 68
    iBUG points: eye_avg = mean of the eyes, mouth_avg = mean of the mouth corners,
    eye_to_eye = right-of-image eye - left-of-image eye, eye_to_mouth = mouth_avg -
    eye_avg; x = eye_to_eye - rot90(eye_to_mouth), normalised, times
    max(2.0 |eye_to_eye|, 1.8 |eye_to_mouth|); y = rot90(x); centre c = eye_avg +
    0.1 eye_to_mouth; the square of corners c -/+ x -/+ y (side 2|x|) becomes the
    output square. A similarity (rotation, uniform scale, translation); MTCNN's eye
    points are eye centres as FFHQ's are (means of six iBUG eye points), so the
    template is FFHQ's own, only its inputs come from a different detector.
  * `multiview`: KaoLRM's multi-view model (rendered heads in a 224 source view) is
    framed like its training renders: `python -m kaojax.infer.framing --data=ROOT`
    measures the framing of the detector's boxes over a dataset's views, and the
    inference config takes it (`multiview_framing`). MULTIVIEW_FRAMING, the default,
    was measured so on kaojax's synthetic renders, which follow the paper's
    rendering protocol (head normalised into [-1, 1]^3, cameras at distance 2 on the
    frontal hemisphere, normalised focal 0.75): `python -m data_pipeline.synthetic
    --out S --subjects 24 --views 32 --size 224 --seed 7` then `python -m
    kaojax.infer.framing --data=S --max_views=0` (a face in 127 of 672 views; the
    median box side 0.485 of the view, centre (0.506, 0.433)). The real training
    renders (FaceVerse etc., not available here) should be measured the same way.
  * `full_transform`: no detection: the whole image, scaled so its longer side fills
    the square and centred (white bars on the shorter side), for inputs that are
    already face crops.
"""

import dataclasses

import numpy as np
from PIL import Image

FACELIFT_SIZE = 512
FACELIFT_FACE_SIZE = 194.2749650813705
FACELIFT_CENTER = (251.8327, 280.0134)
CROPS = ("ffhq", "multiview", "facelift")


@dataclasses.dataclass(frozen=True)
class Framing:
  """Where a face box sits in a square crop, in fractions of the crop's side:
  face_size = mean(box w, h) / side; center = (x, y) of the box centre / side."""
  face_size: float
  center: tuple

  def __post_init__(self):
    if not (np.isfinite(self.face_size) and 0 < self.face_size <= 4
            and len(self.center) == 2 and np.all(np.isfinite(self.center))):
      raise ValueError(f"bad framing: face_size {self.face_size}, center {self.center}")

  @classmethod
  def parse(cls, spec: str) -> "Framing":
    """"face_size,cx,cy" (what `python -m kaojax.infer.framing` prints)."""
    try:
      face_size, cx, cy = (float(v) for v in str(spec).split(","))
    except ValueError:
      raise ValueError(f"framing must be 'face_size,cx,cy', got {spec!r}") from None
    return cls(face_size, (cx, cy))


FACELIFT_FRAMING = Framing(FACELIFT_FACE_SIZE / FACELIFT_SIZE,
                           (FACELIFT_CENTER[0] / FACELIFT_SIZE, FACELIFT_CENTER[1] / FACELIFT_SIZE))
MULTIVIEW_FRAMING = Framing(0.4854, (0.5061, 0.4327))   # measured (module doc)


def _affine(scale, rotation, center_src, center_dst) -> np.ndarray:
  """2x3: p -> scale * rotation @ (p - center_src) + center_dst."""
  a = scale * np.asarray(rotation, np.float64)
  t = np.asarray(center_dst, np.float64) - a @ np.asarray(center_src, np.float64)
  return np.concatenate([a, t[:, None]], 1)


def _box(box) -> np.ndarray:
  box = np.asarray(box, np.float64)
  if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
    raise ValueError(f"box must be finite (x0, y0, x1, y1) with x1 > x0, y1 > y0, got {box}")
  return box


def framing_transform(box, size: int, framing: Framing) -> np.ndarray:
  """The crop of side `size` that puts a face box (x0, y0, x1, y1) where `framing` says."""
  box = _box(box)
  scale = size * framing.face_size / np.mean([box[2] - box[0], box[3] - box[1]])
  center = (size * framing.center[0], size * framing.center[1])
  return _affine(scale, np.eye(2), (box[:2] + box[2:]) / 2, center)


def facelift_transform(box) -> np.ndarray:
  """FaceLift's crop of a face box (x0, y0, x1, y1) onto its 512 canvas."""
  return framing_transform(box, FACELIFT_SIZE, FACELIFT_FRAMING)


def full_transform(image_size, size: int) -> np.ndarray:
  """The whole image (w, h) fitted into a size x size square, centred."""
  w, h = (float(v) for v in image_size)
  if not (w > 0 and h > 0):
    raise ValueError(f"image size must be positive, got {image_size}")
  return _affine(size / max(w, h), np.eye(2), (w / 2, h / 2), (size / 2, size / 2))


def ffhq_quad(landmarks5):
  """(centre c [2], half-axes x [2], y [2]) of FFHQ's oriented crop square from
  MTCNN's landmarks [5, 2] (eye, eye, nose, mouth corner, mouth corner)."""
  lm = np.asarray(landmarks5, np.float64)
  if lm.shape != (5, 2) or not np.all(np.isfinite(lm)):
    raise ValueError(f"landmarks5 must be finite [5, 2], got {lm.shape}")
  eyes, mouth = lm[0:2], lm[3:5]
  # Order each pair by image x so that a mirrored detector order does not flip the crop.
  eyes, mouth = eyes[np.argsort(eyes[:, 0])], mouth[np.argsort(mouth[:, 0])]
  eye_avg, mouth_avg = eyes.mean(0), mouth.mean(0)
  eye_to_eye, eye_to_mouth = eyes[1] - eyes[0], mouth_avg - eye_avg
  x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])  # eye_to_eye - rot90
  norm = np.hypot(*x)
  if norm < 1e-9:
    raise ValueError("degenerate landmarks: no in-plane direction")
  x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
  y = np.array([-x[1], x[0]])   # flipud(x) * [-1, 1]
  return eye_avg + eye_to_mouth * 0.1, x, y


def ffhq_transform(landmarks5, size: int) -> np.ndarray:
  """The FFHQ-aligned crop (module doc) of side `size`."""
  c, x, y = ffhq_quad(landmarks5)
  half = np.hypot(*x)
  rotation = np.stack([x / half, y / half])   # rows: the crop's u and v axes
  return _affine(size / (2 * half), rotation, c, (size / 2, size / 2))


def output_size(kind: str, size: int) -> int:
  """The side of crop `kind` asked for at `size` (FaceLift's is always 512)."""
  if kind not in CROPS:
    raise ValueError(f"unknown crop {kind!r} (known: {', '.join(CROPS)})")
  return FACELIFT_SIZE if kind == "facelift" else int(size)


def crop_transform(kind: str, box, landmarks5, size: int, framing: Framing = None) -> tuple:
  """(M [2, 3], output size) of crop `kind` ('ffhq', 'multiview' with `framing`
  (default MULTIVIEW_FRAMING) or 'facelift')."""
  if kind == "ffhq":
    return ffhq_transform(landmarks5, size), size
  if kind == "multiview":
    return framing_transform(box, size, framing or MULTIVIEW_FRAMING), size
  if kind == "facelift":
    return facelift_transform(box), FACELIFT_SIZE
  raise ValueError(f"unknown crop {kind!r} (known: {', '.join(CROPS)})")


def invert_affine(m) -> np.ndarray:
  """The inverse 2x3 affine."""
  m = np.asarray(m, np.float64)
  a = np.linalg.inv(m[:, :2])
  return np.concatenate([a, -(a @ m[:, 2])[:, None]], 1)


def apply_affine(m, points) -> np.ndarray:
  """points [..., 2] -> M applied, [..., 2]."""
  m, points = np.asarray(m, np.float64), np.asarray(points, np.float64)
  return points @ m[:, :2].T + m[:, 2]


def affine_scale(m) -> float:
  """The (geometric mean) scale factor of a 2x3 affine."""
  return float(np.sqrt(abs(np.linalg.det(np.asarray(m, np.float64)[:, :2]))))


def warp(image, m, size, fill=255, resample=Image.BICUBIC) -> np.ndarray:
  """image uint8 [H, W, 3] -> the crop uint8 [size, size, 3] (size: int or (w, h)):
  crop pixel q samples the photo at invert_affine(m) @ q (`resample`: PIL's
  bicubic by default), `fill` outside.
  Strong reductions are first done by a Lanczos resize of the whole photo (exact in
  these coordinates: a scale of new/old size per axis) so the crop is not aliased."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"warp: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  width, height = (size, size) if np.isscalar(size) else size
  m = np.asarray(m, np.float64)
  pil = Image.fromarray(image)
  scale = affine_scale(m)
  if scale < 0.75:
    w = max(1, int(round(image.shape[1] * scale * 1.25)))
    h = max(1, int(round(image.shape[0] * scale * 1.25)))
    pre = np.diag([w / image.shape[1], h / image.shape[0]])
    pil = pil.resize((w, h), Image.LANCZOS)
    m = np.concatenate([m[:, :2] @ np.linalg.inv(pre), m[:, 2:]], 1)
  inv = invert_affine(m)
  out = pil.transform((int(width), int(height)), Image.AFFINE, tuple(inv.ravel()),
                      resample=resample, fillcolor=(fill,) * 3)
  return np.asarray(out)
