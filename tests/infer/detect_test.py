"""MTCNN face detection (kaojax.infer.detect) against facenet-pytorch's MTCNN, the
detector FaceLift's reference runs, on real photos shipped with scikit-image.

facenet-pytorch (installed by the README's test command with
`pip install --no-deps facenet-pytorch==2.6.0`: its metadata pins torch < 2.3 and
torchvision) imports two torchvision functions at module level:
`ops.boxes.batched_nms` and `transforms.functional.to_tensor`. torchvision does not
load beside this torch, so a stand-in module provides them (batched_nms in pure torch
with torchvision's semantics: stable descending-score order, IoU without +1, drop
IoU > threshold) while facenet-pytorch is imported; everything else in its detect
path (P/R/O-Net with its own packaged weights, the pyramid, area resampling, box
generation, calibration, cropping, the 'Min' NMS) is its own code.

Photos: astronaut (one face), camera (one face, three-quarter view, grayscale),
two composites built from shipped photos because no multi-face photo ships in the
installed packages: "canvas" (the astronaut at full size, the cameraman at 0.55, the
astronaut at 0.3 and mirrored at 0.18: four faces, two of them small), and "lfw_grid"
(eight different people from skimage's LFW subset, 25 x 25 crops upscaled 4x, on a
grid); and no-face photos chelsea (a cat) and coffee.
"""

import sys
import types

import numpy as np
import pytest
import skimage.data
import torch

from kaojax.infer import detect, mtcnn_weights
from tests.infer.photos import group_photo, lfw_grid, rgb

PROB = 0.8  # faces compared: probability above this


# --------------------------------------------------------------- reference detector


def _nms(boxes, scores, threshold):
  order = torch.argsort(scores, descending=True, stable=True)
  x0, y0, x1, y1 = boxes.unbind(1)
  area = (x1 - x0) * (y1 - y0)
  removed = torch.zeros(len(boxes), dtype=torch.bool)
  keep = []
  for pos in range(len(order)):
    i = order[pos]
    if removed[i]:
      continue
    keep.append(int(i))
    rest = order[pos + 1:]
    w = (torch.minimum(x1[i], x1[rest]) - torch.maximum(x0[i], x0[rest])).clamp(min=0)
    h = (torch.minimum(y1[i], y1[rest]) - torch.maximum(y0[i], y0[rest])).clamp(min=0)
    inter = w * h
    removed[rest[inter / (area[i] + area[rest] - inter) > threshold]] = True
  return torch.tensor(keep, dtype=torch.long)


def _batched_nms(boxes, scores, idxs, threshold):
  """torchvision.ops.boxes.batched_nms (coordinate-offset form)."""
  if boxes.numel() == 0:
    return torch.empty((0,), dtype=torch.long)
  offsets = idxs.to(boxes) * (boxes.max() + 1)
  return _nms(boxes + offsets[:, None], scores, threshold)


def _to_tensor(pic):
  return torch.from_numpy(np.array(pic, np.float32)).permute(2, 0, 1) / 255.0


@pytest.fixture(scope="module")
def reference():
  """facenet_pytorch.MTCNN(keep_all=True, select_largest=False) on CPU, imported
  over the stand-in torchvision."""
  tv = types.ModuleType("torchvision")
  tv.ops = types.ModuleType("torchvision.ops")
  tv.ops.boxes = types.ModuleType("torchvision.ops.boxes")
  tv.ops.boxes.batched_nms = _batched_nms
  tv.transforms = types.ModuleType("torchvision.transforms")
  tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
  tv.transforms.functional.to_tensor = _to_tensor
  fakes = {"torchvision": tv, "torchvision.ops": tv.ops,
           "torchvision.ops.boxes": tv.ops.boxes, "torchvision.transforms": tv.transforms,
           "torchvision.transforms.functional": tv.transforms.functional}
  owned = ("facenet_pytorch", "torchvision")
  saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in owned}
  for name in saved:
    del sys.modules[name]
  sys.modules.update(fakes)
  try:
    # installed by the README's test command: pip install --no-deps facenet-pytorch==2.6.0
    from facenet_pytorch import MTCNN  # pylint: disable=import-outside-toplevel
    net = MTCNN(keep_all=True, select_largest=False, device="cpu")
    yield net
  finally:
    for name in [n for n in sys.modules if n.split(".")[0] in owned]:
      del sys.modules[name]
    sys.modules.update(saved)


def _reference_detect(net, image):
  with torch.no_grad():
    boxes, probs, points = net.detect(image, landmarks=True)
  if boxes is None:
    return (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
            np.zeros((0, 5, 2), np.float32))
  return tuple(np.asarray(np.asarray(a).tolist(), np.float32)
               for a in (boxes, probs, points))


# ------------------------------------------------------------------------- photos


PHOTOS = {
    "astronaut": (skimage.data.astronaut, 1),
    "camera": (lambda: rgb(skimage.data.camera()), 1),
    "canvas": (group_photo, 4),
    "lfw_grid": (lfw_grid, 8),
}
NO_FACE = {"chelsea": skimage.data.chelsea, "coffee": skimage.data.coffee}


def _iou(a, b):
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -------------------------------------------------------------------------- tests


