"""Batch inference over photos and videos: what every inference job shares.

A job (`kaojax.infer.kaolrm`, `kaojax.infer.facelift`) supplies a `Task` (its model:
how a crop becomes the model's input, a batched `predict`, and the files written per
face); this module does the rest:

* inputs (`kaojax.infer.inputs.list_inputs`: images, folders, globs, lists, videos),
  split between processes (`process_share`: process k of n takes every n-th input);
* decoding and MTCNN detection (`kaojax.infer.detect`) in a background pool of
  `config.workers` threads, `config.prefetch` frames ahead of the model, in input
  order (so batches, and the results, do not depend on thread timing);
* the faces kept (`select_faces`), their crops (`kaojax.infer.crops`, with the
  transform back to the photo), or `crop="full"`: no detection, the whole image is
  the face (pre-cropped inputs, rendered benchmarks);
* fixed-size batches of faces, several photos sharing one (one compilation);
* per input one row in OUT/results.jsonl (`ResultsLog`), outputs written under a
  temporary name and renamed when complete, reruns that skip finished inputs;
* videos (`kaojax.infer.video`): every `video_every`-th frame is a photo of its own;
  the faces of the frames go to OUT/<name>/frames/<frame index>/ and the task's
  `finish_video` writes the sequence files.

Rows (one JSON object per line): input (absolute path), name (its output folder),
status (ok | no_face | unreadable | error), faces (reconstructed), detected (faces
above the threshold), message (non-ok rows), outputs (folders, relative to OUT),
image_size [w, h], file (size, mtime_ns), settings, seconds (read, detect, crop,
model, write, total); video rows add frames (sampled), frames_with_faces and
frames_failed. A rerun skips an input whose latest row is ok, no_face or unreadable
for the same file (size, modification time) and the same settings; `error` rows are
retried, and `rerun=True` redoes everything. OUT/summary.json counts the last run.
With several processes (`jax.process_count() > 1`) each writes results.process<k>.jsonl
and summary.process<k>.json; a rerun reads them all.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import queue
import shutil
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from kaojax.infer import crops, detect, inputs, video

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
STATUSES = ("ok", "no_face", "unreadable", "error")
FINISHED = ("ok", "no_face", "unreadable")     # not retried on a rerun
FACES = ("largest", "all")
# Config fields of the runner that change an input's outputs (a task adds its own).
SETTINGS = ("faces", "face_threshold", "min_face_size", "crop", "video_every",
            "video_max_frames", "outputs", "seed")


# ------------------------------------------------------------------------ the task


class Task:
  """A model as the runner sees it. Subclasses set the attributes and override
  `predict` and `write_face` (and `finish_video` for sequence outputs)."""
  name = "infer"
  batch_size = 1          # faces per `predict` call
  crop_kind = "multiview"    # kaojax.infer.crops kind, or "full"
  crop_size = 224         # side of the crop in pixels
  framing = None          # the multiview crop's crops.Framing (None: its default)
  settings: dict = {}     # task fields recorded in every row (reruns compare them)

  def prepare(self, crop: np.ndarray) -> np.ndarray:
    """The model's input for a uint8 crop [crop_size, crop_size, 3]."""
    return crop.astype(np.float32) / 255.0

  def predict(self, sources: np.ndarray) -> list:
    """sources [n <= batch_size, ...] -> n dicts of numpy arrays."""
    raise NotImplementedError

  def write_face(self, folder: pathlib.Path, face: "Face", frame: "Frame"):
    """Writes one face's files into `folder` (it exists)."""
    raise NotImplementedError

  def slim(self, result: dict) -> dict:
    """What a face's result keeps once its files are written (for `finish_video`)."""
    return {}

  def finish_video(self, folder: pathlib.Path, item: "Item", frames: list):
    """After all frames of a video: sequence outputs into `folder`. `frames` are the
    video's Frames with faces, in order (pixels dropped, results `slim`)."""


# ----------------------------------------------------------------------- bundles


