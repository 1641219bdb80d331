"""What the FLAME loaders check in files that unpickle fine: masks, face indices, the
kaojax .npz layout, landmark sets; and the FLAME call's optional pose inputs."""

import logging
import pickle
import shutil

import numpy as np
import pytest

from kaojax.flame import FlameAssetError, load_flame, read_flame_arrays, save_flame_npz

ARGS = (np.zeros((1, 100), np.float32), np.zeros((1, 50), np.float32),
        np.zeros((1, 6), np.float32))


def test_missing_masks_warn_once(synthetic_folder, tmp_path, caplog):
  for name in ("generic_model.pkl", "landmark_embedding.npz"):
    shutil.copy(synthetic_folder / name, tmp_path / name)
  with caplog.at_level(logging.WARNING):
    model = load_flame(tmp_path)
    load_flame(tmp_path)
  warnings = [r.getMessage() for r in caplog.records if "FLAME_masks" in r.getMessage()]
  assert len(warnings) == 1 and str(tmp_path) in warnings[0], warnings
  assert "every face" in warnings[0]
  assert bool(np.all(model.face_mask))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    load_flame(synthetic_folder)  # masks found next to the model: no warning
  assert not [r for r in caplog.records if "FLAME_masks" in r.getMessage()]


def _official(synthetic_folder):
  return pickle.loads((synthetic_folder / "generic_model.pkl").read_bytes())


def test_face_index_out_of_range(synthetic_folder, tmp_path):
  data = _official(synthetic_folder)
  data["f"] = data["f"].copy()
  data["f"][7, 1] = len(data["v_template"]) + 3
  (tmp_path / "bad.pkl").write_bytes(pickle.dumps(data, protocol=2))
  for masks in (synthetic_folder / "FLAME_masks.pkl", None):  # with masks: was an IndexError
    with pytest.raises(FlameAssetError, match=r"bad\.pkl: 'f' holds values that are not"):
      load_flame(tmp_path / "bad.pkl", landmarks=synthetic_folder / "landmark_embedding.npz",
                 masks=masks)


def test_mask_index_out_of_range(synthetic_folder, tmp_path):
  masks = pickle.loads((synthetic_folder / "FLAME_masks.pkl").read_bytes())
  masks["nose"] = np.append(masks["nose"], 10 ** 6)
  (tmp_path / "FLAME_masks.pkl").write_bytes(pickle.dumps(masks, protocol=2))
  with pytest.raises(FlameAssetError, match=r"FLAME_masks\.pkl: 'nose' holds values"):
    load_flame(synthetic_folder / "generic_model.pkl", masks=tmp_path / "FLAME_masks.pkl")
  masks["nose"] = "not indices"
  (tmp_path / "FLAME_masks.pkl").write_bytes(pickle.dumps(masks, protocol=2))
  with pytest.raises(FlameAssetError, match=r"FLAME_masks\.pkl: 'nose' has dtype"):
    load_flame(synthetic_folder / "generic_model.pkl", masks=tmp_path / "FLAME_masks.pkl")


def _bad_arrays(arrays):
  n_v, n_f = len(arrays["v_template"]), len(arrays["faces"])
  nan = arrays["v_template"].copy()
  nan[3, 1] = np.nan
  faces = arrays["faces"].copy()
  faces[0, 0] = n_v
  lmk = arrays["static_lmk_faces"].copy()
  lmk[0] = n_f
  return {
      "weights": (arrays["weights"][:, :4], r"'weights' has shape \[\d+, 4\], expected"),
      "posedirs": (arrays["posedirs"][:-1], r"'posedirs' has shape"),
      "v_template": (nan, r"'v_template' contains NaN"),
      "faces": (faces, r"'faces' holds values that are not indices"),
      "parents": (np.array([-1, 0, 1, 4, 1]), r"'parents' is not a kinematic tree"),
      "dynamic_lmk_faces": (arrays["dynamic_lmk_faces"][:, :16], r"'dynamic_lmk_faces' has"),
      "full_lmk_bary": (arrays["full_lmk_bary"].astype(str), r"'full_lmk_bary' has dtype"),
      "static_lmk_faces": (lmk, r"'static_lmk_faces' holds values"),
      "face_mask": (np.ones(n_f + 1, bool), r"'face_mask' has shape"),
  }


def test_kaojax_npz_layout_gets_the_same_checks(synthetic_folder, tmp_path):
  arrays = read_flame_arrays(synthetic_folder)
  save_flame_npz(arrays, tmp_path / "flame.npz")
  load_flame(tmp_path / "flame.npz")(*ARGS)  # the valid file loads
  for key, (value, message) in _bad_arrays(arrays).items():
    path = tmp_path / f"bad_{key}.npz"
    save_flame_npz({**arrays, key: value}, path)
    with pytest.raises(FlameAssetError, match=rf"bad_{key}\.npz: {message}"):
      load_flame(path)


def test_incomplete_landmark_set(synthetic_folder, tmp_path):
  lm = dict(np.load(synthetic_folder / "landmark_embedding.npz"))
  del lm["dynamic_lmk_bary_coords"]
  np.savez(tmp_path / "lm.npz", **lm)
  with pytest.raises(FlameAssetError, match=r"lm\.npz: missing \['dynamic_lmk_bary_coords'\]"):
    load_flame(synthetic_folder / "generic_model.pkl", landmarks=tmp_path / "lm.npz")


def test_neck_and_eye_pose_are_checked_like_the_other_inputs(synthetic_folder):
  model = load_flame(synthetic_folder)
  bad = np.zeros((1, 3), np.float32)
  bad[0, 1] = np.nan
  with pytest.raises(ValueError, match="'neck_pose' contains NaN"):
    model(*ARGS, neck_pose=bad)
  with pytest.raises(ValueError, match="'eye_pose' contains NaN"):
    model(*ARGS, eye_pose=np.full((1, 6), np.inf, np.float32))
  with pytest.raises(ValueError, match=r"'eye_pose' must have shape \[\.\.\., 6\]"):
    model(*ARGS, eye_pose=np.zeros((1, 3), np.float32))
  with pytest.raises(ValueError, match=r"'neck_pose' must have shape \[\.\.\., 3\]"):
    model(*ARGS, neck_pose=np.zeros((1, 6), np.float32))
  out = model(*ARGS, neck_pose=np.zeros((1, 3)), eye_pose=np.zeros((1, 6)))
  np.testing.assert_allclose(out.vertices, model(*ARGS).vertices)
