"""KaoLRM batch inference from real photos (the job `infer_kaolrm`).

    python run.py --config=configs/infer_kaolrm.py --config.input=PHOTOS \
        --config.model=MODEL_DIR --workdir=OUT

Per photo (`kaojax.infer.inputs`): MTCNN (`kaojax.infer.detect`, FaceLift's settings)
-> faces with probability > face_threshold, the largest (`faces=largest`, by box
area) or all (`faces=all`) -> a crop of each (`kaojax.infer.crops`: `ffhq` for a
monocular model, `square` for the multi-view one, or `facelift`) -> the model's source
image (`kaojax.images.prepare_source_image`) -> `KaoLRM.forward_and_render` at the
canonical source camera (normalised focal synth_focal), in fixed-size batches padded to
`batch_size` (one compilation), faces of several photos sharing a batch.

Outputs, per face, in OUT/<name> (faces=largest) or OUT/<name>/face_<k> (faces=all,
k in descending detector score); <name> is the photo's file stem (plus a hash of its
path when two inputs share a stem):
  params.npz       shape [n_shape], expression [n_expr], pose [6] (global, jaw
                   axis-angle), scale [1], translation [3], box [4] (x0, y0, x1, y1) and
                   landmarks5 [5, 2] (MTCNN) in original-photo pixels, score [] (MTCNN
                   probability), crop_transform [2, 3] (photo pixels -> crop pixels;
                   `crops.invert_affine` maps back), crop_kind, crop_size [], image_size
                   [2] (w, h), landmarks3d [68, 3] (posed, FLAME world), landmarks2d
                   [68, 2] (their projection in the render camera mapped onto the photo;
                   the crop's bicubic align-corners resize makes this exact to about a
                   source pixel), lmk7 [7, 3], synth_focal [].
  mesh.obj         the model's posed FLAME mesh (vertices * scale + translation), metres.
  mesh_neutral.obj the same shape and scale with expression and pose zeroed, no
                   translation: what the NoW benchmark expects.
  lmk7.npy         [7, 3] NoW's landmarks of the neutral mesh: FLAME's landmarks3d at
                   iBUG 36, 39, 42, 45, 33, 48, 54.
  vis.png          input crop | surfel render | shaded mesh normals (render_size each).
  reference/       the reference inference's exports, for one-to-one comparisons:
                   mesh.ply (the posed mesh scaled by synth_focal / 0.75, as the
                   reference writes it), mesh_shape.npy, mesh_expression.npy,
                   mesh_pose.npy, mesh_lmks.npy (the 68 3D landmarks, same scaling).
Face folders are written under a temporary name and renamed when complete.

OUT/results.jsonl: one JSON object per processed photo: input (absolute path), name,
status (ok | no_face | unreadable | error), faces (reconstructed), detected (faces
above the threshold), message (non-ok rows), outputs (folders, relative to OUT),
image_size, file (size, mtime_ns), settings, seconds (read, detect, model, write, total). A photo
whose outputs are not all finite is an `error` row and writes nothing. A rerun skips
photos whose latest row is ok, no_face or unreadable for the same file (same size and
modification time) and the same settings (`SETTINGS`: model, faces, crop, ...; a row
records them); `error` rows are retried (`rerun=True` redoes everything).
OUT/summary.json: the counts per status of the last run.

Model: `model` is a converted KaoLRM model directory (`kaojax.models.loading`); a
training work directory is refused (its run config is not saved; see
configs/infer_kaolrm.py). Without one, `preset` builds random weights (tests).
"""

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image
from tqdm import tqdm

from data_pipeline.sources import CANONICAL_C2W, source_camera_vector
from kaojax.export.obj import write_obj
from kaojax.export.ply import write_mesh_ply
from kaojax.flame.demo import shade
from kaojax.flame.io import load_flame
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.geometry.cameras import SOURCE_FOCAL
from kaojax.images import prepare_source_image
from kaojax.infer import crops, detect, inputs
from kaojax.models import loading
from kaojax.models.kaolrm import KaoLRM, kaolrm_config, project_landmarks

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
NOW_LANDMARKS = (36, 39, 42, 45, 33, 48, 54)   # iBUG indices, NoW's order
STATUSES = ("ok", "no_face", "unreadable", "error")
FINISHED = ("ok", "no_face", "unreadable")     # not retried on a rerun
FACES = ("largest", "all")


# ------------------------------------------------------------------------------ model