@dataclasses.dataclass
class Face:
  index: int                 # rank among the photo's kept faces (descending score)
  box: np.ndarray            # [4] x0, y0, x1, y1 in photo pixels
  score: float
  landmarks5: np.ndarray     # [5, 2] photo pixels (NaN without detection)
  transform: np.ndarray      # [2, 3] photo pixels -> crop pixels
  crop: np.ndarray           # uint8 [crop_size, crop_size, 3]
  source: np.ndarray         # the task's model input
  result: Optional[dict] = None


@dataclasses.dataclass
class Item:
  """One input file: a photo (one frame) or a video (its sampled frames)."""
  path: pathlib.Path
  name: str
  is_video: bool
  frames: list = dataclasses.field(default_factory=list)
  ended: bool = False        # the loader has delivered every frame
  error: Optional[str] = None        # the whole input failed (unreadable, ...)
  status: Optional[str] = None       # set for inputs that end before the model
  fps: Optional[float] = None


@dataclasses.dataclass
class Frame:
  """A decoded image (the photo, or one video frame) and its faces."""
  item: Item
  index: int                 # frame index in the video (0 for a photo)
  image: Optional[np.ndarray]
  image_size: tuple          # (w, h)
  faces: list
  detected: int
  seconds: dict
  error: Optional[str] = None
  written: bool = False

  @property
  def complete(self) -> bool:
    return self.error is not None or all(f.result is not None for f in self.faces)


# ---------------------------------------------------------------------- bookkeeping


def process_share(paths: Sequence, index: int, count: int) -> list:
  """The inputs process `index` of `count` takes: every count-th, from index."""
  if not 0 <= index < count:
    raise ValueError(f"process index {index} outside 0..{count - 1}")
  return list(paths)[index::count]


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


def results_files(workdir) -> list:
  """The results files of a work directory (one per process that wrote one)."""
  workdir = pathlib.Path(workdir)
  return sorted(workdir.glob("results.process*.jsonl")) + [workdir / RESULTS_FILE]


def read_results(*paths) -> dict:
  """input -> its latest row over results.jsonl files (malformed lines skipped)."""
  latest = {}
  for path in paths:
    path = pathlib.Path(path)
    if not path.is_file():
      continue
    for line in path.read_text(errors="replace").splitlines():
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and "input" in row:
        latest[row["input"]] = row
  return latest


def is_finished(row: Optional[dict], path, settings: Optional[dict] = None) -> bool:
  """Whether a results row finishes `path`: a final status for the same file (size,
  modification time) and, when given, the same settings."""
  return (row is not None and row.get("status") in FINISHED
          and row.get("file") == file_signature(path)
          and (settings is None or row.get("settings") == settings))


class ResultsLog:
  """Appends rows to a results file; counts statuses for the summary."""

  def __init__(self, path: pathlib.Path, settings: dict):
    self.path, self.settings = path, settings
    self.counts = {s: 0 for s in STATUSES}
    # A row cut short by an interrupted run is skipped by read_results; start anew.
    needs_newline = False
    if path.is_file() and path.stat().st_size:
      with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
    self.file = open(path, "a")
    if needs_newline:
      self.file.write("\n")

  def record(self, path, status: str, name=None, faces: int = 0, detected: int = 0,
             message=None, outputs=(), image_size=None, seconds=None, **extra):
    seconds = dict(seconds or {})
    seconds.setdefault("total", sum(seconds.values()))
    row = {"input": str(path), "name": name, "status": status, "faces": faces,
           "detected": detected, "outputs": list(outputs), "image_size": image_size,
           "file": file_signature(path), "settings": self.settings,
           "seconds": {k: round(v, 4) for k, v in seconds.items()}, **extra}
    if message is not None:
      row["message"] = message
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    self.counts[status] += 1
    if status != "ok":
      logging.warning("%s: %s%s", path, status, f" ({message})" if message else "")

  def close(self):
    self.file.close()


