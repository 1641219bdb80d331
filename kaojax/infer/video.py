"""The video side of batch inference: decoding, face tracks, per-track shape and
temporal smoothing, and the per-video `sequence.npz` bundle.

Reading. `read_frames(path, every, max_frames)` streams (frame_index, uint8 [H, W, 3])
through imageio's ffmpeg plugin, one frame in memory at a time. A file that cannot be
opened, or from which not a single frame decodes, raises `inputs.UnreadableImage` naming
the file (on the first `next`: the generator does all its work lazily). A video that
breaks off part way (a truncated download, a copy still being written) yields the frames
that decode and then stops, logging a warning: what decoded is kept. (An MP4 whose index,
the `moov` atom, sits at the end, as ffmpeg writes it by default, loses that index when
cut short and then has no frames at all: UnreadableImage.)

Tracks. `link_tracks` gives each detected face a track id by greedy IoU matching
against the tracks' last seen boxes; a track survives up to `max_gap` frames without a
detection.

Shape. `robust_mean` is one identity's shape over its frames: a mean that rejects the
frames far from the bulk (a bad crop, an occlusion, a profile view).

Smoothing. `smooth_series` is a normalised Gaussian kernel over time in seconds (uneven
sampling, skipped frames and gaps are handled by the normalisation, and the ends do not
shrink). `smooth_rotations` does the same for axis-angle rotations with the weighted
chordal mean of their quaternions, so rotations near pi and the quaternion sign flip
cost nothing.

The bundle. `build_sequence(frames, fps, sigma_seconds, every)` turns the per-face
per-frame results into the arrays of `sequence.npz`. N rows (one per face per frame,
ordered by frame_index then track), K tracks, S shape, E expression coefficients:
  frame_index  [N] int64    the frame's index in the video (every decoded frame counts)
  time         [N] float32  frame_index / fps, seconds
  track        [N] int64    the row's track id
  tracks       [K] int64    the track ids, ascending
  shape        [N, S]       per-frame shape, raw
  shape_track  [K, S]       `robust_mean` of each track's shapes (row k: tracks[k])
  expression   [N, E]       raw; expression_smoothed [N, E]
  pose         [N, 6]       global, jaw axis-angle, raw; pose_smoothed [N, 6] (each
                            rotation with smooth_rotations)
  scale        [N, 1]       raw; scale_smoothed [N, 1]
  translation  [N, 3]       raw; translation_smoothed [N, 3]
  box          [N, 4]       (x0, y0, x1, y1) video pixels
  score        [N]          detector probability
  landmarks5   [N, 5, 2]    detector landmarks, video pixels
  fps          []           frames per second of the video
  sigma_seconds []          the smoothing kernel's standard deviation (0: no smoothing)
  every        [] int64     the frame stride the job decoded with (kept for the record;
                            times come from frame_index, so it changes nothing else)
Smoothing runs per track, over that track's rows only: tracks never mix. Floating-point
arrays are float32 (computed in float64).
"""

import pathlib

import numpy as np
from absl import logging
from scipy.spatial.transform import Rotation

from kaojax.infer.inputs import UnreadableImage

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
TRUNCATE = 5.0        # the Gaussian kernel is cut at this many sigmas (weight < 4e-6)
BLOCK = 256           # output rows smoothed at a time (memory: BLOCK x window)


# ---------------------------------------------------------------------------- reading


def is_video_path(path) -> bool:
  return pathlib.Path(path).suffix.lower() in VIDEO_SUFFIXES


def _describe(error: Exception) -> str:
  """The error's type and first line (imageio appends all of ffmpeg's log)."""
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _open_reader(path):
  import imageio.v2 as imageio
  try:
    return imageio.get_reader(str(path), format="FFMPEG")
  except Exception as e:  # OSError (ffmpeg cannot parse it), FileNotFoundError, ...
    raise UnreadableImage(f"{path}: cannot open as a video: {_describe(e)}") from e


def video_info(path) -> dict:
  """fps (float), num_frames (int, or None where the container does not say), width,
  height (pixels of the decoded frames). Raises UnreadableImage."""
  reader = _open_reader(path)
  try:
    meta = reader.get_meta_data()
  finally:
    reader.close()
  fps = float(meta.get("fps") or 0.0)
  width, height = (int(v) for v in meta["size"])
  num_frames = meta.get("nframes")
  if num_frames is None or not np.isfinite(num_frames):
    duration = meta.get("duration")
    num_frames = (int(round(float(duration) * fps))
                  if duration and fps > 0 and np.isfinite(duration) else None)
  return {"fps": fps, "num_frames": None if num_frames is None else int(num_frames),
          "width": width, "height": height}


