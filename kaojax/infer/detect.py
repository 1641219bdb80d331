"""MTCNN face detection (P-Net -> R-Net -> O-Net), as FaceLift's reference runs it
through facenet-pytorch's `MTCNN` (min face 20, thresholds 0.6 / 0.7 / 0.7, factor
0.709).

    boxes, scores, landmarks = detect_faces(image)   # image uint8 [H, W, 3]

boxes [N, 4] (x0, y0, x1, y1, pixels), scores [N], landmarks [N, 5, 2] (x, y: eyes,
nose, mouth corners), sorted by score, descending; N may be 0.

The three networks are flax.nnx modules, jitted per input shape: each pyramid level
zero-padded to a multiple of PNET_BUCKET (32) with the padding masked inside P-Net, so
levels of images of different sizes share compiled programs; R-Net / O-Net over
batches padded to power-of-two buckets (>= 16). The rest follows
facenet-pytorch's `detect_face` step by step, on the host in float32 numpy:
  - pyramid: m = 12 / min_face, scales m * factor^k while min(H, W) * scale >= 12,
    each level resized to (int(H * s + 1), int(W * s + 1)) with area interpolation
    (torch `interpolate(mode="area")` = adaptive average pooling, computed exactly
    here from an integral image), normalised (x - 127.5) * 0.0078125;
  - P-Net boxes: cells with p >= t0 on the stride-2, 12-pixel grid,
    floor((2 * idx + 1) / s), floor((2 * idx + 12) / s); NMS 0.5 per scale, then 0.7
    over all scales (torchvision NMS semantics: IoU without +1, drop IoU > t);
    regression with the box width (x1 - x0), `rerec` squaring;
  - R-Net / O-Net crops: the box truncated to int and clipped to [1, W] x [1, H] (no
    zero padding: the clipped region is resized), area-resized to 24 / 48;
    R-Net: p > t1, NMS 0.7, regression (width x1 - x0 + 1), rerec;
    O-Net: p > t2, landmarks from the un-regressed box, regression, NMS 0.7 with the
    'Min' overlap (+1 areas, keep overlap <= 0.7) as facenet-pytorch's numpy NMS.

Weights: `kaojax.infer.mtcnn_weights` (the `mtcnn` wheel's arrays; no download, no
torch).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaojax.infer import mtcnn_weights
from kaojax.nn.layers import conv, linear

MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709
PNET_BUCKET = 32  # P-Net input sizes are rounded up to multiples of this


# ----------------------------------------------------------------------------- networks


class PReLU(nnx.Module):
  """Per-channel PReLU over the last axis (torch: x if x > 0 else alpha * x)."""

  def __init__(self, channels: int):
    self.alpha = nnx.Param(jnp.full((channels,), 0.25, jnp.float32))

  def __call__(self, x):
    return jnp.where(x > 0, x, self.alpha[...] * x)


def _max_pool_ceil(x, k: int, s: int):
  """MaxPool2d(k, s, ceil_mode=True) over NHWC (the window tail padded with -inf)."""
  pads = [(0, 0)]
  for n in x.shape[1:3]:
    out = -(-(n - k) // s) + 1
    pads.append((0, max((out - 1) * s + k - n, 0)))
  pads.append((0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), pads)


_MASKED = -1e30  # finite (no inf * 0 = nan) stand-in for -inf in padded P-Net input


def _flatten_wh(x):
  """[N, H, W, C] -> [N, W * H * C] in (w, h, c) order, as the Caffe weights expect."""
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nnx.Module):
  """Proposal network (fully convolutional). NHWC in -> (reg [.., 4], p_face [..])."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1, self.prelu1 = conv(3, 10, 3, rngs, padding=0), PReLU(10)
    self.conv2, self.prelu2 = conv(10, 16, 3, rngs, padding=0), PReLU(16)
    self.conv3, self.prelu3 = conv(16, 32, 3, rngs, padding=0), PReLU(32)
    self.reg = conv(32, 4, 1, rngs, padding=0)
    self.cls = conv(32, 2, 1, rngs, padding=0)

  def __call__(self, x, valid_hw=None):
    """valid_hw: optional (h, w) (may be traced) of the real image inside a larger
    zero-padded `x`: outputs then equal those of the unpadded image on its
    [.., ceil((h - 2) / 2) - 4, ceil((w - 2) / 2) - 4] corner (the rest is junk)."""
    x = self.prelu1(self.conv1(x))
    if valid_hw is not None:
      # Rows/cols past the real conv1 output act as the ceil-mode pool's -inf padding.
      rows = jnp.arange(x.shape[1])[:, None] < valid_hw[0] - 2
      cols = jnp.arange(x.shape[2])[None, :] < valid_hw[1] - 2
      x = jnp.where((rows & cols)[None, :, :, None], x, _MASKED)
    x = _max_pool_ceil(x, 2, 2)
    x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
    return self.reg(x), jax.nn.softmax(self.cls(x), axis=-1)[..., 1]


