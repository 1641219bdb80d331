"""From FLAME files to a `FlameModel`: official pickles, npz, smplx-style folders,
KaoLRM checkpoints; landmark embeddings; region masks.

Internally every source is normalised to one dict of numpy arrays with these keys:
v_template [V,3], shapedirs [V,3,Ks], exprdirs [V,3,Ke], posedirs [V,3,36],
j_regressor [5,V], weights [V,5], faces [F,3], parents [5]; landmark arrays
static_lmk_faces [51], static_lmk_bary [51,3], dynamic_lmk_faces [79,17],
dynamic_lmk_bary [79,17,3], full_lmk_faces [68], full_lmk_bary [68,3]; and
optionally face_mask [F] bool.
"""

import logging
import pathlib
from typing import Mapping, Optional, Union

import numpy as np

from kaojax.flame import assets
from kaojax.flame.assets import FlameAssetError
from kaojax.flame.model import FlameModel, build_flame_model

log = logging.getLogger(__name__)

PathLike = Union[str, pathlib.Path]

# Official FLAME pickles store 300 identity then 100 expression components.
OFFICIAL_SHAPE_COMPONENTS = 300
MODEL_FILE_NAMES = ("FLAME_NEUTRAL.pkl", "generic_model.pkl", "flame2023.pkl",
                    "flame2023_no_jaw.pkl", "flame2020_neutral.pkl", "flame.npz")
LANDMARK_FILE_NAMES = ("landmark_embedding.npz", "landmark_embedding.npy",
                       "flame_static_embedding.pkl")
MASK_FILE_NAMES = ("FLAME_masks.pkl", "FLAME_masks.npz")
# KaoLRM's facial region: faces with all three vertices in these regions, minus
# the forehead (spec/kaolrm.md, "Renderers in the reference").
FACIAL_REGIONS = ("right_ear", "left_ear", "face", "left_eyeball", "right_eyeball", "nose")
FACIAL_EXCLUDED = ("forehead",)


def _require(data: Mapping, keys, source):
  missing = [k for k in keys if k not in data]
  if missing:
    raise FlameAssetError(f"{source}: missing {missing} (has {sorted(data)})")


def _expect_shape(source, key, arr, shape=None):
  """`arr` as a numeric numpy array of `shape` (None entries: any size; shape None: any
  shape) holding no NaN or infinity."""
  try:
    arr = np.asarray(arr)
  except (ValueError, TypeError) as e:
    raise FlameAssetError(f"{source}: '{key}' is not an array ({e})") from e
  ok = shape is None or (arr.ndim == len(shape)
                         and all(s is None or s == t for s, t in zip(shape, arr.shape)))
  if not ok:
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    raise FlameAssetError(f"{source}: '{key}' has shape {list(arr.shape)}, expected {want}")
  if arr.dtype.kind not in "biuf":
    raise FlameAssetError(f"{source}: '{key}' has dtype {arr.dtype}, expected numbers")
  if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
    raise FlameAssetError(f"{source}: '{key}' contains NaN or infinite values")
  return arr


def _expect_index(source, key, arr, upper, shape=None):
  """`arr` (see `_expect_shape`) as int64 indices in [0, upper)."""
  arr = _expect_shape(source, key, arr, shape)
  if arr.size and (arr.min() < 0 or arr.max() >= upper or np.any(arr != np.floor(arr))):
    raise FlameAssetError(f"{source}: '{key}' holds values that are not indices in "
                          f"[0, {upper})")
  return arr.astype(np.int64)


# The normalised model arrays and their shapes ('V': the number of vertices).
_MODEL_SHAPES = {
    "v_template": (None, 3), "shapedirs": ("V", 3, None), "exprdirs": ("V", 3, None),
    "posedirs": ("V", 3, 36), "j_regressor": (5, "V"), "weights": ("V", 5),
    "faces": (None, 3), "parents": (5,)}
_OFFICIAL_NAMES = {"j_regressor": "J_regressor", "faces": "f", "parents": "kintree_table"}
_KAOLRM_NAMES = {"v_template": "v_template", "shapedirs": "shapedirs", "exprdirs": "shapedirs",
                 "posedirs": "posedirs", "j_regressor": "J_regressor", "weights": "lbs_weights",
                 "faces": "faces_tensor", "parents": "parents"}


