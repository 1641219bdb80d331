"""benchmarks/infer.py cannot rot: its --quick run (3 small photos, the tiny model)
measures the job against its forward and kaojax's MTCNN against facenet-pytorch's,
and ends with one JSON object holding every number."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "infer.py"


def _positive(x):
  return isinstance(x, (int, float)) and x > 0


def test_quick_run_reports_both_comparisons():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=dict(os.environ))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  _check(r, proc.stdout[-3000:])


def _check(r, out):
  try:
    _check_result(r)
  except AssertionError as e:
    raise AssertionError(f"{e}\n{out}") from e


def _check_result(r):
  assert r["benchmark"] == "kaolrm_inference" and r["quick"] is True
  assert (r["preset"], r["dtype"], r["backend"]) == ("tiny", "float32", "cpu")

  job = r["job"]
  assert job["photos"] == 3 and job["batch"] == 2
  assert set(job["job_wall_s_by_copies"]) == {"1", "2"}     # 3 and 6 photos
  for key in ("job_wall_s", "job_images_per_s", "forward_images_per_s"):
    assert _positive(job[key]), key
  assert abs(job["job_images_per_s"] - 3 / job["job_wall_s"]) < 1e-3 * job["job_images_per_s"]
  # noise may leave the steady rate undefined, never wrong-signed
  steady = job["job_steady_images_per_s"]
  assert steady is None or (_positive(steady) and abs(
      job["steady_over_forward"] - steady / job["forward_images_per_s"]) < 1e-3)
  assert {"detect", "model", "total"} <= set(job["seconds_per_photo"])

  det = r["detector"]
  assert len(det["per_photo"]) == 3
  for row in det["per_photo"]:
    assert _positive(row["kaojax_ms"]) and _positive(row["facenet_ms"])
    assert row["faces"] == [1, 1], row     # both detectors find the one face
  assert _positive(det["speedup_vs_facenet"])
  assert abs(det["speedup_vs_facenet"] - det["facenet_ms_per_photo"]
             / det["kaojax_ms_per_photo"]) < 1e-3 * det["speedup_vs_facenet"]
  assert 0 <= det["facenet_nms_ms_per_photo"] < det["facenet_ms_per_photo"]
