"""Video inference helpers (kaojax.infer.video): decoding, tracks, robust shape,
temporal smoothing of series and rotations, the sequence bundle."""

import inspect
import subprocess

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from kaojax.export.animation import write_animation
from kaojax.infer import video
from kaojax.infer.inputs import UnreadableImage


# ---------------------------------------------------------------------------- reading


def _clip(n=12, h=48, w=64, noise=0):
  """n frames uint8 [h, w, 3]: a red square moving right and a green one moving left on
  grey, plus uniform noise of amplitude `noise` (fixed seed)."""
  rng = np.random.default_rng(0)
  frames = []
  for t in range(n):
    f = np.full((h, w, 3), 60, np.int64)
    f[6:22, 2 + 3 * t:18 + 3 * t] = (230, 30, 30)
    f[26:42, 44 - 2 * t:60 - 2 * t] = (30, 220, 40)
    if noise:
      f += rng.integers(-noise, noise + 1, f.shape)
    frames.append(np.clip(f, 0, 255).astype(np.uint8))
  return frames


def _write(path, frames, fps=10):
  written = write_animation(path, frames, fps)
  if written.suffix != ".mp4":
    pytest.skip("no ffmpeg backend: write_animation wrote a GIF")
  return written


def test_is_video_path():
  assert video.is_video_path("a/b/clip.MP4") and video.is_video_path("x.webm")
  assert not video.is_video_path("face.png") and not video.is_video_path("list.txt")


def test_video_info_and_read_frames(tmp_path):
  frames = _clip()
  path = _write(tmp_path / "clip.mp4", frames)
  info = video.video_info(path)
  assert info == {"fps": 10.0, "num_frames": 12, "width": 64, "height": 48}
  stream = video.read_frames(path)
  assert inspect.isgenerator(stream)
  got = list(stream)
  assert [i for i, _ in got] == list(range(12))
  for (i, frame), original in zip(got, frames):
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert np.abs(frame.astype(int) - original).mean() < 6, i   # H.264 is lossy
  assert [i for i, _ in video.read_frames(path, every=5)] == [0, 5, 10]
  assert [i for i, _ in video.read_frames(path, every=5, max_frames=2)] == [0, 5]
  np.testing.assert_array_equal(next(video.read_frames(path, every=5))[1], got[0][1])
  with pytest.raises(ValueError):
    next(video.read_frames(path, every=0))


def test_unreadable_files_raise_naming_the_file(tmp_path):
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(b"this is not a video" * 20)
  for path in (garbage, tmp_path / "missing.mp4"):
    with pytest.raises(UnreadableImage, match=path.name):
      list(video.read_frames(path))
    with pytest.raises(UnreadableImage, match=path.name):
      video.video_info(path)


