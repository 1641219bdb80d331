"""Cumulative error curves as a PNG (matplotlib when installed, else drawn with PIL)."""

import pathlib

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (0, 0, 0),
           (148, 103, 189), (140, 86, 75)]


def plot_cumulative(path, curves: dict, x_max: float = 8.0, title: str = "") -> pathlib.Path:
  """curves {label: (x [K] mm, percentage [K])} -> a PNG at `path`: error in mm on
  0..x_max against the percentage of errors below it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return _plot_pil(path, curves, x_max, title)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for label, (x, y) in curves.items():
    ax.plot(x, y, label=label)
  ax.set(xlim=(0, x_max), ylim=(0, 100), xlabel="Error [mm]", ylabel="Percentage", title=title)
  ax.legend(loc="lower right")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_pil(path, curves, x_max, title, width=640, height=480):
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  left, right, top, bottom = 60, width - 20, 30, height - 50
  to_px = lambda x, y: (left + (right - left) * x / x_max, bottom - (bottom - top) * y / 100)
  draw.rectangle([left, top, right, bottom], outline="black")
  for tick in range(int(x_max) + 1):
    px, _ = to_px(tick, 0)
    draw.line([px, bottom, px, bottom + 5], fill="black")
    draw.text((px - 3, bottom + 8), str(tick), fill="black")
  for tick in range(0, 101, 20):
    _, py = to_px(0, tick)
    draw.line([left - 5, py, left, py], fill="black")
    draw.text((left - 30, py - 6), str(tick), fill="black")
  draw.text(((left + right) // 2 - 30, bottom + 25), "Error [mm]", fill="black")
  draw.text((5, top - 20), "Percentage", fill="black")
  if title:
    draw.text(((left + right) // 2 - 4 * len(title), 8), title, fill="black")
  for i, (label, (x, y)) in enumerate(curves.items()):
    colour = COLOURS[i % len(COLOURS)]
    keep = np.asarray(x) <= x_max
    points = [to_px(a, b) for a, b in zip(np.asarray(x)[keep], np.asarray(y)[keep])]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    ly = bottom - 20 - 16 * (len(curves) - 1 - i)
    draw.line([right - 170, ly + 6, right - 150, ly + 6], fill=colour, width=2)
    draw.text((right - 145, ly), label, fill="black")
  image.save(path)
  return path
