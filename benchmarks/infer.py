"""KaoLRM inference from real photos: the whole job against its model forward, and
kaojax's MTCNN against facenet-pytorch's, each pair measured in the same run.

    python benchmarks/infer.py [--quick] [--preset tiny|base] [--dtype bfloat16]
                               [--photos N] [--batch B] [--repeats R]

Photos: real pictures shipped with scikit-image (the astronaut, the cameraman, an
LFW grid, tests/infer/photos.py's four-face group photo) and variants of them
(mirrored, grey, rescaled), one face each reconstructed (faces=largest).

1. Images per second end to end: the `infer_kaolrm` job (`kaojax.infer.kaolrm.run`,
   rerun=True, params.npz only, the random weights saved once as a model directory)
   over N photos and over copies of them (--copies: C1 N, C2 N inputs), after a
   warm-up run on one photo. Each job run loads the model and compiles its forward
   again, while its background threads decode and detect photos ahead (all of them:
   a few dozen photos' detection hides under the compile), so
     job_images_per_s         N / wall time of the N-photo run (what a user of a
                              one-off run of N photos sees: loading and compiling
                              included)
     job_steady_images_per_s  (C2 - C1) N / (wall(C2 N) - wall(C1 N)): the rate of
                              a long run, the fixed costs and the compile-time
                              overlap cancelled (each wall the best of --job-repeats)
     seconds_per_photo        the job's own per-stage seconds (results.jsonl), mean
                              over the C2 N photos after the first batch (the stages
                              overlap: detection runs in background threads)
   against the model forward alone: `Reconstructor` (the job's jitted forward and
   render) on batches of the same photos' prepared crops (best of R, after a warm-up):
     forward_images_per_s, and steady_over_forward = job_steady / forward (the share
   of the job's time per photo that the model is).
   --preset base: the base-size model with random weights (speed does not depend on
   them). On a CPU it is slow (seconds per image, a minute or more to build and
   compile), so its default is 4 photos in batches of 2.
2. Detector milliseconds per photo: `kaojax.infer.detect.detect_faces` (jitted per
   input size: first call per photo reported apart, then best of R, the two
   detectors' calls interleaved) against
   facenet-pytorch's MTCNN (min_face_size 20, thresholds 0.6 / 0.7 / 0.7, factor
   0.709, CPU) on the same photos, torch on every core and on one (on a shared
   machine under load its threads stall each other): per photo the faster setting is
   the peer (facenet_ms), both are reported. facenet-pytorch imports
   torchvision's `batched_nms`, and torchvision is not installed beside this torch:
   a numpy stand-in with torchvision's semantics is timed on its own
   (facenet_nms_ms_per_photo) and `speedup_vs_facenet_without_nms` credits facenet
   with a free NMS (a bound on what the C++ one could give).

The last line is one JSON object with every number.
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

from timing import best_time  # pylint: disable=wrong-import-position


# ---------------------------------------------------------------------------- photos


def make_photos(quick: bool) -> dict:
  """name -> uint8 [H, W, 3]: real photos and variants, a face in each."""
  import skimage.data
  from tests.infer.photos import group_photo, lfw_grid, resize, rgb
  ast = skimage.data.astronaut()
  if quick:   # small sizes: few pyramid levels to compile
    return {"astronaut": resize(ast, 0.5),
            "mirrored": resize(np.ascontiguousarray(ast[:, ::-1]), 0.5),
            "camera": rgb(resize(skimage.data.camera(), 0.5))}
  return {
      "astronaut": ast,
      "group": group_photo(),
      "camera": rgb(skimage.data.camera()),
      "mirrored": np.ascontiguousarray(ast[:, ::-1]),
      "grey": rgb(np.asarray(Image.fromarray(ast).convert("L"))),
      "astronaut_small": resize(ast, 0.6),
      "astronaut_large": resize(ast, 1.5),
      "lfw_grid": lfw_grid(),
  }


def write_photos(photos: dict, folder: pathlib.Path, copies: int = 1) -> pathlib.Path:
  folder.mkdir(parents=True)
  for copy in range(copies):
    for name, image in photos.items():
      Image.fromarray(image).save(folder / f"{name}_{copy}.jpg", quality=92)
  return folder


# ------------------------------------------------------------------------- the job


def job_config(args, photos_dir, model_dir=""):
  from configs import infer_kaolrm
  config = infer_kaolrm.get_config("tiny" if args.preset == "tiny" else "")
  config.preset = "" if model_dir else args.preset
  config.model = model_dir
  config.input = str(photos_dir)
  config.batch_size = args.batch
  config.dtype = args.dtype
  config.rerun = True
  if args.render_size:
    config.render_size = args.render_size
  if args.num_samples:
    config.num_samples = args.num_samples
  if "outputs" in config:
    config.outputs = "params"         # the parameters only: no meshes, renders
  else:
    config.visualize = False
  return config


def time_job(config, out) -> float:
  from kaojax.infer import kaolrm
  start = time.perf_counter()
  summary = kaolrm.run(config, out)
  seconds = time.perf_counter() - start
  inputs = summary["inputs"]
  if summary["ok"] != inputs:
    raise RuntimeError(f"the job reconstructed {summary['ok']} of {inputs} photos: "
                       f"{(pathlib.Path(out) / 'results.jsonl').read_text()[-2000:]}")
  return seconds


def stage_seconds(out: pathlib.Path, skip: int) -> dict:
  """Mean seconds per photo of each stage the job's rows record (read, detect, crop,
  model, write), over the photos after the first `skip` (whose first batch
  compiled the forward)."""
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  rows = [r for r in rows if r.get("status") == "ok"][skip:]
  keys = sorted({k for r in rows for k in r.get("seconds", {})})
  return {k: float(np.mean([r["seconds"].get(k, 0.0) for r in rows])) for k in keys}


def prepared_sources(photos: dict, out: pathlib.Path, size: int) -> np.ndarray:
  """[N, S, S, 3] the model inputs of the job's faces (its saved crop transforms)."""
  from kaojax.images import prepare_source_image
  from kaojax.infer import crops
  sources = []
  for name, image in photos.items():
    params = np.load(out / f"{name}_0" / "params.npz")
    crop = crops.warp(image, params["crop_transform"], int(params["crop_size"]))
    sources.append(prepare_source_image(crop / 255.0, size))
  return np.stack(sources)