def select_faces(boxes, scores, threshold: float, which: str) -> list:
  """Indices of the faces kept: probability > threshold, then the largest box
  (FaceLift's rule) or all of them (in the detector's order: descending score)."""
  keep = [i for i in range(len(scores)) if scores[i] > threshold]
  if which == "largest" and keep:
    areas = [(boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) for i in keep]
    keep = [keep[int(np.argmax(areas))]]
  return keep


def all_finite(frame: Frame) -> Optional[str]:
  """None, or which output of which face is not finite."""
  for face in frame.faces:
    for key, value in face.result.items():
      value = np.asarray(value)
      if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
        return f"face {face.index}: non-finite {key}"
  return None


# ------------------------------------------------------------------------ loading


class Loader:
  """Decodes, detects and crops inputs in a background pool (module doc). For each
  item in order, `frames(item)` yields its Frames; the item's `error`/`status` are
  set when it ends without any."""

  def __init__(self, task: Task, config, items: list):
    self.task, self.config, self.items = task, config, items
    self.detector = None
    if task.crop_kind != "full":
      self.detector = (detect.default_detector()
                       if config.min_face_size == detect.MIN_FACE_SIZE
                       else detect.MTCNN(min_face_size=int(config.min_face_size)))
    self.stop = threading.Event()
    workers = max(1, int(config.workers))
    self.prefetch = max(1, int(config.prefetch))
    self.queues = {id(item): queue.Queue(maxsize=self.prefetch) for item in items}
    self.pool = concurrent.futures.ThreadPoolExecutor(workers, "infer-loader")
    self.futures = [self.pool.submit(self._load, item) for item in items]

  def close(self):
    self.stop.set()
    for f in self.futures:
      f.cancel()
    self.pool.shutdown(wait=True, cancel_futures=True)

  def _put(self, item: Item, value):
    q = self.queues[id(item)]
    while not self.stop.is_set():
      try:
        q.put(value, timeout=0.1)
        return
      except queue.Full:
        continue

  def _load(self, item: Item):
    try:
      if item.is_video:
        item.fps = video.video_info(item.path).get("fps") or None
        decoded = video.read_frames(item.path, every=int(self.config.video_every),
                                    max_frames=int(self.config.video_max_frames) or None)
        for index, image in decoded:
          if self.stop.is_set():
            return
          self._put(item, self.frame(item, index, image, {}))
      else:
        start = time.perf_counter()
        image = inputs.read_image(item.path)
        self._put(item, self.frame(item, 0, image, {"read": time.perf_counter() - start}))
    except inputs.UnreadableImage as e:
      item.error, item.status = str(e), "unreadable"
    except Exception as e:   # a loader bug or an odd file: this input's row, not the run
      item.error, item.status = f"{type(e).__name__}: {e}", "error"
    finally:
      self._put(item, None)

  def frame(self, item: Item, index: int, image: np.ndarray, seconds: dict) -> Frame:
    """Detection and crops of one decoded image."""
    config, task = self.config, self.task
    image_size = (image.shape[1], image.shape[0])
    frame = Frame(item=item, index=index, image=image, image_size=image_size, faces=[],
                  detected=0, seconds=seconds)
    try:
      start = time.perf_counter()
      if self.detector is None:
        m = crops.full_transform(image_size, task.crop_size)
        found = [(np.array([0, 0, *image_size], np.float64), 1.0,
                  np.full((5, 2), np.nan), m)]
        frame.detected = 1
      else:
        boxes, scores, landmarks = self.detector.detect(image)
        keep = select_faces(boxes, scores, config.face_threshold, config.faces)
        frame.detected = int(np.sum(np.asarray(scores) > config.face_threshold))
        found = [(boxes[i], float(scores[i]), landmarks[i],
                  crops.crop_transform(task.crop_kind, boxes[i], landmarks[i],
                                       task.crop_size, task.framing)[0]) for i in keep]
      frame.seconds["detect"] = time.perf_counter() - start
      start = time.perf_counter()
      for k, (box, score, lmk, m) in enumerate(found):
        crop = crops.warp(image, m, task.crop_size)
        frame.faces.append(Face(index=k, box=np.asarray(box, np.float64), score=score,
                                landmarks5=np.asarray(lmk, np.float64), transform=m,
                                crop=crop, source=task.prepare(crop)))
      frame.seconds["crop"] = time.perf_counter() - start
    except Exception as e:
      frame.error = f"{type(e).__name__}: {e}"
    return frame

  def frames(self, item: Item):
    """item's Frames, in order, as the pool delivers them."""
    q = self.queues[id(item)]
    while True:
      frame = q.get()
      if frame is None:
        item.ended = True
        return
      yield frame


