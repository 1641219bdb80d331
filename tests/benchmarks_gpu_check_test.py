"""benchmarks/gpu_check.py cannot rot: its --cpu-dry-run runs every step end to end at
toy sizes and writes the one JSON object a GPU run will write, with the headline keys;
a step that fails or runs past its timeout is recorded with why, and the run goes on."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(out, *extra, timeout=600):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out),
                         "--commit", "test", *extra], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  found = glob.glob(str(out / "gpu_*_test.json"))
  assert len(found) == 1, os.listdir(out)
  result = json.loads(pathlib.Path(found[0]).read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
  return result


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  """One dry run of every step, with kaolrm_infer made to fail."""
  out = tmp_path_factory.mktemp("gpu_check")
  return out, _run(out, "--fail-step", "kaolrm_infer")


def _positive(x):
  return isinstance(x, (int, float)) and x > 0


def test_dry_run_writes_the_headline_keys(dry_run):
  out, r = dry_run
  assert r["schema"] == "kaojax-gpu-check/1" and r["dry_run"] is True
  assert r["commit"] == "test"
  assert r["device"]["platform"] == "cpu"
  assert set(r["steps"]) == {"setup", "cuda_parity", "render", "kaolrm_train",
                             "kaolrm_infer", "facelift", "gsplat"}

  parity = r["cuda_parity"]
  assert {"passed", "failed", "skipped"} <= set(parity)
  assert parity["failed"] == 0 and parity["passed"] + parity["skipped"] > 0

  fb = r["surfel_fwd_bwd_ms"]
  assert _positive(fb["native"]) and _positive(fb["reference"])
  assert fb["gsplat"] is None and "cuda" in fb["gsplat_skipped"].lower()
  assert fb["units"].startswith("ms") and fb["views"] == r["sizes"]["views"]

  train = r["kaolrm_train"]
  assert _positive(train["step_s"]) and _positive(train["examples_per_s"])
  assert _positive(train["peak_gib"])
  assert train["batch"] == r["sizes"]["train_batch"] and train["dtype"] == "bfloat16"
  assert "mfu" in train            # None on a CPU: no listed peak

  fl = r["facelift"]
  assert _positive(r["facelift_seconds_per_image"]) and _positive(fl["unet_step_s"])
  assert fl["ddim_steps"] == 2 and fl["unet_batch"] == 2 * fl["views"]

  assert "skipped" in r["surfel_vs_gsplat"]
  # at most 8 files: what the lent machine returns from $OUT
  assert len(os.listdir(out)) <= 8, os.listdir(out)


def test_a_failing_step_is_recorded_and_the_run_goes_on(dry_run):
  out, r = dry_run
  assert r["steps"]["kaolrm_infer"]["status"] == "error"
  assert "injected" in r["kaolrm_infer_images_per_s"]["error"]
  assert "injected" in json.loads((out / "step_kaolrm_infer.json").read_text())["error"]
  assert r["steps"]["facelift"]["status"] == "ok"    # a later step still ran


def test_a_step_past_its_timeout_is_recorded(tmp_path):
  r = _run(tmp_path, "--steps", "render", "--step-timeout", "render=2", timeout=120)
  assert r["steps"]["render"]["status"] == "timeout"
  assert "timed out" in r["surfel_fwd_bwd_ms"]["error"]
  assert "kaolrm_train" not in r["steps"]


def test_merge_joins_the_steps_of_two_runs(dry_run, tmp_path):
  out, first = dry_run
  second = tmp_path / "second"
  second.mkdir()
  # a second run whose kaolrm_infer succeeded
  rec = {"step": "kaolrm_infer", "status": "ok", "images_per_s": {"batch_1": 3.0},
         "preset": "tiny", "dtype": "bfloat16", "image_size": 56}
  (second / "step_kaolrm_infer.json").write_text(json.dumps(rec))
  merged_dir = tmp_path / "merged"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(out), str(second),
                         "--out", str(merged_dir)], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  merged = json.loads(proc.stdout.strip().splitlines()[-1])
  assert merged["kaolrm_infer_images_per_s"]["batch_1"] == 3.0
  assert merged["kaolrm_train"] == first["kaolrm_train"]
  assert merged["commit"] == "test" and merged["device"]["platform"] == "cpu"


def test_facelift_train_step_measures_both_trainings(tmp_path):
  r = _run(tmp_path, "--steps", "facelift_train", timeout=300)
  assert r["steps"]["facelift_train"]["status"] == "ok", r["steps"]["facelift_train"]
  train = r["facelift_train"]
  for name in ("gslrm", "mvdiff"):
    assert _positive(train[name]["step_s"]) and _positive(train[name]["examples_per_s"])
    assert _positive(train[name]["gradient_s"])      # the peer: loss gradient alone
    assert _positive(train[name]["xla_plan_gib"]) and train[name]["remat"] is True
    assert train[name]["dtype"] == "bfloat16"
  assert "kaolrm_train" not in r["steps"]


def test_more_steps_than_files_returned_are_refused(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path),
                         "--steps", "cuda_parity,render,kaolrm_train,kaolrm_infer,facelift,"
                         "gsplat,facelift_train"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "at most 6 steps" in proc.stderr