def bench_job(args, photos: dict, root: pathlib.Path) -> dict:
  from kaojax.infer import detect, kaolrm
  from kaojax.models import loading
  # The detector compiled for every photo size (each job run builds a new model).
  for image in photos.values():
    detect.detect_faces(image)
  once = write_photos(photos, root / "copies_1")
  model_dir = str(loading.save_model(root / "model",
                                     kaolrm.build_model(job_config(args, once))))
  n = len(photos)
  # A first run of one photo compiles what a process compiles once (not per run).
  first = dict(list(photos.items())[:1])
  time_job(job_config(args, write_photos(first, root / "first"), model_dir),
           root / "out_first")
  walls = {}
  for copies in sorted({1, *args.copies}):
    folder = once if copies == 1 else write_photos(photos, root / f"copies_{copies}", copies)
    walls[copies] = min(time_job(job_config(args, folder, model_dir), root / f"out_{copies}")
                        for _ in range(args.job_repeats))
  config = job_config(args, once, model_dir)
  model = kaolrm.build_model(config)
  size = model.cfg.lrm.encoder.image_size
  render_size = int(config.render_size) or size
  recon = kaolrm.Reconstructor(model, config.batch_size, render_size, config.synth_focal,
                               config.seed)
  sources = prepared_sources(photos, root / "out_1", size)
  batch = recon.batch_size
  batches = [sources[i:i + batch] for i in range(0, n - batch + 1, batch)] or [sources]
  per_batch = best_time(lambda: [recon(b) for b in batches], args.repeats) / len(batches)
  forward = len(batches[0]) / per_batch
  # The slope between the two largest runs; None when the larger was not slower
  # (timing noise above the photos' cost).
  small, large = sorted(walls)[-2:]
  extra = (large - small) * n
  steady = extra / (walls[large] - walls[small]) if walls[large] > walls[small] else None
  return {
      "photos": n, "batch": batch, "image_size": size, "render_size": render_size,
      "num_samples": model.cfg.num_samples, "job_wall_s": walls[1],
      "job_wall_s_by_copies": {str(c): w for c, w in walls.items()},
      "job_images_per_s": n / walls[1],
      "job_steady_images_per_s": steady, "forward_images_per_s": forward,
      "steady_over_forward": steady / forward if steady else None,
      "seconds_per_photo": stage_seconds(root / f"out_{large}", batch),
  }


