"""File layouts, the restricted unpickler, and errors for bad input."""

import pathlib
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse

from kaojax.flame import FlameAssetError, load_flame, load_flame_from_kaolrm_state
from kaojax.flame.io import read_flame_arrays

ARGS = (np.zeros((2, 100), np.float32), np.zeros((2, 50), np.float32),
        np.array([[0, 0.3, 0, 0.2, 0, 0], [0.1, -0.6, 0, 0, 0, 0]], np.float32))


@pytest.fixture(scope="module")
def reference(synthetic_folder):
  return load_flame(synthetic_folder / "generic_model.pkl")(*ARGS)


def _assert_same(out, ref):
  for name in ("vertices", "landmarks2d", "landmarks3d"):
    np.testing.assert_allclose(getattr(out, name), getattr(ref, name), atol=1e-7, err_msg=name)


def test_smplx_folder_layout(synthetic_folder, reference, tmp_path):
  # Only the smplx files: FLAME_NEUTRAL.pkl + RingNet static pkl + dynamic npy.
  for name in ("FLAME_NEUTRAL.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy"):
    (tmp_path / name).write_bytes((synthetic_folder / name).read_bytes())
  model = load_flame(tmp_path)
  out = model(*ARGS)
  np.testing.assert_allclose(out.vertices, reference.vertices, atol=1e-7)
  np.testing.assert_allclose(out.landmarks2d, reference.landmarks2d, atol=1e-7)
  # No 'full' set in RingNet files: the yaw-0 contour + static 51 stand in.
  np.testing.assert_allclose(out.landmarks3d[:, 17:], reference.landmarks3d[:, 17:], atol=1e-7)


def _fake_chumpy_module():
  ch = types.ModuleType("chumpy.ch")

  class Ch:  # same module/class name as chumpy's, pickles as chumpy.ch.Ch
    def __init__(self, x):
      self.x = x
      self._cache = {"junk": 1}

  Ch.__module__ = "chumpy.ch"
  Ch.__qualname__ = "Ch"
  ch.Ch = Ch
  return ch


def test_official_chumpy_pickle(synthetic_folder, reference, tmp_path, monkeypatch):
  """A 2017/2020-style file: chumpy arrays and a scipy sparse J_regressor."""
  data = pickle.loads((synthetic_folder / "generic_model.pkl").read_bytes())
  ch = _fake_chumpy_module()
  monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
  monkeypatch.setitem(sys.modules, "chumpy.ch", ch)
  for key in ("v_template", "shapedirs", "posedirs", "weights", "J"):
    data[key] = ch.Ch(data[key])
  data["J_regressor"] = scipy.sparse.csc_matrix(data["J_regressor"])
  (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps(data, protocol=2))
  monkeypatch.delitem(sys.modules, "chumpy.ch")  # loading must not need chumpy
  model = load_flame(tmp_path / "generic_model.pkl",
                     landmarks=synthetic_folder / "landmark_embedding.npz")
  _assert_same(model(*ARGS), reference)


def test_deca_npy_with_torch_tensors(synthetic_folder, reference, tmp_path):
  torch = pytest.importorskip("torch")
  lm = dict(np.load(synthetic_folder / "landmark_embedding.npz"))
  lm["dynamic_lmk_faces_idx"] = torch.from_numpy(lm["dynamic_lmk_faces_idx"])
  lm["dynamic_lmk_bary_coords"] = torch.from_numpy(lm["dynamic_lmk_bary_coords"])
  np.save(tmp_path / "landmark_embedding.npy", np.array(lm, dtype=object), allow_pickle=True)
  model = load_flame(synthetic_folder / "generic_model.pkl",
                     landmarks=tmp_path / "landmark_embedding.npy")
  _assert_same(model(*ARGS), reference)


def test_kaolrm_checkpoint_buffers(synthetic_folder, reference, tmp_path):
  from safetensors.numpy import save_file
  a = read_flame_arrays(synthetic_folder)
  n_v = len(a["v_template"])
  sd = np.concatenate([a["shapedirs"][..., :100], a["exprdirs"][..., :50]], -1)
  state = {
      "flame_model.v_template": a["v_template"], "flame_model.shapedirs": sd,
      "flame_model.posedirs": a["posedirs"].reshape(n_v * 3, 36).T.copy(),
      "flame_model.J_regressor": a["j_regressor"], "flame_model.lbs_weights": a["weights"],
      "flame_model.faces_tensor": a["faces"].astype(np.int64),
      "flame_model.parents": np.array([-1, 0, 1, 1, 1]),
      "flame_model.lmk_faces_idx": a["static_lmk_faces"].astype(np.int64),
      "flame_model.lmk_bary_coords": a["static_lmk_bary"].astype(np.float32),
      "flame_model.dynamic_lmk_faces_idx": a["dynamic_lmk_faces"].astype(np.int64),
      "flame_model.dynamic_lmk_bary_coords": a["dynamic_lmk_bary"],
      "flame_model.full_lmk_faces_idx": a["full_lmk_faces"][None].astype(np.int64),
      "flame_model.full_lmk_bary_coords": a["full_lmk_bary"][None],
      "flame_model.neck_kin_chain": np.array([1, 0]),
      "flame_model.eye_pose": np.zeros((1, 6), np.float32),
      "flame_model.neck_pose": np.zeros((1, 3), np.float32),
  }
  state = {k: np.ascontiguousarray(v) for k, v in state.items()}
  _assert_same(load_flame_from_kaolrm_state(state)(*ARGS), reference)
  save_file(state, str(tmp_path / "kaolrm.safetensors"))
  _assert_same(load_flame(tmp_path / "kaolrm.safetensors")(*ARGS), reference)
  del state["flame_model.lbs_weights"]
  with pytest.raises(FlameAssetError, match="lbs_weights"):
    load_flame_from_kaolrm_state(state)