def read_frames(path, every: int = 1, max_frames=None):
  """Yields (frame_index, uint8 [H, W, 3]) for frames 0, every, 2 * every, ... (at most
  max_frames of them); the module doc says what happens with broken files."""
  every = int(every)
  if every < 1:
    raise ValueError(f"every={every}: must be >= 1")
  if max_frames is not None and int(max_frames) <= 0:
    return
  reader = _open_reader(path)
  yielded = 0
  try:
    frames = iter(reader)
    index = -1
    while True:
      try:
        frame = next(frames)
      except StopIteration:
        break
      except Exception as e:  # ffmpeg stopped mid-frame or mid-stream
        if index < 0:
          raise UnreadableImage(f"{path}: no frame decodes: {_describe(e)}") from e
        logging.warning("%s: decoding stopped after frame %d (%s)", path, index,
                        _describe(e))
        break
      index += 1
      if index % every:
        continue
      frame = np.asarray(frame)
      if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise UnreadableImage(f"{path}: frame {index} of shape {frame.shape} "
                              f"{frame.dtype}, expected uint8 [H, W, 3]")
      yield index, frame
      yielded += 1
      if max_frames is not None and yielded >= int(max_frames):
        break
    if index < 0:
      raise UnreadableImage(f"{path}: no frame decodes")
  finally:
    reader.close()


# ----------------------------------------------------------------------------- tracks


def box_iou(a, b) -> np.ndarray:
  """a [N, 4], b [M, 4] (x0, y0, x1, y1) -> IoU [N, M]."""
  a = np.asarray(a, np.float64).reshape(-1, 4)[:, None]
  b = np.asarray(b, np.float64).reshape(-1, 4)[None]
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  area = lambda x: (np.clip(x[..., 2] - x[..., 0], 0, None)
                    * np.clip(x[..., 3] - x[..., 1], 0, None))
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def link_tracks(frame_boxes, min_iou: float = 0.3, max_gap: int = 5) -> list:
  """frame_boxes: a list over frames of [N_t, 4] boxes -> a list of int64 [N_t] track ids.

  Each frame's boxes are matched to the live tracks (seen within the last max_gap + 1
  frames, i.e. up to max_gap frames missed) by their last seen box, greedily: the pair
  with the highest IoU first (ties: the most recently seen track), pairs under min_iou
  never. Unmatched boxes start new tracks, numbered 0, 1, 2, ... in order of appearance.
  """
  last_box, last_frame = [], []           # per track id
  out = []
  for t, boxes in enumerate(frame_boxes):
    boxes = np.asarray(boxes if boxes is not None else [], np.float64).reshape(-1, 4)
    ids = np.full(len(boxes), -1, np.int64)
    live = [k for k in range(len(last_box)) if t - last_frame[k] - 1 <= max_gap]
    if live and len(boxes):
      iou = box_iou(boxes, np.stack([last_box[k] for k in live]))
      age = np.array([t - last_frame[k] for k in live], np.float64)
      rows, cols = np.nonzero(iou >= min_iou)
      order = np.lexsort((age[cols], -iou[rows, cols]))   # by IoU down, then age up
      used_rows, used_cols = set(), set()
      for i in order:
        r, c = rows[i], cols[i]
        if r in used_rows or c in used_cols:
          continue
        used_rows.add(r)
        used_cols.add(c)
        ids[r] = live[c]
    for r in range(len(boxes)):
      if ids[r] < 0:
        ids[r] = len(last_box)
        last_box.append(None)
        last_frame.append(t)
      last_box[ids[r]] = boxes[r]
      last_frame[ids[r]] = t
    out.append(ids)
  return out


# ------------------------------------------------------------------------------ shape


def _robust_scale(residuals: np.ndarray) -> np.ndarray:
  """residuals [T, D] -> a per-dimension Gaussian-consistent scale [D] (> 0): 1.4826 MAD,
  or 1.2533 mean |residual| where the MAD is 0, or 1 where every residual is 0."""
  a = np.abs(residuals)
  scale = 1.4826 * np.median(a, axis=0)
  scale = np.where(scale > 0, scale, 1.2533 * a.mean(axis=0))
  return np.where(scale > 0, scale, 1.0)