# ------------------------------------------------------------------------ detectors


class NMSTimer:
  """torchvision's `batched_nms` (boxes offset per index, IoU without +1, a box
  dropped when its IoU with a kept, higher-scoring one is > threshold), in numpy,
  with the seconds spent in it."""

  def __init__(self):
    self.seconds = 0.0

  def __call__(self, boxes, scores, idxs, threshold):
    import torch
    start = time.perf_counter()
    b = boxes.detach().double().numpy()
    if len(b):
      b = b + (idxs.detach().double().numpy() * (b.max() + 1))[:, None]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    order = np.argsort(-scores.detach().double().numpy(), kind="stable")
    keep = []
    while len(order):
      i, rest = order[0], order[1:]
      keep.append(i)
      w = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
      h = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
      inter = w * h
      order = rest[inter / (area[i] + area[rest] - inter) <= threshold]
    self.seconds += time.perf_counter() - start
    return torch.as_tensor(np.asarray(keep, np.int64))


def facenet_mtcnn(nms):
  """facenet-pytorch's MTCNN with FaceLift's settings, over a torchvision stand-in
  holding `nms` (its detect path needs nothing else of torchvision)."""
  tv = types.ModuleType("torchvision")
  tv.ops = types.ModuleType("torchvision.ops")
  tv.ops.boxes = types.ModuleType("torchvision.ops.boxes")
  tv.ops.boxes.batched_nms = nms
  tv.transforms = types.ModuleType("torchvision.transforms")
  tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
  sys.modules.update({"torchvision": tv, "torchvision.ops": tv.ops,
                      "torchvision.ops.boxes": tv.ops.boxes,
                      "torchvision.transforms": tv.transforms,
                      "torchvision.transforms.functional": tv.transforms.functional})
  from facenet_pytorch import MTCNN
  return MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709, keep_all=True,
               select_largest=False, device="cpu")


def bench_detectors(args, photos: dict) -> dict:
  import torch
  from kaojax.infer import detect
  threads = sorted({os.cpu_count(), 1}, reverse=True)
  torch.set_num_threads(threads[0])
  nms = NMSTimer()
  reference = facenet_mtcnn(nms)

  def facenet(image):
    with torch.no_grad():
      return reference.detect(image, landmarks=True)

  def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  rows = []
  for name, image in photos.items():
    first = timed(lambda: detect.detect_faces(image))   # compiles for this size
    ours = detect.detect_faces(image)
    theirs = facenet(image)[1]                          # warm-up
    # Interleaved, best of R each: a load change on the machine hits all of them.
    # facenet with torch on every core and on one (on a shared, loaded machine its
    # threads can stall each other); its faster setting is the peer.
    t_ours, t_ref, nms_ms = [], {n: [] for n in threads}, {n: [] for n in threads}
    for _ in range(args.repeats):
      t_ours.append(timed(lambda: detect.detect_faces(image)))
      for n in threads:
        torch.set_num_threads(n)
        nms.seconds = 0.0
        t_ref[n].append(timed(lambda: facenet(image)))
        nms_ms[n].append(nms.seconds)
    by_threads = {n: min(t) for n, t in t_ref.items()}
    peer = min(by_threads, key=by_threads.get)
    best = int(np.argmin(t_ref[peer]))
    found = lambda scores: int(np.sum(np.asarray(scores if scores is not None else []) > 0.8))
    rows.append({"photo": name, "size": [image.shape[1], image.shape[0]],
                 "faces": [found(ours[1]), found(theirs)],
                 "kaojax_first_call_ms": 1e3 * first, "kaojax_ms": 1e3 * min(t_ours),
                 "facenet_ms": 1e3 * by_threads[peer], "facenet_threads": peer,
                 "facenet_nms_ms": 1e3 * nms_ms[peer][best],
                 **{f"facenet_ms_{n}_threads": 1e3 * t for n, t in by_threads.items()}})
  mean = lambda key: float(np.mean([r[key] for r in rows]))
  ours, theirs, nms_ms = mean("kaojax_ms"), mean("facenet_ms"), mean("facenet_nms_ms")
  return {"kaojax_ms_per_photo": ours, "facenet_ms_per_photo": theirs,
          "facenet_nms_ms_per_photo": nms_ms,
          "kaojax_first_call_ms_per_photo": mean("kaojax_first_call_ms"),
          "speedup_vs_facenet": theirs / ours,
          "speedup_vs_facenet_without_nms": (theirs - nms_ms) / ours,
          **{f"facenet_ms_per_photo_{n}_threads": mean(f"facenet_ms_{n}_threads")
             for n in threads},
          "per_photo": rows}