# ---------------------------------------------------------------------------- the run


def list_items(config, workdir: pathlib.Path, previous: dict, settings: dict,
               process_index: int = 0, process_count: int = 1) -> tuple:
  """(all inputs, the Items still to do) for this process."""
  paths = inputs.list_inputs(config.input)
  names = dict(zip(paths, output_names(paths)))
  mine = process_share(paths, process_index, process_count)
  todo = [Item(path=p, name=names[p], is_video=video.is_video_path(p)) for p in mine
          if not is_finished(previous.get(str(p)), p, settings)]
  return mine, todo


def run(task_factory: Callable[[], Task], config, workdir, task_settings: dict,
        process_index: Optional[int] = None, process_count: Optional[int] = None) -> dict:
  """The job: `task_factory()` builds the model (only when some input is left to do).
  Returns the run's summary (also in summary.json)."""
  import jax
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.faces not in FACES:
    raise ValueError(f"faces must be one of {FACES}, got {config.faces!r}")
  if config.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  suffix = "" if process_count == 1 else f".process{process_index}"
  results_path = workdir / (f"results{suffix}.jsonl" if suffix else RESULTS_FILE)
  summary_path = workdir / (f"summary{suffix}.json" if suffix else SUMMARY_FILE)
  settings = {**{k: config[k] for k in SETTINGS}, **task_settings}
  previous = {} if config.rerun else read_results(*results_files(workdir))
  mine, todo = list_items(config, workdir, previous, settings, process_index, process_count)
  summary = {"inputs": len(mine), "skipped": len(mine) - len(todo),
             **{s: 0 for s in STATUSES}}
  logging.info("inference: %d inputs, %d already finished", len(mine), summary["skipped"])
  if todo:
    task = task_factory()
    log = ResultsLog(results_path, settings)
    try:
      Runner(task, config, workdir, log).run(todo)
    finally:
      log.close()
    summary.update(log.counts)
  summary_path.write_text(json.dumps(summary, indent=1))
  logging.info("inference: %s", summary)
  return summary


