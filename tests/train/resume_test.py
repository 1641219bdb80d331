"""Training resumes exactly: 6 steps straight == 3 steps, restart, 3 steps, held-out
evaluations included."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from kaojax.train.loop import train_and_evaluate
from kaojax.train.metrics import read_metrics
from tests.train.tiny_run import tiny_config


def _config(root):
  # the restart happens exactly at the stage switch
  return tiny_config(root, total_steps=6, stage1_steps=3, eval_every=3)


def _final_params(workdir):
  path = workdir / "checkpoints" / "6" / "default"
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path)["params"])


def test_restart_gives_identical_metrics_and_parameters(tiny_dataset, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(_config(tiny_dataset), straight)
  first = _config(tiny_dataset)
  first.stop_at_step = 3
  train_and_evaluate(first, resumed)
  assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3]
  # A run killed after logging steps 4 and 5 but before its next checkpoint: its
  # checkpoint of step 5 is removed, as if it had never been written.
  killed = _config(tiny_dataset)
  killed.stop_at_step = 5
  train_and_evaluate(killed, resumed)
  shutil.rmtree(resumed / "checkpoints" / "5")
  assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3, 4, 5]
  train_and_evaluate(_config(tiny_dataset), resumed)

  a, b = read_metrics(straight), read_metrics(resumed)
  train_a = [r for r in a if "loss" in r]
  assert [r["step"] for r in train_a] == [1, 2, 3, 4, 5, 6]
  assert [r["stage"] for r in train_a] == [1, 1, 1, 2, 2, 2]
  # evaluations at the start, at the stage switch (stage I's) and at the end
  evals = [r for r in a if "eval/landmark_error_px" in r]
  assert [(r["step"], r["stage"]) for r in evals] == [(0, 1), (3, 1), (6, 2)]
  for r in evals:
    assert {"eval/psnr", "eval/vertex_error", "eval/rotation_error_deg",
            "eval/var_shape"} <= set(r)
    assert 0 <= r["eval/rotation_error_deg"] <= 180 and np.isfinite(r["eval/psnr"])
  assert len(a) == len(b)      # every (step, kind) row once
  for row_a, row_b in zip(a, b):
    assert row_a == row_b
  for r in train_a:  # each renderer's dropped primitives (the mesh: stage II), skip counts
    assert {"skipped_subjects", "nonfinite_steps"} <= set(r)
  for x, y in zip(_final_params(straight), _final_params(resumed)):
    np.testing.assert_array_equal(x, y)