# ------------------------------------------------------------------------------ main


def _rounded(value):
  if isinstance(value, float):
    return round(value, 4)
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_rounded(v) for v in value]
  return value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="3 small photos, tiny model (64 surfels, 32-px renders), one "
                           "timed repeat: a smoke run")
  parser.add_argument("--preset", default="tiny", choices=("tiny", "base"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--photos", type=int, default=None,
                      help="photos used (default 8 for tiny, 4 for base)")
  parser.add_argument("--batch", type=int, default=None,
                      help="faces per forward (default 4 for tiny, 2 for base)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls of the forward and the detectors (best of)")
  parser.add_argument("--job-repeats", type=int, default=None,
                      help="timed runs of the job per photo count (best of)")
  parser.add_argument("--copies", default=None,
                      help="comma-separated copy counts of the N photos for the larger "
                           "job runs; the steady rate is the slope between the two "
                           "largest (default 4,12 for tiny, 3 for base, 2 with --quick)")
  parser.add_argument("--render-size", type=int, default=0,
                      help="render size of the job (0: its default)")
  parser.add_argument("--num-samples", type=int, default=0,
                      help="surfels per face (0: the model's)")
  parser.add_argument("--skip", default="", help="comma-separated: job, detector")
  args = parser.parse_args(argv)
  base = args.preset == "base"
  args.batch = args.batch or (2 if base or args.quick else 4)
  args.repeats = args.repeats or (1 if args.quick else 5)
  args.job_repeats = args.job_repeats or (1 if args.quick else 2)
  args.copies = [int(c) for c in (args.copies or (
      "2" if args.quick else "3" if base else "4,12")).split(",")]
  if args.quick:
    args.render_size = args.render_size or 32
    args.num_samples = args.num_samples or 64
  photos = make_photos(args.quick)
  count = args.photos or (len(photos) if not base else 4)
  photos = dict(list(photos.items())[:count])
  skip = set(filter(None, args.skip.split(",")))

  result = {"benchmark": "kaolrm_inference", "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "quick": args.quick, "preset": args.preset, "dtype": args.dtype}
  root = pathlib.Path(tempfile.mkdtemp(prefix="kaojax-bench-infer-"))
  try:
    if "job" not in skip:
      job = bench_job(args, photos, root)
      print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {_rounded(v)}"
                      for k, v in job.items()), flush=True)
      result["job"] = job
    if "detector" not in skip:
      det = bench_detectors(args, photos)
      for r in det["per_photo"]:
        print(f"{r['photo']:16s} {r['size'][0]}x{r['size'][1]}  kaojax {r['kaojax_ms']:.1f} ms "
              f"(first call {r['kaojax_first_call_ms']:.0f} ms)  facenet {r['facenet_ms']:.1f} "
              f"ms ({r['facenet_threads']} threads, nms {r['facenet_nms_ms']:.1f})  "
              f"faces {r['faces']}", flush=True)
      result["detector"] = det
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(_rounded(result)))
  return result


if __name__ == "__main__":
  main()