class Runner:
  """Feeds the loader's faces to the task in fixed-size batches and finishes inputs."""

  def __init__(self, task: Task, config, workdir: pathlib.Path, log: ResultsLog):
    self.task, self.config, self.workdir, self.log = task, config, workdir, log
    self.queue = []           # (frame, face) waiting for the model
    self.open = []            # Items started and not yet finished, in order

  # -- the model

  def _run_batch(self, batch):
    start = time.perf_counter()
    try:
      results, error = self.task.predict(np.stack([face.source for _, face in batch])), None
    except Exception as e:
      results, error = None, f"model: {type(e).__name__}: {e}"
    share = (time.perf_counter() - start) / len(batch)
    for i, (frame, face) in enumerate(batch):
      frame.seconds["model"] = frame.seconds.get("model", 0.0) + share
      if error is not None:
        frame.error = frame.error or error
      else:
        face.result = results[i]

  def _drain(self, final: bool):
    size = self.task.batch_size
    while len(self.queue) >= size or (final and self.queue):
      batch, self.queue = self.queue[:size], self.queue[size:]
      self._run_batch(batch)
    waiting = {id(f) for f, _ in self.queue}
    for item in list(self.open):
      for frame in item.frames:
        if not frame.written and id(frame) not in waiting and frame.complete:
          self._write_frame(frame)
      if item.ended and all(f.written for f in item.frames):
        self.open.remove(item)
        self._finish_item(item)

  # -- writing

  def _tmp(self, item: Item) -> pathlib.Path:
    return self.workdir / f".tmp_{item.name}"

  def _frame_folder(self, frame: Frame) -> pathlib.Path:
    tmp = self._tmp(frame.item)
    return tmp / "frames" / f"{frame.index:06d}" if frame.item.is_video else tmp

  def _write_frame(self, frame: Frame):
    """A frame's face folders (into the item's temporary folder); drops its pixels."""
    frame.written = True
    if frame.error is None and frame.faces:
      frame.error = all_finite(frame)
    if frame.error is None and frame.faces:
      start = time.perf_counter()
      base = self._frame_folder(frame)
      try:
        for face in frame.faces:
          folder = base / f"face_{face.index}" if self.config.faces == "all" else base
          folder.mkdir(parents=True, exist_ok=True)
          self.task.write_face(folder, face, frame)
      except Exception as e:  # a disk error etc.: this input's row, not the job's end
        frame.error = f"writing: {type(e).__name__}: {e}"
        shutil.rmtree(base, ignore_errors=True)
      frame.seconds["write"] = time.perf_counter() - start
    frame.image = None
    for face in frame.faces:
      face.crop = face.source = None
      if face.result is not None:
        face.result = self.task.slim(face.result)

  def _finish_item(self, item: Item):
    tmp, final = self._tmp(item), self.workdir / item.name
    frames = item.frames
    seconds = collections.Counter()
    for frame in frames:
      seconds.update(frame.seconds)
    seconds = dict(seconds)
    common = dict(name=item.name, seconds=seconds,
                  image_size=list(frames[0].image_size) if frames else None,
                  detected=sum(f.detected for f in frames))
    ok = [f for f in frames if f.error is None and f.faces]
    failed = [f for f in frames if f.error is not None]
    extra = {}
    if item.is_video:
      extra = {"frames": len(frames), "frames_with_faces": len(ok),
               "frames_failed": len(failed)}
    if item.error is not None:
      shutil.rmtree(tmp, ignore_errors=True)
      status, message = item.status, item.error
    elif not frames:
      status, message = "unreadable", f"{item.path}: no frame could be decoded"
    elif not ok and failed:
      shutil.rmtree(tmp, ignore_errors=True)
      status, message = "error", failed[0].error
    elif not ok:
      status = "no_face"
      message = f"no face with probability > {self.config.face_threshold}"
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      status, message = "ok", None
      if item.is_video and failed:
        message = f"{len(failed)} frames failed, first: {failed[0].error}"
      try:
        if item.is_video:
          start = time.perf_counter()
          self.task.finish_video(tmp, item, ok)
          seconds["sequence"] = time.perf_counter() - start
        if final.exists():
          shutil.rmtree(final)
        os.replace(tmp, final)
      except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        status, message = "error", f"writing: {type(e).__name__}: {e}"
    faces = sum(len(f.faces) for f in ok) if status == "ok" else 0
    outputs = []
    if status == "ok" and not item.is_video:
      outputs = ([f"{item.name}/face_{face.index}" for face in ok[0].faces]
                 if self.config.faces == "all" else [item.name])
    elif status == "ok":
      outputs = [item.name]
    self.log.record(item.path, status, faces=faces, message=message, outputs=outputs,
                    **common, **extra)

  # -- the loop

  def run(self, items: list):
    loader = Loader(self.task, self.config, items)
    bar = tqdm(total=len(items), desc=self.task.name, unit="input", dynamic_ncols=True)
    try:
      for item in items:
        bar.set_postfix({s: self.log.counts[s] for s in STATUSES})
        tmp = self._tmp(item)
        if tmp.exists():
          shutil.rmtree(tmp)
        self.open.append(item)
        for frame in loader.frames(item):
          item.frames.append(frame)
          if frame.error is None:
            self.queue.extend((frame, face) for face in frame.faces)
          self._drain(final=False)
        self._drain(final=False)
        bar.update(1)
      self._drain(final=True)
    finally:
      loader.close()
      bar.close()