def build_model(config) -> KaoLRM:
  """The KaoLRM network of `config.model` (a converted model directory) or, without
  one, random weights of `config.preset`."""
  num_samples = {"num_samples": int(config.num_samples)} if config.num_samples else {}
  if config.model:
    directory = pathlib.Path(config.model)
    if not loading.is_model_directory(directory):
      hint = ""
      if (directory / "checkpoints").is_dir():
        hint = (": this looks like a training work directory; its run config is not "
                "saved, so write its model with kaojax.models.loading.save_model first")
      raise ValueError(f"--config.model={directory} is not a converted KaoLRM model "
                       f"directory (no {loading.META_FILE}){hint}")
    flame = None
    if config.flame_path:
      meta = loading.read_meta(directory)
      flame = load_flame(config.flame_path, n_shape=meta["config"]["n_shape"],
                         n_expr=meta["config"]["n_expr"])
    model = loading.load_model(directory, flame=flame, dtype=config.dtype or None,
                               **num_samples)
    if not isinstance(model, KaoLRM):
      raise ValueError(f"{directory} holds an OpenLRM model, not KaoLRM")
    return model
  if not config.preset:
    raise ValueError("no model: pass --config.model=DIR (a converted KaoLRM model) or "
                     "use the :tiny preset")
  cfg = kaolrm_config(config.preset, monocular=bool(config.monocular), **num_samples)
  flame = (load_flame(config.flame_path, n_shape=cfg.n_shape, n_expr=cfg.n_expr)
           if config.flame_path else
           make_synthetic_flame(n_shape=cfg.n_shape, n_expr=cfg.n_expr))
  if config.dtype:
    from kaojax.models.lrm import with_runtime_options
    cfg = dataclasses.replace(cfg, lrm=with_runtime_options(cfg.lrm, dtype=config.dtype))
  logging.warning("infer_kaolrm: random %r weights (no --config.model): the meshes are "
                  "not reconstructions", config.preset)
  return KaoLRM(cfg, flame, nnx.Rngs(config.seed))


def canonical_camera(batch_size: int, render_size: int, synth_focal: float):
  """(source cameras [B, 16], viewmats [B, 1, 4, 4], Ks [B, 1, 3, 3]): the model's
  input camera and the canonical render camera (as the monocular training data)."""
  cameras = np.broadcast_to(source_camera_vector(), (batch_size, 16))
  viewmat = np.linalg.inv(CANONICAL_C2W).astype(np.float32)
  f, c = synth_focal * render_size, render_size / 2
  K = np.array([[f, 0, c], [0, f, c], [0, 0, 1]], np.float32)
  return (jnp.asarray(cameras), jnp.asarray(np.broadcast_to(viewmat, (batch_size, 1, 4, 4))),
          jnp.asarray(np.broadcast_to(K, (batch_size, 1, 3, 3))))


class Reconstructor:
  """The jitted forward over fixed-size batches of source images [B, S, S, 3]."""

  def __init__(self, model: KaoLRM, batch_size: int, render_size: int, synth_focal: float,
               seed: int = 0):
    self.batch_size, self.render_size = int(batch_size), int(render_size)
    self.source_size = model.cfg.lrm.encoder.image_size
    self.num_vertices = model.flame_model.num_vertices
    self.faces = np.asarray(model.flame_model.faces)
    self.key = jax.random.PRNGKey(seed)
    graphdef, self.state = nnx.split(model)
    cameras, viewmats, Ks = canonical_camera(self.batch_size, self.render_size, synth_focal)
    now = jnp.asarray(NOW_LANDMARKS)
    render_size = self.render_size

    def forward(state, images, key):
      net = nnx.merge(graphdef, state)
      out, renders = net.forward_and_render(
          images, cameras, viewmats, Ks, render_size, key, synth_focal=synth_focal,
          background=jnp.ones((images.shape[0], 3), jnp.float32))
      p = out.flame
      f32 = lambda x: x.astype(jnp.float32)
      neutral = net.flame_model(f32(p.shape), jnp.zeros_like(f32(p.expression)),
                                jnp.zeros_like(f32(p.pose)), scale=f32(p.scale))
      mesh = renders["mesh"]
      return {
          "shape": f32(p.shape), "expression": f32(p.expression), "pose": f32(p.pose),
          "scale": f32(p.scale), "translation": f32(p.translation),
          "vertices": out.vertices, "landmarks3d": out.landmarks,
          "landmarks_render": project_landmarks(out.landmarks, viewmats, Ks)[:, 0],
          "neutral_vertices": neutral.vertices, "lmk7": neutral.landmarks3d[:, now],
          "surfels": jnp.clip(renders["surfels"]["color"][:, 0], 0.0, 1.0),
          "normals": shade(mesh["normal"][:, 0], mesh["mask"][:, 0]),
      }

    self._forward = jax.jit(forward)

  def __call__(self, images: np.ndarray) -> list:
    """images [n <= B, S, S, 3] -> n dicts of numpy arrays (one per image)."""
    n = len(images)
    if not 0 < n <= self.batch_size:
      raise ValueError(f"batch of {n} images, expected 1..{self.batch_size}")
    padded = np.ones((self.batch_size,) + images.shape[1:], np.float32)
    padded[:n] = images
    out = jax.device_get(self._forward(self.state, jnp.asarray(padded), self.key))
    return [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(n)]