def test_truncated_videos(tmp_path):
  # write_animation's MP4 keeps its index (moov) at the end: half the file has no index,
  # so nothing decodes.
  frames = _clip(n=24, noise=40)
  full = _write(tmp_path / "full.mp4", frames)
  half = tmp_path / "half.mp4"
  half.write_bytes(full.read_bytes()[:full.stat().st_size // 2])
  with pytest.raises(UnreadableImage, match="half.mp4"):
    list(video.read_frames(half))
  # With the index first (+faststart), the frames before the cut decode and reading
  # stops there without an error.
  import imageio_ffmpeg
  faststart = tmp_path / "faststart.mp4"
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i",
                  str(full), "-c", "copy", "-movflags", "+faststart", str(faststart)],
                 check=True)
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(faststart.read_bytes()[:faststart.stat().st_size // 2])
  got = list(video.read_frames(cut))
  assert 0 < len(got) < 24
  assert [i for i, _ in got] == list(range(len(got)))
  assert np.abs(got[0][1].astype(int) - frames[0]).mean() < 20


class _BreakingReader:
  """A stand-in for imageio's reader: `good` frames, then ffmpeg's mid-frame error."""

  def __init__(self, good):
    self.good, self.closed = good, False

  def __iter__(self):
    for _ in range(self.good):
      yield np.zeros((4, 6, 3), np.uint8)
    raise RuntimeError("Could not read frame: End of file reached before full frame")

  def close(self):
    self.closed = True


def test_decoding_errors_mid_stream(monkeypatch):
  reader = _BreakingReader(3)
  monkeypatch.setattr(video, "_open_reader", lambda path: reader)
  assert [i for i, _ in video.read_frames("clip.mp4")] == [0, 1, 2]
  assert reader.closed
  reader = _BreakingReader(3)
  stream = video.read_frames("clip.mp4")
  next(stream)
  stream.close()                                         # a consumer that stops early
  assert reader.closed
  reader = _BreakingReader(0)
  with pytest.raises(UnreadableImage, match="clip.mp4: no frame decodes"):
    list(video.read_frames("clip.mp4"))
  assert reader.closed


# ----------------------------------------------------------------------------- tracks


def test_box_iou():
  iou = video.box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
  np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_link_tracks_swap_gap_and_new_faces():
  a, b, c = [0, 0, 10, 10], [50, 0, 60, 10], [100, 100, 120, 120]
  shift = lambda box, dx: [box[0] + dx, box[1], box[2] + dx, box[3]]
  frames = [
      [a, b],
      [shift(b, 1), shift(a, 1)],        # detector order swapped
      [shift(a, 2)],                     # b missing for two frames
      [shift(a, 3)],
      [shift(b, 2), shift(a, 4), c],     # b is back, c is new
      [],                                # nobody
      [c],
  ]
  ids = video.link_tracks(frames)
  assert [list(i) for i in ids] == [[0, 1], [1, 0], [0], [0], [1, 0, 2], [], [2]]
  assert all(i.dtype == np.int64 for i in ids)
  # A gap longer than max_gap starts a new track.
  assert [list(i) for i in video.link_tracks(frames, max_gap=1)] == [
      [0, 1], [1, 0], [0], [0], [2, 0, 3], [], [3]]


def test_link_tracks_is_greedy_by_iou_not_by_box_order():
  # Box 0 overlaps both tracks; box 1 fits track 1 best and is served first.
  ids = video.link_tracks([[[0, 0, 10, 10], [6, 0, 16, 10]],
                           [[3, 0, 13, 10], [6, 0, 16, 10]]], min_iou=0.1)
  assert [list(i) for i in ids] == [[0, 1], [0, 1]]
  ids = video.link_tracks([[[0, 0, 10, 10]], [[40, 0, 50, 10]]])   # no overlap
  assert [list(i) for i in ids] == [[0], [1]]


# ------------------------------------------------------------------------------ shape


def test_robust_mean_clean_data_is_the_mean():
  rng = np.random.default_rng(1)
  for d in (1, 10, 100):
    x = rng.normal(size=(200, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(size=d)
    standard_error = x.std(0) / np.sqrt(len(x))
    assert np.all(np.abs(video.robust_mean(x) - x.mean(0)) <= 0.25 * standard_error)


def test_robust_mean_ignores_outlier_frames():
  rng = np.random.default_rng(2)
  for t, d in ((50, 3), (30, 100)):
    truth = rng.normal(size=d)
    x = truth + 0.1 * rng.normal(size=(t, d))
    bad = rng.choice(t, t // 5, replace=False)                    # 20 % of the frames
    x[bad] += rng.normal(size=(len(bad), d)) * 2.0 + 5.0
    inliers = np.delete(x, bad, axis=0).mean(0)
    robust = video.robust_mean(x)
    assert np.abs(robust - inliers).max() < 0.05
    assert np.abs(x.mean(0) - inliers).max() > 0.5
    assert np.abs(robust - truth).max() < 0.1


def test_robust_mean_small_and_constant_inputs():
  one = np.array([[0.3, -1.0, 2.5]])
  np.testing.assert_array_equal(video.robust_mean(one), one[0])
  two = np.array([[0.0, 1.0], [1.0, 5.0]])
  np.testing.assert_allclose(video.robust_mean(two), [0.5, 3.0], atol=1e-12)
  constant = np.tile([0.1, -0.7, 1e-3, 3.3], (7, 1))
  np.testing.assert_array_equal(video.robust_mean(constant), constant[0])
  with pytest.raises(ValueError):
    video.robust_mean(np.zeros((0, 3)))


# -------------------------------------------------------------------------- smoothing


def test_smooth_series_constant_gaps_and_identity():
  times = np.concatenate([np.arange(10) / 30.0, 5.0 + np.array([0.0, 0.01, 0.2, 0.21])])
  constant = np.tile([1.5, -2.0], (len(times), 1))
  np.testing.assert_allclose(video.smooth_series(constant, times, 0.1), constant, atol=1e-12)
  # Two runs 5 s apart never mix.
  steps = np.concatenate([np.zeros(10), np.ones(4)])
  np.testing.assert_allclose(video.smooth_series(steps, times, 0.2), steps, atol=1e-12)
  x = np.random.default_rng(3).normal(size=(len(times), 3))
  np.testing.assert_array_equal(video.smooth_series(x, times, 0.0), x)
  with pytest.raises(ValueError):
    video.smooth_series(x, times[:-1], 0.1)


def test_smooth_series_denoises_a_sinusoid():
  rng = np.random.default_rng(4)
  times = np.arange(120) / 30.0
  clean = np.stack([np.sin(2 * np.pi * 0.5 * times), np.cos(2 * np.pi * 0.3 * times)], 1)
  noisy = clean + 0.1 * rng.normal(size=clean.shape)
  smoothed = video.smooth_series(noisy, times, 0.1)
  rms = lambda e: np.sqrt(np.mean(e ** 2))
  # About 2.5 over the whole series, 2.8 away from the ends (there the one-sided kernel
  # lags a sloped signal: 3 frames of sigma, 0.18 on the sine's first frame).
  factor = rms(noisy - clean) / rms(smoothed - clean)
  interior = rms((noisy - clean)[10:-10]) / rms((smoothed - clean)[10:-10])
  assert factor > 2.3 and interior > 2.7, (factor, interior)


def test_smooth_series_blocks_and_order_match_a_dense_kernel():
  rng = np.random.default_rng(5)
  times = np.cumsum(rng.uniform(0.01, 0.08, 700))          # uneven, > 2 blocks
  x = rng.normal(size=(700, 2))
  d = (times[:, None] - times[None]) / 0.15
  w = np.exp(-0.5 * d ** 2)
  dense = (w @ x) / w.sum(1, keepdims=True)
  np.testing.assert_allclose(video.smooth_series(x, times, 0.15), dense, atol=1e-4)
  perm = rng.permutation(700)
  np.testing.assert_allclose(video.smooth_series(x[perm], times[perm], 0.15), dense[perm],
                             atol=1e-4)


def _angle_between(a, b):
  """Rotation angle of the difference between axis-angle arrays a, b [T, 3]."""
  return (Rotation.from_rotvec(a).inv() * Rotation.from_rotvec(b)).magnitude()


def _near_pi_sequence(t=60, seed=6):
  """A constant rotation of 3.1 rad plus 0.05 rad noise, in scipy's canonical axis-angle
  (angles <= pi): some frames come out about the opposite axis."""
  rng = np.random.default_rng(seed)
  axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
  truth = Rotation.from_rotvec(3.1 * axis)
  noise = Rotation.from_rotvec(0.05 * rng.normal(size=(t, 3)))
  return axis, 3.1 * axis, (noise * truth).as_rotvec()


def test_smooth_rotations_constant_is_unchanged():
  times = np.arange(20) / 25.0
  for rotvec in ([0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [0.0, 3.1, 0.0], [0.0, 0.0, np.pi]):
    seq = np.tile(rotvec, (20, 1))
    np.testing.assert_allclose(video.smooth_rotations(seq, times, 0.1), seq, atol=1e-9)


def test_smooth_rotations_near_pi_does_not_flip():
  axis, truth, noisy = _near_pi_sequence()
  times = np.arange(len(noisy)) / 30.0
  assert (noisy @ axis < 0).sum() > 5                     # the input flips axis
  smoothed = video.smooth_rotations(noisy, times, 0.1)
  error = _angle_between(smoothed, np.tile(truth, (len(noisy), 1)))
  raw_error = _angle_between(noisy, np.tile(truth, (len(noisy), 1)))
  assert np.sqrt(np.mean(error ** 2)) < 0.5 * np.sqrt(np.mean(raw_error ** 2))
  assert error.max() < 0.1 < raw_error.max()
  # The output vectors stay on one side: no jump between frames.
  assert np.linalg.norm(np.diff(smoothed, axis=0), axis=1).max() < 0.05
  side = np.sign(smoothed @ axis)
  assert np.all(side == side[0]) and np.all(np.abs(smoothed @ axis) > 3.0)
  assert side[0] == np.sign(np.sum(np.sign(noisy @ axis)))   # the inputs' majority
  # Averaging the axis-angle vectors directly fails: flipped frames cancel.
  naive = video.smooth_series(noisy, times, 0.1)
  assert _angle_between(naive, np.tile(truth, (len(noisy), 1))).max() > 1.0


def test_smooth_rotations_sigma_zero_and_tiny_return_the_input():
  rng = np.random.default_rng(7)
  times = np.arange(40) / 30.0
  ordinary = 0.4 * rng.normal(size=(40, 3))
  _, _, near_pi = _near_pi_sequence(40, seed=8)
  for seq in (ordinary, near_pi):
    np.testing.assert_array_equal(video.smooth_rotations(seq, times, 0.0), seq)
    tiny = video.smooth_rotations(seq, times, 1e-4)
    assert _angle_between(tiny, seq).max() < 1e-6
  # Away from pi even the vectors agree; near pi they may differ by the representation.
  np.testing.assert_allclose(video.smooth_rotations(ordinary, times, 1e-4), ordinary,
                             atol=1e-6)


def test_smooth_rotations_crossing_pi_is_continuous():
  axis = np.array([0.0, 0.6, 0.8])
  angles = np.linspace(2.9, 3.4, 31)                       # crosses pi
  canonical = Rotation.from_rotvec(angles[:, None] * axis).as_rotvec()
  times = np.arange(31) / 30.0
  smoothed = video.smooth_rotations(canonical, times, 0.05)
  # Symmetric weights around a rotation growing linearly about a fixed axis: the interior
  # frames are exactly the input, written without the jump at pi (as angle about axis or,
  # as here where more frames are past pi, as angle - 2 pi: both are continuous).
  unwrapped = angles if smoothed[15] @ axis > 0 else angles - 2 * np.pi
  assert smoothed[15] @ axis < 0
  np.testing.assert_allclose(smoothed[8:-8], unwrapped[8:-8, None] * axis, atol=1e-9)
  assert np.linalg.norm(np.diff(smoothed, axis=0), axis=1).max() < 0.03
  perm = np.random.default_rng(9).permutation(31)
  np.testing.assert_allclose(
      _angle_between(video.smooth_rotations(canonical[perm], times[perm], 0.05),
                     smoothed[perm]), 0.0, atol=1e-9)


# ----------------------------------------------------------------------------- bundle


def _synthetic_frames(seed=10):
  """Two tracks, 5 and 9, interleaved over 40 frames at 25 fps (track 9 from frame 5 to
  34), noisy, two outlier shapes in track 5; rows shuffled."""
  rng = np.random.default_rng(seed)
  shapes = {5: rng.normal(size=20), 9: rng.normal(size=20)}
  levels = {5: np.zeros(3), 9: np.full(3, 10.0)}
  poses = {5: [0.0, 3.1, 0.0], 9: [0.2, -0.1, 0.05]}
  rows = []
  for f in range(40):
    for track in (5, 9):
      if track == 9 and not 5 <= f < 35:
        continue
      shape = shapes[track] + 0.05 * rng.normal(size=20)
      if track == 5 and f in (7, 21):
        shape = shape + 4.0
      glob = (Rotation.from_rotvec(0.03 * rng.normal(size=3))
              * Rotation.from_rotvec(poses[track])).as_rotvec()
      rows.append({
          "frame_index": f, "track": track, "shape": shape,
          "expression": levels[track][:1].repeat(10) + 0.1 * rng.normal(size=10),
          "pose": np.concatenate([glob, [0.1, 0.0, 0.0] + 0.02 * rng.normal(size=3)]),
          "scale": np.array([1.0 + 0.01 * rng.normal()]),
          "translation": levels[track] + 0.05 * rng.normal(size=3),
          "box": np.array([0, 0, 10, 10.0]) + track, "score": 0.99,
          "landmarks5": np.full((5, 2), float(f)),
      })
  order = rng.permutation(len(rows))
  return [rows[i] for i in order], shapes, levels


def test_build_sequence(tmp_path):
  frames, shapes, levels = _synthetic_frames()
  seq = video.build_sequence(frames, fps=25.0, sigma_seconds=0.08, every=2)
  n = len(frames)
  expected = {
      "frame_index": (n,), "time": (n,), "track": (n,), "tracks": (2,), "shape": (n, 20),
      "shape_track": (2, 20), "expression": (n, 10), "pose": (n, 6), "scale": (n, 1),
      "translation": (n, 3), "expression_smoothed": (n, 10), "pose_smoothed": (n, 6),
      "scale_smoothed": (n, 1), "translation_smoothed": (n, 3), "box": (n, 4),
      "score": (n,), "landmarks5": (n, 5, 2), "fps": (), "sigma_seconds": (), "every": ()}
  assert {k: v.shape for k, v in seq.items()} == expected
  for key, value in seq.items():
    assert value.dtype == (np.int64 if key in ("frame_index", "track", "tracks", "every")
                           else np.float32), key
  # Rows ordered by frame, then track; times from the frame index.
  keys = list(zip(seq["frame_index"], seq["track"]))
  assert keys == sorted(keys) and len(set(keys)) == n
  np.testing.assert_allclose(seq["time"], seq["frame_index"] / 25.0, rtol=1e-6)
  np.testing.assert_array_equal(seq["tracks"], [5, 9])
  # Per-track shape, despite the outliers in track 5.
  for k, track in enumerate(seq["tracks"]):
    assert np.abs(seq["shape_track"][k] - shapes[track]).max() < 0.05
  # Smoothing stays within each track: the levels are 10 apart, and each track's result
  # is exactly that of smoothing it alone.
  for track in (5, 9):
    idx = seq["track"] == track
    assert np.abs(seq["translation_smoothed"][idx] - levels[track]).max() < 0.1
    assert np.abs(seq["expression_smoothed"][idx] - levels[track][0]).max() < 0.2
    t = seq["frame_index"][idx] / 25.0
    np.testing.assert_allclose(
        seq["expression_smoothed"][idx],
        video.smooth_series(seq["expression"][idx].astype(np.float64), t, 0.08), atol=1e-6)
  # The global pose of track 5 is near pi: smoothed without flipping.
  g5 = seq["pose_smoothed"][seq["track"] == 5, :3]
  side = np.sign(g5[:, 1])
  assert np.all(side == side[0]) and np.all(np.abs(g5[:, 1]) > 3.0)
  raw_err = _angle_between(seq["pose"][seq["track"] == 5, :3], np.tile([0, 3.1, 0], (40, 1)))
  err = _angle_between(g5, np.tile([0, 3.1, 0], (40, 1)))
  assert err.mean() < 0.7 * raw_err.mean()
  # It saves and loads as sequence.npz.
  np.savez(tmp_path / "sequence.npz", **seq)
  with np.load(tmp_path / "sequence.npz") as loaded:
    assert set(loaded.files) == set(expected)
    assert float(loaded["fps"]) == 25.0 and int(loaded["every"]) == 2


def test_build_sequence_rejects_bad_input():
  frames, _, _ = _synthetic_frames()
  with pytest.raises(ValueError):
    video.build_sequence([], fps=25.0)
  with pytest.raises(ValueError):
    video.build_sequence(frames, fps=0.0)
  with pytest.raises(ValueError, match="two faces"):
    video.build_sequence(frames + [frames[0]], fps=25.0)
