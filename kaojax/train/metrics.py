"""Metric logging: workdir/metrics.jsonl (one JSON object per row), TensorBoard
(workdir/tensorboard) and a readable log line."""

import json
import pathlib

from absl import logging


class MetricWriter:
  """Writes rows of metrics. resume_step: the step a resumed run restarts from; rows
  an interrupted run logged past it are dropped from metrics.jsonl and hidden from
  TensorBoard, so every (step, kind) row appears once."""

  def __init__(self, workdir, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    if resume_step > 0 and self._path.is_file():
      rows = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
      self._path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                             purge_step=resume_step + 1 if resume_step > 0 else None)

  def last_value(self, key: str, default=None):
    """`key` of the last row that has it (e.g. a count carried over a resume)."""
    if not (self.enabled and self._path.is_file()):
      return default
    values = [r[key] for r in read_metrics(self._path.parent) if key in r]
    return values[-1] if values else default

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