class RNet(nnx.Module):
  """Refinement network: [N, 24, 24, 3] -> (reg [N, 4], p_face [N])."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1, self.prelu1 = conv(3, 28, 3, rngs, padding=0), PReLU(28)
    self.conv2, self.prelu2 = conv(28, 48, 3, rngs, padding=0), PReLU(48)
    self.conv3, self.prelu3 = conv(48, 64, 2, rngs, padding=0), PReLU(64)
    self.fc4, self.prelu4 = linear(576, 128, (None, None), rngs), PReLU(128)
    self.reg = linear(128, 4, (None, None), rngs)
    self.cls = linear(128, 2, (None, None), rngs)

  def __call__(self, x):
    x = _max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
    x = _max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
    x = self.prelu4(self.fc4(_flatten_wh(self.prelu3(self.conv3(x)))))
    return self.reg(x), jax.nn.softmax(self.cls(x), axis=-1)[..., 1]


class ONet(nnx.Module):
  """Output network: [N, 48, 48, 3] -> (reg [N, 4], landmarks [N, 10] (5 x then 5 y,
  box-relative), p_face [N])."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1, self.prelu1 = conv(3, 32, 3, rngs, padding=0), PReLU(32)
    self.conv2, self.prelu2 = conv(32, 64, 3, rngs, padding=0), PReLU(64)
    self.conv3, self.prelu3 = conv(64, 64, 3, rngs, padding=0), PReLU(64)
    self.conv4, self.prelu4 = conv(64, 128, 2, rngs, padding=0), PReLU(128)
    self.fc5, self.prelu5 = linear(1152, 256, (None, None), rngs), PReLU(256)
    self.reg = linear(256, 4, (None, None), rngs)
    self.landmarks = linear(256, 10, (None, None), rngs)
    self.cls = linear(256, 2, (None, None), rngs)

  def __call__(self, x):
    x = _max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
    x = _max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
    x = _max_pool_ceil(self.prelu3(self.conv3(x)), 2, 2)
    x = self.prelu5(self.fc5(_flatten_wh(self.prelu4(self.conv4(x)))))
    return self.reg(x), self.landmarks(x), jax.nn.softmax(self.cls(x), axis=-1)[..., 1]


def load_params(module: nnx.Module, params: dict) -> nnx.Module:
  """Copy a canonical `mtcnn_weights` dict (layer -> {param -> array}) into `module`."""
  for layer, arrays in params.items():
    sub = getattr(module, layer)
    for pname, value in arrays.items():
      var = getattr(sub, pname)
      if tuple(var.shape) != tuple(value.shape):
        raise ValueError(f"{type(module).__name__}.{layer}.{pname}: shape "
                         f"{tuple(value.shape)} != {tuple(var.shape)}")
      var.set_value(jnp.asarray(value, jnp.float32))
  unset = [jax.tree_util.keystr(path) for path, leaf
           in jax.tree_util.tree_leaves_with_path(nnx.state(module))
           if not isinstance(leaf, jax.Array)]
  if unset:
    raise ValueError(f"{type(module).__name__}: no weights given for {unset}")
  return module