def check_model_arrays(arrays: Mapping, source: str, names: Optional[Mapping] = None) -> dict:
  """Checks the normalised model arrays (and `face_mask`, if present) of `arrays`:
  shapes, finite numbers, face indices within the vertices, a kinematic tree. `names`
  maps normalised keys to the file's own key names for messages. Returns those arrays
  (faces and parents as int64, face_mask as bool)."""
  name = lambda k: (names or {}).get(k, k)
  _require(arrays, list(_MODEL_SHAPES), source)
  n_v = len(_expect_shape(source, name("v_template"), arrays["v_template"], (None, 3)))
  out = {key: _expect_shape(source, name(key), arrays[key],
                            tuple(n_v if s == "V" else s for s in shape))
         for key, shape in _MODEL_SHAPES.items()}
  out["faces"] = _expect_index(source, name("faces"), out["faces"], n_v)
  parents = out["parents"].astype(np.int64)
  if (not np.array_equal(parents, out["parents"]) or parents[0] != -1
      or any(not 0 <= p < i for i, p in enumerate(parents[1:], 1))):
    raise FlameAssetError(f"{source}: '{name('parents')}' is not a kinematic tree "
                          f"(got parents {parents.tolist()})")
  out["parents"] = parents
  if "face_mask" in arrays:
    out["face_mask"] = _expect_shape(source, name("face_mask"), arrays["face_mask"],
                                     (len(out["faces"]),)).astype(bool)
  return out


def _parents_from_kintree(kintree):
  parents = np.asarray(kintree)[0].astype(np.int64)
  parents[0] = -1  # official files store uint32 -1 (4294967295)
  return parents


def model_arrays_from_official(data: Mapping, source: str) -> dict:
  """Official FLAME dict (v_template, f, shapedirs[V,3,400], posedirs, J_regressor,
  weights, kintree_table) -> normalised model arrays."""
  _require(data, ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                  "kintree_table"), source)
  sd = _expect_shape(source, "shapedirs", data["shapedirs"], (None, 3, None))
  if sd.shape[-1] <= OFFICIAL_SHAPE_COMPONENTS:
    raise FlameAssetError(f"{source}: 'shapedirs' has {sd.shape[-1]} components; official "
                          f"FLAME files have {OFFICIAL_SHAPE_COMPONENTS} identity + expression")
  return check_model_arrays({
      "v_template": data["v_template"],
      "shapedirs": sd[..., :OFFICIAL_SHAPE_COMPONENTS],
      "exprdirs": sd[..., OFFICIAL_SHAPE_COMPONENTS:],
      "posedirs": data["posedirs"], "j_regressor": data["J_regressor"],
      "weights": data["weights"], "faces": data["f"],
      "parents": _parents_from_kintree(_expect_shape(source, "kintree_table",
                                                     data["kintree_table"], (2, 5))),
  }, source, _OFFICIAL_NAMES)


_LANDMARK_SHAPES = {"static_lmk_faces": (51,), "static_lmk_bary": (51, 3),
                    "dynamic_lmk_faces": (79, 17), "dynamic_lmk_bary": (79, 17, 3),
                    "full_lmk_faces": (68,), "full_lmk_bary": (68, 3)}


def landmark_arrays(data: Mapping, source: str) -> dict:
  """Any supported landmark-embedding dict -> normalised landmark arrays.

  Accepts DECA names (static_lmk_faces_idx, static_lmk_bary_coords, dynamic_*,
  full_*), RingNet static names (lmk_face_idx, lmk_b_coords), and the normalised
  names. `full_*` is optional: without it the 'full' 68 are the yaw-0 contour plus
  the static 51 (an approximation, logged)."""
  if "static_lmk_faces_idx" in data:
    names = {"static_lmk_faces": "static_lmk_faces_idx",
             "static_lmk_bary": "static_lmk_bary_coords",
             "dynamic_lmk_faces": "dynamic_lmk_faces_idx",
             "dynamic_lmk_bary": "dynamic_lmk_bary_coords",
             "full_lmk_faces": "full_lmk_faces_idx", "full_lmk_bary": "full_lmk_bary_coords"}
  elif "lmk_face_idx" in data:
    names = {"static_lmk_faces": "lmk_face_idx", "static_lmk_bary": "lmk_b_coords"}
  elif "static_lmk_faces" in data:
    names = {k: k for k in ("static_lmk_faces", "static_lmk_bary", "dynamic_lmk_faces",
                            "dynamic_lmk_bary", "full_lmk_faces", "full_lmk_bary")}
  else:
    raise FlameAssetError(f"{source}: not a FLAME landmark embedding (keys {sorted(data)})")
  # Each set is optional but complete: faces and barycentrics together.
  names = {k: n for k, n in names.items() if k.startswith("static")
           or names[k.replace("_bary", "_faces")] in data}
  _require(data, list(names.values()), source)
  out = {}
  for key, name in names.items():
    arr = _expect_shape(source, name, data[name])
    if key.startswith("full") and arr.ndim > 1 and arr.shape[0] == 1:
      arr = arr[0]  # DECA stores the full set as [1, 68] and [1, 68, 3]
    out[key] = _expect_shape(source, name, arr, _LANDMARK_SHAPES[key])
  return out