def test_wheel_weights_are_facenet_weights(reference):
  """The `mtcnn` wheel's Keras arrays (the runtime weights) are facenet-pytorch's
  P/R/O-Net weights, array for array, in the layouts the modules use."""
  ours = mtcnn_weights.load_mtcnn_wheel_weights()
  for name in ("pnet", "rnet", "onet"):
    theirs = mtcnn_weights.from_facenet_state_dict(
        name, getattr(reference, name).state_dict())
    assert theirs.keys() == ours[name].keys()
    for layer, arrays in theirs.items():
      for pname, value in arrays.items():
        np.testing.assert_array_equal(ours[name][layer][pname], value,
                                      err_msg=f"{name}.{layer}.{pname}")


def test_networks_match_facenet(reference):
  """P-Net / R-Net / O-Net outputs on random inputs (odd P-Net size: ceil-mode pool)."""
  # pylint: disable=protected-access
  det = detect.default_detector()
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (1, 37, 51, 3)).astype(np.float32)
  reg, prob = det._pnet(x)  # pylint: disable=protected-access
  with torch.no_grad():
    treg, tprob = reference.pnet(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(reg), treg.permute(0, 2, 3, 1).numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(prob), tprob[:, 1].numpy(), atol=2e-6)
  # zero-padded to a bucket with the padding masked (as detect runs it): same outputs
  padded = np.zeros((1, 64, 64, 3), np.float32)
  padded[:, :37, :51] = x
  preg, pprob = det._pnet(padded, np.array([37, 51], np.int32))
  h, w = reg.shape[1:3]
  np.testing.assert_allclose(np.asarray(preg)[:, :h, :w], reg, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pprob)[:, :h, :w], prob, atol=1e-6)
  for size, ours, theirs in [(24, det._rnet, reference.rnet),
                             (48, det._onet, reference.onet)]:
    x = rng.uniform(-1, 1, (5, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      want = theirs(torch.from_numpy(x).permute(0, 3, 1, 2))
    got = ours(x)
    np.testing.assert_allclose(np.asarray(got[-1]), want[-1][:, 1].numpy(), atol=2e-6)
    for g, w in zip(got[:-1], want[:-1]):
      np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=2e-5)


def test_area_resample_matches_torch():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (57, 83, 3), dtype=np.uint8)
  table = detect._integral(image)  # pylint: disable=protected-access
  t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
  for (y0, y1, x0, x1), size in [((0, 57, 0, 83), (40, 59)), ((3, 50, 10, 20), (24, 24)),
                                 ((0, 5, 7, 80), (48, 48)), ((0, 57, 0, 83), (13, 7))]:
    got = detect._area_resample(  # pylint: disable=protected-access
        table, np.array([y0]), np.array([y1]), np.array([x0]), np.array([x1]), *size)
    want = torch.nn.functional.interpolate(t[:, :, y0:y1, x0:x1], size=size, mode="area")
    np.testing.assert_allclose(got[0], want[0].permute(1, 2, 0).numpy(), rtol=0,
                               atol=2e-5)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_detect_faces_matches_facenet(reference, name):
  make, expected = PHOTOS[name]
  image = np.ascontiguousarray(make(), np.uint8)
  boxes, scores, marks = detect.detect_faces(image)
  assert boxes.shape == (len(scores), 4) and marks.shape == (len(scores), 5, 2)
  assert np.all(np.diff(scores) <= 0), "not sorted by score"
  rboxes, rscores, rmarks = _reference_detect(reference, image)

  ours, theirs = scores > PROB, rscores > PROB
  assert ours.sum() == theirs.sum() == expected, (scores, rscores)
  boxes, scores, marks = boxes[ours], scores[ours], marks[ours]
  rboxes, rscores, rmarks = rboxes[theirs], rscores[theirs], rmarks[theirs]
  for i in range(len(boxes)):  # pair each face with its best-overlapping reference
    j = max(range(len(rboxes)), key=lambda k, i=i: _iou(boxes[i], rboxes[k]))
    assert _iou(boxes[i], rboxes[j]) >= 0.95, (boxes[i], rboxes[j])
    np.testing.assert_allclose(marks[i], rmarks[j], atol=1.5, rtol=0)
    np.testing.assert_allclose(scores[i], rscores[j], atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", list(NO_FACE))
def test_no_face(reference, name):
  image = NO_FACE[name]()
  boxes, scores, marks = detect.detect_faces(image)
  assert boxes.shape == (0, 4) and scores.shape == (0,) and marks.shape == (0, 5, 2)
  assert boxes.dtype == scores.dtype == marks.dtype == np.float32
  assert len(_reference_detect(reference, image)[1]) == 0


def test_weights_load_without_torch_or_tensorflow():
  """The runtime weights need neither torch nor TensorFlow (nor the mtcnn package's
  code): only joblib + lz4 and the wheel's files."""
  import subprocess  # pylint: disable=import-outside-toplevel
  code = ("import sys\n"
          "for m in ('torch', 'tensorflow', 'facenet_pytorch'): sys.modules[m] = None\n"
          "from kaojax.infer import mtcnn_weights\n"
          "w = mtcnn_weights.load_mtcnn_wheel_weights()\n"
          "assert w['onet']['fc5']['kernel'].shape == (1152, 256)\n"
          "assert 'mtcnn' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True)
