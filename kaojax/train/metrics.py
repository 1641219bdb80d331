"""Metric logging: workdir/metrics.jsonl (one JSON object per row), TensorBoard
(workdir/tensorboard) and a readable log line."""

import json
import pathlib

from absl import logging


class MetricWriter:

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self._path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict, **extra):
    """Appends {"step": step, **extra, **metrics} (metrics as floats)."""
    if not self.enabled:
      return
    row = {"step": int(step), **extra, **{k: float(v) for k, v in metrics.items()}}
    with self._path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
    self._tb.flush()
    logging.info("step %d %s", step, "  ".join(
        [f"{k}={v}" for k, v in extra.items()] +
        [f"{k}={float(v):.4g}" for k, v in sorted(metrics.items())]))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir):
  """All rows of workdir/metrics.jsonl."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
