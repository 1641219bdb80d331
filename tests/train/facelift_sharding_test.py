"""FaceLift's two trainings, sharded, equal single-device training (8 fake CPU devices)."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_two_steps_on_a_data_fsdp_mesh_match_one_device():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-m", "tests.train.facelift_sharded_steps"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  reports = json.loads(result.stdout.strip().splitlines()[-1])
  for name, report in reports.items():
    assert report["fsdp_sharded"], f"{name}: no parameter was split over the fsdp axis"
    assert report["single"][0]["loss"] > 0, name
    assert report["max_rel_loss_diff"] < 1e-5, (name, report)
    assert report["max_rel_grad_norm_diff"] < 1e-4, (name, report)
    assert report["max_param_diff"] < 1e-5, (name, report)
    assert report["max_param_change"] > 1e-4, (name, report)  # the steps did train