def robust_mean(values, iterations: int = 10, quantile: float = 0.9999) -> np.ndarray:
  """values [T, D] -> [D]: the mean of the frames that are not outliers.

  Starting from the per-dimension median, each iteration scales the frames' residuals
  per dimension by a robust scale (median absolute deviation), rejects the frames whose
  squared scaled distance exceeds the chi-square `quantile` for D dimensions (what a
  Gaussian inlier exceeds with probability 1 - quantile) and takes the mean of the rest;
  it stops when the kept set no longer changes (iterations 0: the median). On clean data
  it is the plain mean (up to the rare rejected frame); a minority of frames, however far
  away, is ignored (the median and MAD it starts from hold up to just under half).
  """
  from scipy.stats import chi2
  x = np.asarray(values, np.float64)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"values of shape {x.shape}, expected [T >= 1, D]")
  anchor = np.median(x, axis=0)
  delta = x - anchor                       # the mean is anchor + mean(delta): a constant
  estimate = np.zeros(x.shape[1])          # input comes back exactly
  limit = chi2.ppf(quantile, x.shape[1])
  keep = None
  for _ in range(int(iterations)):
    residual = delta - estimate
    z2 = np.sum((residual / _robust_scale(residual)) ** 2, axis=1)
    new_keep = z2 <= limit
    if not new_keep.any():                 # nothing within the limit: keep the closest
      new_keep = z2 <= z2.min()
    if keep is not None and np.array_equal(new_keep, keep):
      break
    keep = new_keep
    estimate = delta[keep].mean(axis=0)
  return anchor + estimate


# -------------------------------------------------------------------------- smoothing


def _sorted_times(times, n: int):
  times = np.asarray(times, np.float64).reshape(-1)
  if len(times) != n:
    raise ValueError(f"{len(times)} times for {n} values")
  if not np.all(np.isfinite(times)):
    raise ValueError("times must be finite")
  order = np.argsort(times, kind="stable")
  return times[order], order


def _kernel_blocks(times: np.ndarray, sigma: float):
  """times [T] ascending -> yields (rows, cols, weights [len(rows), len(cols)]): the
  Gaussian kernel exp(-dt^2 / 2 sigma^2), zero beyond TRUNCATE sigmas, BLOCK rows at a
  time (so memory grows with the kernel's width, not T^2)."""
  n, reach = len(times), TRUNCATE * sigma
  for a in range(0, n, BLOCK):
    b = min(n, a + BLOCK)
    lo = int(np.searchsorted(times, times[a] - reach, side="left"))
    hi = int(np.searchsorted(times, times[b - 1] + reach, side="right"))
    d = (times[a:b, None] - times[None, lo:hi]) / sigma
    weights = np.where(np.abs(d) <= TRUNCATE, np.exp(-0.5 * d * d), 0.0)
    yield slice(a, b), slice(lo, hi), weights


def _check_sigma(sigma_seconds) -> float:
  sigma = float(sigma_seconds)
  if not sigma >= 0:
    raise ValueError(f"sigma_seconds={sigma_seconds}: must be >= 0")
  return sigma


def smooth_series(values, times, sigma_seconds: float) -> np.ndarray:
  """values [T, D] (or [T]), times [T] seconds (any order, gaps allowed) -> float64, the
  shape of values: each row the Gaussian-weighted mean of the rows around its time,
  weights normalised per row (so uneven sampling and the ends are unbiased for a constant).
  sigma_seconds 0 returns the values."""
  x = np.asarray(values, np.float64)
  sigma = _check_sigma(sigma_seconds)
  if sigma == 0 or len(x) <= 1:
    _sorted_times(times, len(x))
    return x.copy()
  flat = x.reshape(len(x), -1)
  t, order = _sorted_times(times, len(x))
  xs = flat[order]
  out = np.empty_like(xs)
  for rows, cols, w in _kernel_blocks(t, sigma):
    out[rows] = (w @ xs[cols]) / w.sum(axis=1, keepdims=True)
  result = np.empty_like(out)
  result[order] = out
  return result.reshape(x.shape)


def _continuous_rotvec(rotvec: np.ndarray, inputs: np.ndarray) -> np.ndarray:
  """rotvec [T, 3] (angles in [0, pi]) -> the same rotations written continuously in
  time: each as the axis-angle vector nearest the previous one, choosing between angle
  theta about axis a and theta - 2 pi (2 pi - theta about -a), so the vectors do not jump
  where a rotation crosses pi. Of the two continuous writings (the other flips every
  vector that way) the one nearer `inputs` [T, 3] overall is returned."""
  out = np.empty_like(rotvec)
  reference = inputs[0]
  for i, r in enumerate(rotvec):
    angle = np.linalg.norm(r)
    if angle == 0:
      out[i] = r
    else:
      axis = r / angle
      # |(angle + 2 pi k) axis - reference| is least at angle + 2 pi k = axis . reference.
      k = np.clip(np.round((axis @ reference - angle) / (2 * np.pi)), -1, 0)
      out[i] = (angle + 2 * np.pi * k) * axis
    reference = out[i]
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  flipped = out * (1.0 - 2 * np.pi / np.where(norm > 0, norm, np.inf))
  distance = lambda x: np.linalg.norm(x - inputs, axis=1).sum()
  return flipped if distance(flipped) < distance(out) else out