# ----------------------------------------------------------------------- bookkeeping


def output_names(paths) -> list:
  """A folder name per input: its stem, with a hash of its path when stems collide
  (or when the stem is one of the job's own file names)."""
  counts = collections.Counter(p.stem for p in paths)
  names = []
  for p in paths:
    stem = p.stem.strip() or "image"
    if (counts[p.stem] > 1 or stem in (RESULTS_FILE, SUMMARY_FILE)
        or stem.startswith(".tmp_")):
      stem = f"{stem}_{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
    names.append(stem)
  return names


def file_signature(path) -> Optional[dict]:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_results(path) -> dict:
  """input -> its latest row in a results.jsonl (malformed lines are skipped)."""
  latest = {}
  path = pathlib.Path(path)
  if not path.is_file():
    return latest
  for line in path.read_text(errors="replace").splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and "input" in row:
      latest[row["input"]] = row
  return latest


# Config fields that change a photo's outputs: a rerun with other values redoes it.
SETTINGS = ("model", "preset", "monocular", "flame_path", "faces", "face_threshold",
            "min_face_size", "crop", "synth_focal", "render_size", "num_samples", "dtype",
            "visualize", "seed")


def run_settings(config) -> dict:
  return {k: config[k] for k in SETTINGS}


def is_finished(row: Optional[dict], path, settings: Optional[dict] = None) -> bool:
  """Whether a results row finishes `path`: a final status for the same file (size,
  modification time) and, when given, the same settings."""
  return (row is not None and row.get("status") in FINISHED
          and row.get("file") == file_signature(path)
          and (settings is None or row.get("settings") == settings))


@dataclasses.dataclass
class Face:
  index: int
  box: np.ndarray
  score: float
  landmarks5: np.ndarray
  transform: np.ndarray
  crop: np.ndarray           # uint8 crop
  source: np.ndarray         # model input [S, S, 3]
  result: Optional[dict] = None


@dataclasses.dataclass
class Photo:
  path: pathlib.Path
  name: str
  image_size: tuple
  faces: list
  detected: int
  seconds: dict
  error: Optional[str] = None

  @property
  def complete(self) -> bool:
    return self.error is not None or all(f.result is not None for f in self.faces)


def select_faces(boxes, scores, landmarks, threshold: float, which: str):
  """Indices of the faces kept: probability > threshold, then the largest box
  (FaceLift's rule) or all of them (descending score)."""
  keep = [i for i in range(len(scores)) if scores[i] > threshold]
  if which == "largest" and keep:
    areas = [(boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) for i in keep]
    keep = [keep[int(np.argmax(areas))]]
  return keep


# ---------------------------------------------------------------------------- writing


def _to_uint8(image):
  return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def visualization(face: Face, size: int) -> np.ndarray:
  crop = np.asarray(Image.fromarray(face.crop).resize((size, size), Image.BICUBIC))
  return np.concatenate([crop, _to_uint8(face.result["surfels"]),
                         _to_uint8(face.result["normals"])], 1)


def face_params(face: Face, photo: Photo, crop_kind: str, crop_size: int,
                render_size: int, synth_focal: float) -> dict:
  r = face.result
  to_photo = crops.invert_affine(face.transform)
  lmk2d = crops.apply_affine(to_photo, r["landmarks_render"] * (crop_size / render_size))
  return {
      "shape": r["shape"], "expression": r["expression"], "pose": r["pose"],
      "scale": r["scale"].reshape(1), "translation": r["translation"],
      "box": np.asarray(face.box, np.float32), "score": np.float32(face.score),
      "landmarks5": np.asarray(face.landmarks5, np.float32),
      "crop_transform": face.transform.astype(np.float64), "crop_kind": np.array(crop_kind),
      "crop_size": np.int32(crop_size),
      "image_size": np.array(photo.image_size, np.int32),
      "landmarks3d": r["landmarks3d"], "landmarks2d": lmk2d.astype(np.float32),
      "lmk7": r["lmk7"], "synth_focal": np.float32(synth_focal),
  }


