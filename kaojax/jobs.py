"""The jobs `run.py` can start, chosen by the config's `job` field."""

import importlib
import pathlib

# job name -> module with `run(config, workdir)`.
JOBS = {
    "flame_demo": "kaojax.flame.demo",
}


def run(config, workdir):
  """Runs `config.job` writing into `workdir`; returns the job's result."""
  if config.job not in JOBS:
    raise ValueError(f"unknown job {config.job!r} (known: {', '.join(sorted(JOBS))})")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return importlib.import_module(JOBS[config.job]).run(config, workdir)
