"""A multi-host run (2 processes joined by jax.distributed, one CPU device each, sharing
a work directory, each reading its own slice of the data) trains as one process fed
the same global batches."""

import os
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipeline import sources
from kaojax.train import loop
from kaojax.train.metrics import read_metrics
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import create_state
from tests.train.multihost_worker import multihost_config

HOSTS = 2


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _as_one_host(make_dataset):
  """sources.make_dataset for a single process whose batch b is host 0's batch b
  followed by host 1's: the global batch that the multi-host run assembles."""
  def one_host(loader, batch_size, seed, process_index=0, process_count=1):
    assert (process_index, process_count) == (0, 1)
    hosts = [make_dataset(loader, batch_size // HOSTS, seed, process_index=i,
                          process_count=HOSTS) for i in range(HOSTS)]
    return grain.MapDataset.range(len(hosts[0])).map(
        lambda b: jax.tree.map(lambda *parts: np.concatenate(parts), *[h[b] for h in hosts]))
  return one_host


def _tolerance(metric):
  """Relative tolerance between a run on one device and one on two."""
  if metric == "grad_norm":  # a sum over every parameter, in another order per device count
    return 1e-4
  if metric.startswith("eval/var_"):  # variances across views of nearly equal predictions
    return 1e-3
  return 1e-5


def _restore(workdir, step, like=None):
  """The state saved at `step`, onto this process's devices like `like`."""
  path = workdir / "checkpoints" / str(step) / "default"
  return ocp.StandardCheckpointer().restore(path, like)


def test_two_processes_train_as_one_fed_the_same_global_batches(tmp_path, monkeypatch):
  multi = tmp_path / "multihost"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  workers = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.multihost_worker", str(port), str(i), str(HOSTS),
       str(multi)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(HOSTS)]
  try:
    logs = [w.communicate(timeout=900)[0] for w in workers]
  finally:  # one that failed leaves the other waiting for it
    for w in workers:
      w.kill()
  for i, (w, log) in enumerate(zip(workers, logs)):
    assert w.returncode == 0, f"process {i}:\n{log[-4000:]}"
  for i, log in enumerate(logs):
    assert f"process {i} of {HOSTS}: 1 of {HOSTS} devices" in log, log[-4000:]

  single = tmp_path / "single"
  monkeypatch.setattr(sources, "make_dataset", _as_one_host(sources.make_dataset))
  loop.train_and_evaluate(multihost_config(HOSTS), single)

  a, b = read_metrics(single), read_metrics(multi)
  # one row per step and per evaluation: only process 0 writes
  assert [(r["step"], "loss" in r) for r in b] == [(0, False), (1, True), (2, True),
                                                   (2, False)]
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for row_a, row_b in zip(a, b):
    assert row_a.keys() == row_b.keys()
    for k in row_a:
      assert row_b[k] == pytest.approx(row_a[k], rel=_tolerance(k), abs=1e-6), (
          row_a["step"], k)
  config = multihost_config(HOSTS)
  start = create_state(loop.build_model(config, loop.build_flame(config)),
                       make_optimizer(1e-4, 1, 10))[1].params
  want = _restore(single, 2)
  got = _restore(multi, 2, like=want)
  leaves = list(zip(jax.tree.leaves(start), jax.tree.leaves(want["params"]),
                    jax.tree.leaves(got["params"])))
  update = max(float(np.max(np.abs(x - x0))) for x0, x, _ in leaves)
  assert update > 1e-4   # the steps did train
  # AdamW divides each gradient element by its own running RMS: where a gradient is at
  # rounding level, so is the direction of its update. Bound the difference by the
  # largest update of the run (1.5e-3 here; the largest difference is 2.3e-5).
  for _, x, y in leaves:
    np.testing.assert_allclose(y, x, rtol=0, atol=0.02 * update)