def write_reference_outputs(folder: pathlib.Path, result: dict, faces_array,
                            synth_focal: float):
  """The files KaoLRM's reference inference writes for a face: its mesh and 68 3D
  landmarks scaled by synth_focal / SOURCE_FOCAL (its "align with gt mesh scale"), and
  the raw FLAME parameters."""
  to_reference = synth_focal / SOURCE_FOCAL
  write_mesh_ply(folder / "mesh.ply", result["vertices"] * to_reference, faces_array)
  for key in ("shape", "expression", "pose"):
    np.save(folder / f"mesh_{key}.npy", np.asarray(result[key], np.float32))
  np.save(folder / "mesh_lmks.npy",
          (result["landmarks3d"] * to_reference).astype(np.float32))


def _all_finite(photo: Photo) -> Optional[str]:
  for face in photo.faces:
    for key, value in face.result.items():
      if not np.all(np.isfinite(value)):
        return f"face {face.index}: non-finite {key}"
  return None


def write_photo(photo: Photo, workdir: pathlib.Path, faces_mode: str, faces_array,
                crop_kind: str, crop_size: int, render_size: int, synth_focal: float,
                visualize: bool) -> list:
  """Writes the photo's face folders (each complete, or none); returns them relative
  to workdir."""
  final = workdir / photo.name
  tmp = workdir / f".tmp_{photo.name}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  try:
    folders = []
    for k, face in enumerate(photo.faces):
      sub = f"face_{k}" if faces_mode == "all" else ""
      folder = tmp / sub if sub else tmp
      folder.mkdir(parents=True, exist_ok=True)
      r = face.result
      np.savez(folder / "params.npz",
               **face_params(face, photo, crop_kind, crop_size, render_size, synth_focal))
      write_obj(folder / "mesh.obj", r["vertices"], faces_array)
      write_obj(folder / "mesh_neutral.obj", r["neutral_vertices"], faces_array)
      np.save(folder / "lmk7.npy", r["lmk7"].astype(np.float32))
      write_reference_outputs(folder / "reference", r, faces_array, synth_focal)
      if visualize:
        Image.fromarray(visualization(face, render_size)).save(folder / "vis.png")
      folders.append(str(pathlib.Path(photo.name) / sub) if sub else photo.name)
    if final.exists():
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folders


# -------------------------------------------------------------------------------- job


def resolve_crop(config, model: KaoLRM) -> str:
  kind = config.crop
  if kind == "auto":
    kind = "ffhq" if model.cfg.monocular else "square"
  if kind not in crops.CROPS:
    raise ValueError(f"unknown crop {config.crop!r} (known: auto, {', '.join(crops.CROPS)})")
  return kind


