"""Animations (turntables, video overlays) as MP4, or GIF where no ffmpeg is installed.

`write_animation(path, frames, fps)` streams frames (uint8 [H, W, 3], or float in
[0, 1]) to `path` (.mp4) through imageio-ffmpeg (its wheel ships an ffmpeg binary);
without an ffmpeg backend it writes an animated GIF beside it (`path` with .gif).
Returns the path written. Frames are consumed one at a time: a long video never sits
in memory.
"""

import itertools
import pathlib
from typing import Iterable

import numpy as np


def to_uint8(frame) -> np.ndarray:
  """uint8 [H, W, 3]: uint8 frames as they are, floats in [0, 1] scaled and rounded."""
  frame = np.asarray(frame)
  if frame.dtype == np.uint8:
    return frame
  return (np.clip(frame.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _even(frame: np.ndarray) -> np.ndarray:
  """H.264 (yuv420p) needs even sides: pad the last row / column by repetition."""
  h, w = frame.shape[:2]
  return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_animation(path, frames: Iterable, fps: float) -> pathlib.Path:
  """frames: an iterable of [H, W, 3] (all the same size) -> path.mp4, or path.gif
  when no ffmpeg backend is available. Raises ValueError for no frames."""
  import imageio.v2 as imageio
  path = pathlib.Path(path)
  frames = iter(frames)
  first = next(frames, None)
  if first is None:
    raise ValueError(f"{path}: no frames to write")
  first = to_uint8(first)
  try:
    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                macro_block_size=1, ffmpeg_log_level="error")
  except Exception:                                      # no ffmpeg backend
    path.unlink(missing_ok=True)
    gif = path.with_suffix(".gif")
    imageio.mimwrite(gif, [to_uint8(f) for f in itertools.chain([first], frames)],
                     format="GIF", duration=1000.0 / fps, loop=0)
    return gif
  try:
    for frame in itertools.chain([first], frames):
      frame = to_uint8(frame)
      if frame.shape != first.shape:
        raise ValueError(f"{path}: frame of shape {frame.shape}, the first was {first.shape}")
      writer.append_data(_even(frame))
  except BaseException:
    writer.close()
    path.unlink(missing_ok=True)
    raise
  writer.close()
  return path