def _jitted(module: nnx.Module):
  graphdef, state = nnx.split(module)

  @jax.jit
  def apply(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return functools.partial(apply, state)


# ----------------------------------------------------------------- host-side pipeline


def _integral(image: np.ndarray) -> np.ndarray:
  """[H, W, C] -> float64 [H + 1, W + 1, C] summed-area table (exact for uint8)."""
  s = np.zeros((image.shape[0] + 1, image.shape[1] + 1, image.shape[2]), np.float64)
  np.cumsum(np.cumsum(image, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])
  return s


def _area_bins(start: np.ndarray, length: np.ndarray, out: int):
  """torch adaptive-pool windows: [floor(i n / o), ceil((i + 1) n / o)) for i < o,
  offset by `start`; start/length [B] ints -> (lo, hi) [B, out]."""
  i = np.arange(out)[None, :]
  n = length[:, None]
  lo = (i * n) // out
  hi = -((-(i + 1) * n) // out)
  return start[:, None] + lo, start[:, None] + hi


def _area_resample(table: np.ndarray, y0, y1, x0, x1, oh: int, ow: int) -> np.ndarray:
  """Area-resize the regions rows [y0, y1) x cols [x0, x1) (int arrays [B]) of the
  image behind `table` to [B, oh, ow, C] float32 (torch interpolate mode="area")."""
  ylo, yhi = _area_bins(y0, y1 - y0, oh)
  xlo, xhi = _area_bins(x0, x1 - x0, ow)
  a, b = ylo[:, :, None], yhi[:, :, None]
  c, d = xlo[:, None, :], xhi[:, None, :]
  sums = table[b, d] - table[a, d] - table[b, c] + table[a, c]
  count = ((b - a) * (d - c))[..., None]
  return (sums / count).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
  return (x - np.float32(127.5)) * np.float32(0.0078125)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """torchvision.ops.nms semantics (float32): IoU with areas (x1 - x0) (y1 - y0),
  suppress IoU > threshold; kept indices by descending score (stable sort)."""
  boxes = np.asarray(boxes, np.float32)
  order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
  x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
  area = (x1 - x0) * (y1 - y0)
  removed = np.zeros(len(boxes), bool)
  keep = []
  thr = np.float32(threshold)
  for pos, i in enumerate(order):
    if removed[i]:
      continue
    keep.append(i)
    rest = order[pos + 1:]
    rest = rest[~removed[rest]]
    if rest.size == 0:
      continue
    zero = np.float32(0)
    w = np.maximum(zero, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
    h = np.maximum(zero, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
    inter = w * h
    iou = inter / (area[i] + area[rest] - inter)
    removed[rest[iou > thr]] = True
  return np.asarray(keep, np.int64)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """facenet-pytorch's numpy NMS with the 'Min' overlap: +1 areas, overlap =
  intersection / min(area), keep overlap <= threshold; by descending score."""
  if len(boxes) == 0:
    return np.zeros((0,), np.int64)
  boxes = np.asarray(boxes, np.float32)
  x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
  area = (x1 - x0 + 1) * (y1 - y0 + 1)
  order = np.argsort(np.asarray(scores, np.float32))
  keep = []
  while order.size:
    i, rest = order[-1], order[:-1]
    keep.append(i)
    w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
    h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
    overlap = (w * h) / np.minimum(area[i], area[rest])
    order = rest[overlap <= threshold]
  return np.asarray(keep, np.int64)


def _rerec(b: np.ndarray) -> np.ndarray:
  """Square the boxes about their centres (side max(w, h), w = x1 - x0)."""
  b = b.copy()
  h = b[:, 3] - b[:, 1]
  w = b[:, 2] - b[:, 0]
  side = np.maximum(w, h)
  b[:, 0] = b[:, 0] + w * np.float32(0.5) - side * np.float32(0.5)
  b[:, 1] = b[:, 1] + h * np.float32(0.5) - side * np.float32(0.5)
  b[:, 2] = b[:, 0] + side
  b[:, 3] = b[:, 1] + side
  return b


def _bbreg(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
  """Box regression with +1 widths (R-Net / O-Net)."""
  b = b.copy()
  w = b[:, 2] - b[:, 0] + 1
  h = b[:, 3] - b[:, 1] + 1
  b[:, 0] = b[:, 0] + reg[:, 0] * w
  b[:, 1] = b[:, 1] + reg[:, 1] * h
  b[:, 2] = b[:, 2] + reg[:, 2] * w
  b[:, 3] = b[:, 3] + reg[:, 3] * h
  return b


def _crop_windows(boxes: np.ndarray, w: int, h: int):
  """facenet-pytorch `pad`: trunc to int, clip to [1, W] x [1, H]; the crop is rows
  [y - 1, ey) x cols [x - 1, ex). -> (y0, y1, x0, x1, valid)."""
  b = np.trunc(boxes[:, :4]).astype(np.int64)
  x = np.maximum(b[:, 0], 1)
  y = np.maximum(b[:, 1], 1)
  ex = np.minimum(b[:, 2], w)
  ey = np.minimum(b[:, 3], h)
  valid = (ey > y - 1) & (ex > x - 1)
  return y - 1, ey, x - 1, ex, valid


def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


class MTCNN:
  """The three networks with their weights, and the detection pipeline."""

  def __init__(self, min_face_size: int = MIN_FACE_SIZE, thresholds=THRESHOLDS,
               factor: float = FACTOR, params: Optional[dict] = None):
    self.min_face_size, self.factor = min_face_size, factor
    self.thresholds = tuple(thresholds)
    params = mtcnn_weights.load_mtcnn_wheel_weights() if params is None else params
    # Built abstractly (no random init: eager init ops cost seconds), then filled.
    self.pnet = load_params(nnx.eval_shape(lambda: PNet(nnx.Rngs(0))), params["pnet"])
    self.rnet = load_params(nnx.eval_shape(lambda: RNet(nnx.Rngs(0))), params["rnet"])
    self.onet = load_params(nnx.eval_shape(lambda: ONet(nnx.Rngs(0))), params["onet"])
    self._pnet, self._rnet, self._onet = (_jitted(self.pnet), _jitted(self.rnet),
                                          _jitted(self.onet))

  def scales(self, h: int, w: int):
    m = 12.0 / self.min_face_size
    minl = min(h, w) * m
    scale, out = m, []
    while minl >= 12:
      out.append(scale)
      scale *= self.factor
      minl *= self.factor
    return out

  def _batched(self, fn, crops: np.ndarray):
    n = len(crops)
    padded = np.zeros((_bucket(n),) + crops.shape[1:], np.float32)
    padded[:n] = crops
    return [np.asarray(o)[:n] for o in fn(jnp.asarray(padded))]

  def _stage1(self, table, h, w):
    t0 = np.float32(self.thresholds[0])
    full = (np.zeros(1, np.int64), np.full(1, h), np.zeros(1, np.int64), np.full(1, w))
    picked = []
    for scale in self.scales(h, w):
      oh, ow = int(h * scale + 1), int(w * scale + 1)
      im = _normalise(_area_resample(table, *full, oh, ow))
      # Padded to PNET_BUCKET multiples (one compiled P-Net per bucket, shared by
      # pyramid levels of images of other sizes); the padding is masked out.
      ph, pw = (-(-n // PNET_BUCKET) * PNET_BUCKET for n in (oh, ow))
      padded = np.zeros((1, ph, pw, 3), np.float32)
      padded[:, :oh, :ow] = im
      reg, prob = self._pnet(jnp.asarray(padded), jnp.asarray([oh, ow], jnp.int32))
      out_h, out_w = -(-(oh - 2) // 2) - 4, -(-(ow - 2) // 2) - 4
      reg = np.asarray(reg)[0, :out_h, :out_w]
      prob = np.asarray(prob)[0, :out_h, :out_w]
      mask = prob >= t0
      if not mask.any():
        continue
      iy, ix = np.nonzero(mask)
      cell = np.stack([ix, iy], 1).astype(np.float32)
      s = np.float32(scale)
      q1 = np.floor((np.float32(2) * cell + np.float32(1)) / s)
      q2 = np.floor((np.float32(2) * cell + np.float32(12)) / s)
      b = np.concatenate([q1, q2, prob[mask][:, None], reg[mask]], 1).astype(np.float32)
      picked.append(b[nms(b[:, :4], b[:, 4], 0.5)])
    if not picked:
      return np.zeros((0, 5), np.float32)
    b = np.concatenate(picked, 0)
    b = b[nms(b[:, :4], b[:, 4], 0.7)]
    rw = b[:, 2] - b[:, 0]
    rh = b[:, 3] - b[:, 1]
    out = np.stack([b[:, 0] + b[:, 5] * rw, b[:, 1] + b[:, 6] * rh,
                    b[:, 2] + b[:, 7] * rw, b[:, 3] + b[:, 8] * rh, b[:, 4]], 1)
    return _rerec(out.astype(np.float32))

  def _crops(self, table, boxes, h, w, size):
    y0, y1, x0, x1, valid = _crop_windows(boxes, w, h)
    crops = np.zeros((len(boxes), size, size, 3), np.float32)
    if valid.any():
      crops[valid] = _area_resample(table, y0[valid], y1[valid], x0[valid], x1[valid],
                                    size, size)
    return _normalise(crops), valid

  def detect(self, image: np.ndarray):
    """image uint8 [H, W, 3] (or [H, W] gray) -> (boxes [N, 4], scores [N],
    landmarks [N, 5, 2]), float32, by descending score."""
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, -1)
    image = image[..., :3]
    h, w = image.shape[:2]
    table = _integral(image)
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
             np.zeros((0, 5, 2), np.float32))

    boxes = self._stage1(table, h, w)
    if len(boxes) == 0:
      return empty

    crops, valid = self._crops(table, boxes, h, w, 24)
    reg, prob = self._batched(self._rnet, crops)
    ok = (prob > np.float32(self.thresholds[1])) & valid
    boxes = np.concatenate([boxes[ok, :4], prob[ok, None]], 1)
    reg = reg[ok]
    keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
    boxes = _rerec(_bbreg(boxes[keep], reg[keep]))
    if len(boxes) == 0:
      return empty

    crops, valid = self._crops(table, boxes, h, w, 48)
    reg, marks, prob = self._batched(self._onet, crops)
    ok = (prob > np.float32(self.thresholds[2])) & valid
    boxes = np.concatenate([boxes[ok, :4], prob[ok, None]], 1)
    reg, marks = reg[ok], marks[ok]
    bw = boxes[:, 2] - boxes[:, 0] + 1
    bh = boxes[:, 3] - boxes[:, 1] + 1
    px = bw[:, None] * marks[:, :5] + boxes[:, 0:1] - 1
    py = bh[:, None] * marks[:, 5:] + boxes[:, 1:2] - 1
    points = np.stack([px, py], -1).astype(np.float32)
    boxes = _bbreg(boxes, reg)
    keep = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
    boxes, points = boxes[keep], points[keep]
    order = np.argsort(-boxes[:, 4], kind="stable")
    boxes, points = boxes[order], points[order]
    return (boxes[:, :4].astype(np.float32), boxes[:, 4].astype(np.float32),
            points.reshape(-1, 5, 2))


@functools.lru_cache(maxsize=1)
def default_detector() -> MTCNN:
  """The reference settings with the packaged weights (built once)."""
  return MTCNN()


def detect_faces(image: np.ndarray):
  """MTCNN with FaceLift's settings (min face 20, thresholds 0.6 / 0.7 / 0.7, factor
  0.709). image uint8 [H, W, 3] -> (boxes [N, 4] as x0, y0, x1, y1 in pixels,
  scores [N], landmarks [N, 5, 2] as (x, y)), sorted by score, descending."""
  return default_detector().detect(image)