def read_landmark_embedding(path: PathLike) -> dict:
  """Reads DECA `landmark_embedding.npy`/`.npz`, or RingNet
  `flame_static_embedding.pkl` together with `flame_dynamic_embedding.npy` from
  the same folder."""
  path = pathlib.Path(path)
  out = landmark_arrays(assets.load_any(path), str(path))
  if "dynamic_lmk_faces" not in out:
    dyn_path = path.with_name("flame_dynamic_embedding.npy")
    if not dyn_path.exists():
      raise FlameAssetError(f"{path}: has no dynamic contour embedding and {dyn_path} "
                            "does not exist")
    dyn = assets.load_npy(dyn_path)
    if not isinstance(dyn, dict) or "lmk_face_idx" not in dyn or "lmk_b_coords" not in dyn:
      raise FlameAssetError(f"{dyn_path}: expected a dict with 'lmk_face_idx', 'lmk_b_coords'")
    out["dynamic_lmk_faces"] = _expect_shape(dyn_path, "lmk_face_idx", dyn["lmk_face_idx"], (79, 17))
    out["dynamic_lmk_bary"] = _expect_shape(dyn_path, "lmk_b_coords", dyn["lmk_b_coords"],
                                            (79, 17, 3))
  return out


def read_masks(path: PathLike) -> dict:
  """FLAME_masks.pkl/.npz -> {region name: vertex indices}."""
  data = assets.load_any(path)
  return {k: _expect_index(path, k, v, assets.MAX_ELEMENTS).reshape(-1) for k, v in data.items()}


def facial_region_face_mask(faces, masks: Mapping, num_vertices: int,
                            source: str = "FLAME masks"):
  """KaoLRM's facial mask over faces [F, 3]: faces whose three vertices all lie in
  right_ear | left_ear | face | left_eyeball | right_eyeball | nose, and none in the
  forehead. Returns [F] bool. `source` names the masks in errors."""
  missing = [k for k in FACIAL_REGIONS + FACIAL_EXCLUDED if k not in masks]
  if missing:
    raise FlameAssetError(f"{source}: FLAME masks lack regions {missing}")
  keep = np.zeros(num_vertices, bool)
  for name in FACIAL_REGIONS + FACIAL_EXCLUDED:
    keep[_expect_index(source, name, masks[name], num_vertices)] = name in FACIAL_REGIONS
  return keep[_expect_index(source, "faces", faces, num_vertices, (None, 3))].all(-1)


def _finish_landmarks(arrays: dict, source: str) -> dict:
  if "dynamic_lmk_faces" not in arrays:
    raise FlameAssetError(f"{source}: no dynamic contour landmark embedding")
  if "full_lmk_faces" not in arrays:
    log.warning("%s: no 'full' 68-landmark set; using the yaw-0 contour + static 51", source)
    arrays["full_lmk_faces"] = np.concatenate([arrays["dynamic_lmk_faces"][0],
                                               arrays["static_lmk_faces"]])
    arrays["full_lmk_bary"] = np.concatenate([arrays["dynamic_lmk_bary"][0],
                                              arrays["static_lmk_bary"]])
  for key in ("static_lmk_faces", "dynamic_lmk_faces", "full_lmk_faces"):
    arrays[key] = _expect_index(source, key, arrays[key], len(arrays["faces"]))
  return arrays


def _find(folder: pathlib.Path, names):
  for name in names:
    if (folder / name).exists():
      return folder / name
  return None


def kaolrm_state_arrays(state: Mapping[str, np.ndarray], n_shape_stored: int = 100,
                        source: str = "KaoLRM checkpoint") -> dict:
  """The `flame_model.*` buffers of a KaoLRM state dict -> normalised arrays
  (model and landmarks). KaoLRM stores shapedirs [V,3,n_shape + n_expr] (100 + 50)
  and posedirs as [36, V*3]."""
  p = "flame_model."
  keys = set(_KAOLRM_NAMES.values()) | {
      "lmk_faces_idx", "lmk_bary_coords", "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords",
      "full_lmk_faces_idx", "full_lmk_bary_coords"}
  _require(state, sorted(p + k for k in keys), source)
  g = lambda k: state[p + k]
  n_v = len(_expect_shape(source, p + "v_template", g("v_template"), (None, 3)))
  sd = _expect_shape(source, p + "shapedirs", g("shapedirs"), (n_v, 3, None))
  posedirs = _expect_shape(source, p + "posedirs", g("posedirs"), (36, n_v * 3))
  arrays = check_model_arrays({
      "v_template": g("v_template"),
      "shapedirs": sd[..., :n_shape_stored],
      "exprdirs": sd[..., n_shape_stored:],
      "posedirs": posedirs.T.reshape(n_v, 3, 36),
      "j_regressor": g("J_regressor"), "weights": g("lbs_weights"),
      "faces": g("faces_tensor"), "parents": g("parents"),
  }, source, {k: p + n for k, n in _KAOLRM_NAMES.items()})
  arrays.update(landmark_arrays({
      "static_lmk_faces_idx": g("lmk_faces_idx"), "static_lmk_bary_coords": g("lmk_bary_coords"),
      "dynamic_lmk_faces_idx": g("dynamic_lmk_faces_idx"),
      "dynamic_lmk_bary_coords": g("dynamic_lmk_bary_coords"),
      "full_lmk_faces_idx": g("full_lmk_faces_idx"),
      "full_lmk_bary_coords": g("full_lmk_bary_coords")}, source))
  return arrays