def smooth_rotations(axis_angle, times, sigma_seconds: float) -> np.ndarray:
  """axis_angle [T, 3], times [T] seconds -> [T, 3] float64: the rotations smoothed in time.

  Each output is the weighted chordal mean of the input rotations (weights: the Gaussian
  kernel of smooth_series): the unit quaternion maximising sum_j w_j (q . q_j)^2, the top
  eigenvector of sum_j w_j q_j q_j^T. That is invariant to each quaternion's sign, so no
  hemisphere alignment can go wrong (a fast or noisy sequence near pi included), and the
  result is renormalised by construction. The output vectors are written continuously in
  time, nearest the input overall (`_continuous_rotvec`: an angle may exceed pi rather
  than jump to the opposite axis). sigma_seconds 0 returns the input.
  """
  aa = np.asarray(axis_angle, np.float64)
  if aa.ndim != 2 or aa.shape[1] != 3:
    raise ValueError(f"axis_angle of shape {aa.shape}, expected [T, 3]")
  sigma = _check_sigma(sigma_seconds)
  t, order = _sorted_times(times, len(aa))
  if sigma == 0 or len(aa) == 0:
    return aa.copy()
  q = Rotation.from_rotvec(aa[order]).as_quat()                 # [T, 4]
  mean = np.empty_like(q)
  for rows, cols, w in _kernel_blocks(t, sigma):
    m = np.einsum("rc,ci,cj->rij", w, q[cols], q[cols])          # [r, 4, 4]
    mean[rows] = np.linalg.eigh(m)[1][..., -1]                   # top eigenvector
  rotvec = _continuous_rotvec(Rotation.from_quat(mean).as_rotvec(), aa[order])
  result = np.empty_like(rotvec)
  result[order] = rotvec
  return result


# ----------------------------------------------------------------------------- bundle


def _stack(rows, key, dtype=np.float64) -> np.ndarray:
  try:
    return np.stack([np.asarray(r[key], dtype) for r in rows])
  except KeyError:
    raise KeyError(f"build_sequence: a frame has no {key!r}") from None


def build_sequence(frames, fps: float, sigma_seconds: float = 0.05, every: int = 1) -> dict:
  """frames: per-face per-frame dicts (frame_index, track, shape [S], expression [E],
  pose [6], scale [1], translation [3], box [4], score, landmarks5 [5, 2]) -> the dict of
  arrays of sequence.npz (module doc). Raises ValueError for no frames, fps <= 0 or two
  rows of one track in one frame."""
  if not frames:
    raise ValueError("build_sequence: no frames")
  fps = float(fps)
  if not fps > 0:
    raise ValueError(f"build_sequence: fps={fps}, must be > 0")
  sigma = _check_sigma(sigma_seconds)
  rows = sorted(frames, key=lambda r: (int(r["frame_index"]), int(r["track"])))
  frame_index = _stack(rows, "frame_index", np.int64)
  track = _stack(rows, "track", np.int64)
  pairs = np.stack([frame_index, track], axis=1)
  if len(np.unique(pairs, axis=0)) != len(pairs):
    raise ValueError("build_sequence: a track has two faces in one frame")
  time = frame_index / fps
  raw = {key: _stack(rows, key).reshape(len(rows), -1)
         for key in ("shape", "expression", "pose", "scale", "translation")}
  if raw["pose"].shape[1] % 3:
    raise ValueError(f"build_sequence: pose of width {raw['pose'].shape[1]}, expected "
                     "axis-angle triples")
  tracks = np.unique(track)
  shape_track = np.empty((len(tracks), raw["shape"].shape[1]))
  smoothed = {key: np.empty_like(raw[key]) for key in ("expression", "pose", "scale",
                                                       "translation")}
  for k, tid in enumerate(tracks):
    idx = np.flatnonzero(track == tid)
    t = time[idx]
    shape_track[k] = robust_mean(raw["shape"][idx])
    for key in ("expression", "scale", "translation"):
      smoothed[key][idx] = smooth_series(raw[key][idx], t, sigma)
    for j in range(0, raw["pose"].shape[1], 3):   # global, jaw (, ...): one rotation each
      smoothed["pose"][idx, j:j + 3] = smooth_rotations(raw["pose"][idx, j:j + 3], t, sigma)
  f32 = lambda a: np.asarray(a, np.float32)
  out = {"frame_index": frame_index, "time": f32(time), "track": track, "tracks": tracks,
         "shape_track": f32(shape_track)}
  out.update({key: f32(value) for key, value in raw.items()})
  out.update({f"{key}_smoothed": f32(value) for key, value in smoothed.items()})
  out["box"] = f32(_stack(rows, "box").reshape(len(rows), 4))
  out["score"] = f32(_stack(rows, "score").reshape(len(rows)))
  out["landmarks5"] = f32(_stack(rows, "landmarks5").reshape(len(rows), 5, 2))
  out["fps"] = np.asarray(fps, np.float32)
  out["sigma_seconds"] = np.asarray(sigma, np.float32)
  out["every"] = np.asarray(int(every), np.int64)
  return out