def run(config, workdir) -> dict:
  """The job (module doc); returns the run's summary (also in summary.json)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.faces not in FACES:
    raise ValueError(f"faces must be one of {FACES}, got {config.faces!r}")
  if config.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
  paths = inputs.list_inputs(config.input)
  names = dict(zip(paths, output_names(paths)))
  results_path = workdir / RESULTS_FILE
  previous = {} if config.rerun else read_results(results_path)
  settings = run_settings(config)
  todo = [p for p in paths if not is_finished(previous.get(str(p)), p, settings)]
  summary = {"inputs": len(paths), "skipped": len(paths) - len(todo),
             **{s: 0 for s in STATUSES}}
  logging.info("infer_kaolrm: %d inputs, %d already finished", len(paths), summary["skipped"])
  if not todo:
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary

  model = build_model(config)
  crop_kind = resolve_crop(config, model)
  source_size = model.cfg.lrm.encoder.image_size
  render_size = int(config.render_size) or source_size
  crop_size = crops.output_size(crop_kind, source_size)
  recon = Reconstructor(model, config.batch_size, render_size, config.synth_focal, config.seed)
  detector = (detect.default_detector() if config.min_face_size == detect.MIN_FACE_SIZE
              else detect.MTCNN(min_face_size=int(config.min_face_size)))
  write_args = dict(workdir=workdir, faces_mode=config.faces, faces_array=recon.faces,
                    crop_kind=crop_kind, crop_size=crop_size, render_size=render_size,
                    synth_focal=float(config.synth_focal), visualize=bool(config.visualize))

  # A row cut short by an interrupted run is skipped by read_results; start on a new line.
  if results_path.is_file() and results_path.stat().st_size:
    with open(results_path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      needs_newline = f.read(1) != b"\n"
  else:
    needs_newline = False
  results = open(results_path, "a")
  if needs_newline:
    results.write("\n")
  open_photos, queue = [], []

  def record(path, status, name=None, faces=0, detected=0, message=None, outputs=(),
             image_size=None, seconds=None):
    row = {"input": str(path), "name": name, "status": status, "faces": faces,
           "detected": detected, "outputs": list(outputs), "image_size": image_size,
           "file": file_signature(path), "settings": settings,
           "seconds": {k: round(v, 4) for k, v in (seconds or {}).items()}}
    if message is not None:
      row["message"] = message
    results.write(json.dumps(row) + "\n")
    results.flush()
    summary[status] += 1
    if status != "ok":
      logging.warning("%s: %s%s", path, status, f" ({message})" if message else "")

  def finish(photo: Photo):
    seconds = photo.seconds
    common = dict(name=photo.name, detected=photo.detected,
                  image_size=list(photo.image_size))
    if photo.error is None:
      photo.error = _all_finite(photo)
    if photo.error is not None:
      seconds["total"] = sum(seconds.values())
      record(photo.path, "error", message=photo.error, seconds=seconds, **common)
      return
    start = time.perf_counter()
    try:
      outputs = write_photo(photo, **write_args)
    except Exception as e:  # a disk error etc.: this photo's row, not the job's end
      seconds["write"] = time.perf_counter() - start
      seconds["total"] = sum(seconds.values())
      record(photo.path, "error", message=f"writing: {type(e).__name__}: {e}",
             seconds=seconds, **common)
      return
    seconds["write"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    record(photo.path, "ok", faces=len(photo.faces), outputs=outputs, seconds=seconds,
           **common)

  def run_batch(batch):
    start = time.perf_counter()
    try:
      results_ = recon(np.stack([face.source for _, face in batch]))
      error = None
    except Exception as e:
      results_, error = None, f"model: {type(e).__name__}: {e}"
    share = (time.perf_counter() - start) / len(batch)
    for i, (photo, face) in enumerate(batch):
      photo.seconds["model"] = photo.seconds.get("model", 0.0) + share
      if error is not None:
        photo.error = photo.error or error
      else:
        face.result = results_[i]

  def drain(final: bool):
    while len(queue) >= recon.batch_size or (final and queue):
      batch = queue[:recon.batch_size]
      del queue[:recon.batch_size]
      run_batch(batch)
    # Photos complete once none of their faces waits in the queue.
    waiting = {id(p) for p, _ in queue}
    for photo in list(open_photos):
      if id(photo) not in waiting and photo.complete:
        open_photos.remove(photo)
        finish(photo)

  try:
    bar = tqdm(todo, desc="infer_kaolrm", unit="photo", dynamic_ncols=True)
    for path in bar:
      bar.set_postfix({s: summary[s] for s in STATUSES})
      name = names[path]
      seconds = {}
      start = time.perf_counter()
      try:
        image = inputs.read_image(path)
      except inputs.UnreadableImage as e:
        record(path, "unreadable", name=name, message=str(e),
               seconds={"read": time.perf_counter() - start})
        continue
      seconds["read"] = time.perf_counter() - start
      image_size = (image.shape[1], image.shape[0])
      try:
        start = time.perf_counter()
        boxes, scores, landmarks = detector.detect(image)
        keep = select_faces(boxes, scores, landmarks, config.face_threshold, config.faces)
        seconds["detect"] = time.perf_counter() - start
        detected = int(np.sum(np.asarray(scores) > config.face_threshold))
        if not keep:
          seconds["total"] = sum(seconds.values())
          record(path, "no_face", name=name, detected=detected,
                 message=f"no face with probability > {config.face_threshold}",
                 image_size=list(image_size), seconds=seconds)
          continue
        start = time.perf_counter()
        faces = []
        for k, i in enumerate(keep):
          m, size = crops.crop_transform(crop_kind, boxes[i], landmarks[i], source_size)
          crop = crops.warp(image, m, size)
          faces.append(Face(index=k, box=np.asarray(boxes[i]), score=float(scores[i]),
                            landmarks5=np.asarray(landmarks[i]), transform=m, crop=crop,
                            source=prepare_source_image(crop / 255.0, source_size)))
        seconds["crop"] = time.perf_counter() - start
      except Exception as e:
        seconds["total"] = sum(seconds.values())
        record(path, "error", name=name, message=f"{type(e).__name__}: {e}",
               image_size=list(image_size), seconds=seconds)
        continue
      photo = Photo(path=path, name=name, image_size=image_size, faces=faces,
                    detected=detected, seconds=seconds)
      open_photos.append(photo)
      queue.extend((photo, face) for face in faces)
      drain(final=False)
    drain(final=True)
  finally:
    results.close()
  (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
  logging.info("infer_kaolrm: %s", summary)
  return summary
