"""FLAME against golden outputs of the original DECA/KaoLRM code (and smplx)."""

import numpy as np
import pytest

from kaojax.flame import load_flame
from tests.oracle_cases import load_case, oracle_cases


def _model_files(folder, meta):
  files = meta["files"]
  model = next(folder / n for n in files if n.endswith(".pkl"))
  embedding = next(folder / n for n in files if "landmark" in n)
  return model, embedding


@pytest.mark.parametrize("case", oracle_cases("flame_deca"))
def test_oracle(case):
  meta, inputs, outputs = load_case(case)
  cfg = meta["source"]["config"]
  model_file, embedding = _model_files(case, meta)
  flame = load_flame(model_file, n_shape=cfg["n_shape"], n_expr=cfg["n_exp"], landmarks=embedding)
  out = flame(inputs["shape"], inputs["expression"], inputs["pose"])
  tol = meta["tolerance"]["recommended"]
  got = {"vertices": out.vertices, "landmarks2d": out.landmarks2d,
         "landmarks3d": out.landmarks3d, "yaw_deg": out.yaw_deg, "dynamic_bin": out.contour_bin}
  for name in meta["outputs"]:
    if name in meta.get("exact_outputs", []):
      np.testing.assert_array_equal(np.asarray(got[name]), outputs[name], err_msg=name)
    else:
      np.testing.assert_allclose(np.asarray(got[name]), outputs[name], atol=tol["atol"],
                                 rtol=tol["rtol"], err_msg=name)


@pytest.mark.parametrize("case", oracle_cases("flame_deca"))
def test_oracle_smplx_sign(case):
  meta, inputs, _ = load_case(case)
  smplx_out = dict(np.load(case / "smplx_outputs.npz"))
  cfg = meta["source"]["config"]
  model_file, embedding = _model_files(case, meta)
  flame = load_flame(model_file, n_shape=cfg["n_shape"], n_expr=cfg["n_exp"],
                     landmarks=embedding, yaw_sign="smplx")
  out = flame(inputs["shape"], inputs["expression"], inputs["pose"])
  tol = meta["tolerance"]["recommended"]
  np.testing.assert_array_equal(np.asarray(out.contour_bin), smplx_out["dynamic_bin"])
  np.testing.assert_allclose(out.landmarks2d[:, :17], smplx_out["landmarks_contour17"],
                             atol=tol["atol"], rtol=tol["rtol"])
  np.testing.assert_allclose(out.landmarks2d[:, 17:], smplx_out["landmarks_static51"],
                             atol=tol["atol"], rtol=tol["rtol"])