def load_flame_from_kaolrm_state(state: Mapping[str, np.ndarray], n_shape: int = 100,
                                 n_expr: int = 50, masks: Optional[PathLike] = None,
                                 yaw_sign: str = "deca") -> FlameModel:
  """FlameModel from the `flame_model.*` buffers of a loaded KaoLRM state dict."""
  arrays = _finish_landmarks(kaolrm_state_arrays(state), "KaoLRM checkpoint")
  if masks is not None:
    arrays["face_mask"] = facial_region_face_mask(arrays["faces"], read_masks(masks),
                                                  len(arrays["v_template"]), str(masks))
  return build_flame_model(arrays, n_shape, n_expr, yaw_sign, "KaoLRM checkpoint")


def read_flame_arrays(path: PathLike, landmarks: Optional[PathLike] = None,
                      masks: Optional[PathLike] = None) -> dict:
  """Normalised arrays (model + landmarks + optional face mask) from a file or a
  folder. Landmark and mask files are looked up next to the model file when not
  given: landmark_embedding.npz/.npy, flame_static_embedding.pkl (+ dynamic .npy);
  FLAME_masks.pkl."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"FLAME model not found: {path}")
  if path.is_dir():
    model_path = _find(path, MODEL_FILE_NAMES)
    if model_path is None:
      raise FileNotFoundError(f"{path}: no FLAME model file (looked for {MODEL_FILE_NAMES})")
  else:
    model_path = path
  folder = model_path.parent

  data = assets.load_any(model_path)
  if any(k.startswith("flame_model.") for k in data):
    arrays = kaolrm_state_arrays(data, source=str(model_path))
  else:
    if "v_template" in data and "f" in data:
      arrays = model_arrays_from_official(data, str(model_path))
    elif "exprdirs" in data:  # an npz written by `save_flame_npz`
      arrays = check_model_arrays(data, str(model_path))
    else:
      raise FlameAssetError(f"{model_path}: not a FLAME model (keys {sorted(data)})")
    if "static_lmk_faces" in data or "static_lmk_faces_idx" in data:
      arrays.update(landmark_arrays(data, str(model_path)))

  if "static_lmk_faces" not in arrays:
    lmk_path = pathlib.Path(landmarks) if landmarks else _find(folder, LANDMARK_FILE_NAMES)
    if lmk_path is None:
      raise FlameAssetError(
          f"{model_path}: no landmark embedding given and none found in {folder} (looked for "
          f"{LANDMARK_FILE_NAMES}); pass landmarks=PATH")
    arrays.update(read_landmark_embedding(lmk_path))
  elif landmarks:
    arrays.update(read_landmark_embedding(landmarks))
  arrays = _finish_landmarks(arrays, str(model_path))

  mask_path = pathlib.Path(masks) if masks else _find(folder, MASK_FILE_NAMES)
  if mask_path is not None:
    arrays["face_mask"] = facial_region_face_mask(arrays["faces"], read_masks(mask_path),
                                                  len(arrays["v_template"]), str(mask_path))
  return arrays


def load_flame(path: PathLike, n_shape: int = 100, n_expr: int = 50,
               landmarks: Optional[PathLike] = None, masks: Optional[PathLike] = None,
               yaw_sign: str = "deca") -> FlameModel:
  """Loads a FLAME model.

  path: an official pickle (2017/2020/2023), an .npz (official keys or written by
  `save_flame_npz`), a KaoLRM `.safetensors` checkpoint (its `flame_model.*`), or a
  folder laid out as smplx expects (FLAME_NEUTRAL.pkl, flame_static_embedding.pkl,
  flame_dynamic_embedding.npy) or holding generic_model.pkl + landmark_embedding.npy.
  n_shape / n_expr: components used (up to 300 / 100 for official files).
  yaw_sign: 'deca' (DECA/KaoLRM, default) or 'smplx' contour convention.
  """
  arrays = read_flame_arrays(path, landmarks, masks)
  return build_flame_model(arrays, n_shape, n_expr, yaw_sign, str(path))


def save_flame_npz(arrays: Mapping[str, np.ndarray], path: PathLike) -> None:
  """Writes normalised arrays (see module docstring) as one self-contained .npz,
  readable by `load_flame` without pickles."""
  np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
