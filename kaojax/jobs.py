"""The jobs `run.py` can start, chosen by the config's `job` field."""

import importlib
import pathlib

# job name -> "module:function" taking (config, workdir).
JOBS = {
    "eval_facelift": "kaojax.evaluate.facelift_job:run",
    "eval_multiview": "kaojax.evaluate.multiview_job:run",
    "eval_now": "kaojax.evaluate.now_job:run",
    "flame_demo": "kaojax.flame.demo:run",
    "infer_facelift": "kaojax.infer.facelift:run_job",
    "infer_kaolrm": "kaojax.infer.kaolrm:run",
    "train": "kaojax.train.loop:train_and_evaluate",
    "train_gslrm": "kaojax.train.facelift_gslrm:train",
    "train_mvdiff": "kaojax.train.facelift_mvdiff:train",
}


def run(config, workdir):
  """Runs `config.job` writing into `workdir`; returns the job's result."""
  if config.job not in JOBS:
    raise ValueError(f"unknown job {config.job!r} (known: {', '.join(sorted(JOBS))})")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  module, function = JOBS[config.job].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)
