"""Released checkpoint key lists (../shared/spec/checkpoint_keys) as test state dicts."""

import pathlib
import re

import numpy as np

KEYS = pathlib.Path(__file__).resolve().parents[3] / "shared" / "spec" / "checkpoint_keys"


def read_key_list(name):
  """[(key, shape, dtype)] from a checkpoint_keys/*.txt file."""
  rows = []
  for line in (KEYS / name).read_text().splitlines():
    if not line.strip():
      continue
    parts = line.split("\t")
    shape = tuple(int(x) for x in re.findall(r"\d+", parts[1]))
    dtype = parts[2].replace("torch.", "") if len(parts) > 2 else "float32"
    rows.append((parts[0], shape, dtype))
  return rows


def constant_state(rows):
  """Every float tensor filled with its own exactly representable constant
  (index + 1) / 4096, as a broadcast view (no memory); returns (state, fills)."""
  state, fills = {}, {}
  for i, (key, shape, dtype) in enumerate(rows):
    value = np.float32((i + 1) / 4096)
    state[key] = np.broadcast_to(value, shape)
    fills[key] = float(value)
  return state, fills


def fake_flame_buffers(rows, seed=0):
  """Plausible `flame_model.*` buffers with the listed shapes."""
  rng = np.random.default_rng(seed)
  shapes = {k[len("flame_model."):]: s for k, s, _ in rows if k.startswith("flame_model.")}
  n_v, n_f = shapes["v_template"][0], shapes["faces_tensor"][0]

  def bary(shape):
    b = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    return b / b.sum(-1, keepdims=True)

  weights = np.zeros(shapes["lbs_weights"], np.float32)
  weights[:, 0] = 1.0
  out = {
      "v_template": rng.normal(0, 0.1, shapes["v_template"]).astype(np.float32),
      "shapedirs": rng.normal(0, 1e-3, shapes["shapedirs"]).astype(np.float32),
      "posedirs": np.zeros(shapes["posedirs"], np.float32),
      "J_regressor": np.full(shapes["J_regressor"], 1.0 / n_v, np.float32),
      "parents": np.array([-1, 0, 1, 1, 1], np.int64),
      "lbs_weights": weights,
      "faces_tensor": rng.integers(0, n_v, shapes["faces_tensor"]).astype(np.int64),
      "lmk_faces_idx": rng.integers(0, n_f, shapes["lmk_faces_idx"]).astype(np.int64),
      "lmk_bary_coords": bary(shapes["lmk_bary_coords"]),
      "dynamic_lmk_faces_idx": rng.integers(0, n_f, shapes["dynamic_lmk_faces_idx"]).astype(np.int64),
      "dynamic_lmk_bary_coords": bary(shapes["dynamic_lmk_bary_coords"]),
      "full_lmk_faces_idx": rng.integers(0, n_f, shapes["full_lmk_faces_idx"]).astype(np.int64),
      "full_lmk_bary_coords": bary(shapes["full_lmk_bary_coords"]),
      "neck_kin_chain": np.array([1, 0], np.int64),
      "eye_pose": np.zeros(shapes["eye_pose"], np.float32),
      "neck_pose": np.zeros(shapes["neck_pose"], np.float32),
  }
  assert set(out) == set(shapes)
  return {"flame_model." + k: v for k, v in out.items()}