def test_npz_roundtrip(synthetic_folder, reference, tmp_path):
  from kaojax.flame import save_flame_npz
  save_flame_npz(read_flame_arrays(synthetic_folder), tmp_path / "flame.npz")
  _assert_same(load_flame(tmp_path / "flame.npz")(*ARGS), reference)


class _Evil:
  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(_Evil.marker),))


def test_pickle_with_unexpected_class_is_refused(tmp_path):
  _Evil.marker = str(tmp_path / "pwned")
  (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps({"v_template": _Evil()}))
  with pytest.raises(FlameAssetError, match=r"generic_model\.pkl.*pathlib"):
    load_flame(tmp_path / "generic_model.pkl")
  assert not (tmp_path / "pwned").exists()


def test_missing_and_truncated_files(synthetic_folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pkl"):
    load_flame(tmp_path / "nope.pkl")
  with pytest.raises(FileNotFoundError, match="no FLAME model file"):
    load_flame(tmp_path)
  blob = (synthetic_folder / "generic_model.pkl").read_bytes()
  (tmp_path / "generic_model.pkl").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(FlameAssetError, match=r"generic_model\.pkl.*(truncated|corrupt)"):
    load_flame(tmp_path / "generic_model.pkl")
  (tmp_path / "lm.npz").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(FlameAssetError, match=r"lm\.npz"):
    load_flame(synthetic_folder / "generic_model.pkl", landmarks=tmp_path / "lm.npz")


def test_missing_landmarks_and_wrong_shapes(synthetic_folder, tmp_path):
  data = pickle.loads((synthetic_folder / "generic_model.pkl").read_bytes())
  (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps(data))
  with pytest.raises(FlameAssetError, match="no landmark embedding"):
    load_flame(tmp_path / "generic_model.pkl")
  data["weights"] = data["weights"][:, :4]
  (tmp_path / "bad.pkl").write_bytes(pickle.dumps(data))
  with pytest.raises(FlameAssetError, match=r"bad\.pkl: 'weights' has shape"):
    load_flame(tmp_path / "bad.pkl", landmarks=synthetic_folder / "landmark_embedding.npz")
  with pytest.raises(ValueError, match="n_shape=400"):
    load_flame(synthetic_folder, n_shape=400)


def test_bad_parameters(synthetic_folder):
  model = load_flame(synthetic_folder)
  shape, expr, pose = ARGS
  with pytest.raises(ValueError, match=r"'expression' must have shape \[\.\.\., 50\]"):
    model(shape, np.zeros((2, 100), np.float32), pose)
  with pytest.raises(ValueError, match=r"'pose' must have shape \[\.\.\., 6\]"):
    model(shape, expr, np.zeros((2, 15), np.float32))
  with pytest.raises(ValueError, match="'expression' has batch shape"):
    model(shape, expr[:1], pose)
  bad = shape.copy()
  bad[0, 3] = np.nan
  with pytest.raises(ValueError, match="'shape' contains NaN"):
    model(bad, expr, pose)
  with pytest.raises(ValueError, match="yaw_sign"):
    load_flame(synthetic_folder, yaw_sign="flipped")


def test_facial_region_rule():
  from kaojax.flame import facial_region_face_mask
  faces = np.array([[0, 1, 2], [1, 2, 3], [3, 4, 5], [5, 6, 7]])
  masks = {"face": [0, 1, 2, 3], "nose": [4], "right_ear": [5], "left_ear": [],
           "left_eyeball": [], "right_eyeball": [], "forehead": [3]}
  # face 0: all in 'face'; face 1: vertex 3 is forehead; face 2: 3 forehead;
  # face 3: 6, 7 in no region.
  np.testing.assert_array_equal(facial_region_face_mask(faces, masks, 8),
                                [True, False, False, False])
  masks["forehead"] = []
  np.testing.assert_array_equal(facial_region_face_mask(faces, masks, 8),
                                [True, True, True, False])
  del masks["nose"]
  with pytest.raises(FlameAssetError, match="nose"):
    facial_region_face_mask(faces, masks, 8)
