"""Crafted FLAME pickles: every array the restricted unpickler rebuilds is checked
before memory is touched; crafted files are refused naming the file and the key."""

import collections
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse

from kaojax.flame import FlameAssetError, load_flame
from kaojax.flame.assets import load_pickle


def _rebuild(*args):
  """Pickled under its own name, which `_as_torch` rewrites to torch's."""


def _as_torch(blob):
  """A protocol-2 pickle calling `_rebuild` -> one calling torch's _rebuild_tensor_v2
  (torch itself is not needed to write or read it)."""
  return blob.replace(f"{_rebuild.__module__}\n_rebuild\n".encode(),
                      b"torch._utils\n_rebuild_tensor_v2\n")


class _Tensor:
  """Pickles as _rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return _rebuild, self.args


def _write_tensor_pickle(path, storage, offset, size, stride):
  path.write_bytes(_as_torch(pickle.dumps(
      {"v_template": _Tensor(storage, offset, size, stride)}, protocol=2)))
  return path


FLOATS = np.arange(4, dtype=np.float32)
# (storage, offset, size, stride) views that reach outside their 4-float storage.
OUT_OF_BOUNDS = {
    "heap_read": (FLOATS, 0, (100, 3), (3, 1)),   # used to load values from the heap
    "offset_past_end": (FLOATS, 2, (4,), (1,)),
    "offset_at_end": (FLOATS, 4, (1,), (1,)),
    "last_row": (FLOATS, 0, (2, 2), (3, 1)),      # 3 + 1 = element 4: one past the end
    "huge_stride": (FLOATS, 0, (2, 2), (1 << 30, 1)),  # used to segfault
    "huge_offset": (FLOATS, 1 << 40, (1,), (1,)),
    "negative_stride": (FLOATS, 0, (4,), (-1 << 20,)),
    "negative_offset": (FLOATS, -1 << 20, (4,), (1,)),
    "negative_size": (FLOATS, 0, (-4,), (1,)),
    "stride_rank": (FLOATS, 0, (2, 2), (1,)),
    "huge_broadcast": (FLOATS, 0, (1 << 50,), (0,)),
    "object_storage": (np.array([None] * 4, object), 0, (4,), (1 << 20,)),
}


def test_out_of_bounds_tensor_views_are_refused_without_crashing(tmp_path):
  """Runs in a subprocess: before the fix some of these read far outside the heap."""
  paths = {name: str(_write_tensor_pickle(tmp_path / f"{name}.pkl", *args))
           for name, args in OUT_OF_BOUNDS.items()}
  # A memo index so large that the unpickler's memo array could not be allocated.
  (tmp_path / "memo.pkl").write_bytes(b"\x80\x02}p1099511627776\n.")
  paths["memo_index"] = str(tmp_path / "memo.pkl")
  script = """if True:
    import json, sys
    from kaojax.flame import FlameAssetError, load_flame
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
      print("case", name, file=sys.stderr, flush=True)
      try:
        load_flame(path)
        out[name] = "loaded"
      except FlameAssetError as e:
        out[name] = "refused: " + str(e)
      except BaseException as e:
        out[name] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))"""
  proc = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, f"crashed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
  out = json.loads(proc.stdout.splitlines()[-1])
  for name, path in paths.items():
    key = "" if name == "memo_index" else "'v_template'"
    assert out[name].startswith(f"refused: {path}: {key}"), (name, out[name])
  assert "reaches element 299 of a storage of 4" in out["heap_read"]
  assert "more than" in out["huge_broadcast"]


def test_in_bounds_tensor_views_load(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  for offset, size, stride in ((0, (4, 3), (3, 1)), (1, (3, 2), (1, 3)), (11, (1,), (1,)),
                               (2, (2, 3), (0, 2)), (5, (0, 7), (100, 100))):
    got = load_pickle(_write_tensor_pickle(tmp_path / "t.pkl", storage, offset, size, stride))
    want = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(4 * s for s in stride))
    np.testing.assert_array_equal(got["v_template"], want)


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's own reconstructors
_SCALAR = np.float64(1).__reduce__()[0]


class _Reduce:
  def __init__(self, *reduced):
    self.reduced = reduced

  def __reduce__(self):
    return self.reduced


def _sparse_with(fmt, **fields):
  m = getattr(scipy.sparse, f"{fmt}_matrix")(np.eye(4, 5, dtype=np.float32))
  m.__dict__.update(fields)
  return m


@pytest.mark.parametrize("value,message", [
    (np.zeros(3, [("a", "f4"), ("b", "i4")]), "unsupported dtype"),
    (np.array([np.datetime64("2020-01-01")]), "unsupported dtype"),
    (_Reduce(np.ndarray, ((1000,), np.dtype(np.float32), bytes(16))), "not callable"),
    (_Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b"),
             (1, (1000,), np.dtype(np.float32), False, bytes(16))), "needs 4000 bytes"),
    (_Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b"),
             (1, (-4,), np.dtype(np.float32), False, bytes(4))), "invalid array shape"),
    (_Reduce(_SCALAR, (np.dtype(np.float64), b"abc")), "needs 8 bytes"),
    (_sparse_with("csc", indices=np.array([0, 1, 2, 99], np.int32)), "'indices' must be"),
    (_sparse_with("csr", indptr=np.array([0, 1, 9, 3, 4], np.int32)), "'indptr' must be"),
    (_sparse_with("csr", indptr=np.array([0, 2, 1, 3, 4], np.int32)), "not a partition"),
    (_sparse_with("coo", coords=(np.array([0, 1, 2, -1]), np.arange(4))), "'row' must be"),
    (_sparse_with("csc", _shape=(1 << 20, 1 << 20)), "more than"),
])
def test_other_reconstructors_are_checked(tmp_path, value, message):
  path = tmp_path / "generic_model.pkl"
  path.write_bytes(pickle.dumps({"J_regressor": value}, protocol=2))
  with pytest.raises(FlameAssetError, match=rf"generic_model\.pkl: .*{message}") as err:
    load_pickle(path)
  if "callable" not in message:
    assert "'J_regressor'" in str(err.value)


def test_valid_sparse_scalar_and_object_arrays_load(tmp_path):
  dense = np.arange(20, dtype=np.float32).reshape(4, 5) % 3
  data = {"empty": np.zeros((0, 3)), "csc": scipy.sparse.csc_matrix(dense),
          "csr": scipy.sparse.csr_matrix(dense),
          "coo": scipy.sparse.coo_matrix(dense), "scalar": np.float64(2.5),
          "objects": np.array([{"x": np.ones(2)}, None], object),
          "text": np.array(["ab", "c"]), "fortran": np.asfortranarray(dense),
          "big_endian": dense.astype(">f8")}
  (tmp_path / "a.pkl").write_bytes(pickle.dumps(data, protocol=2))
  got = load_pickle(tmp_path / "a.pkl")
  assert got["empty"].shape == (0, 3)
  for key in ("csc", "csr", "coo"):
    np.testing.assert_array_equal(got[key], dense)
  assert got["scalar"] == 2.5 and got["objects"][1] is None
  np.testing.assert_array_equal(got["objects"][0]["x"], np.ones(2))
  np.testing.assert_array_equal(got["text"], data["text"])
  np.testing.assert_array_equal(got["fortran"], dense)
  np.testing.assert_array_equal(got["big_endian"], dense)


def test_protocol_5_pickles_load(synthetic_folder, tmp_path):
  (tmp_path / "a.pkl").write_bytes(pickle.dumps(np.arange(4.), protocol=5))
  np.testing.assert_array_equal(load_pickle(tmp_path / "a.pkl"), np.arange(4.))
  fortran = np.asfortranarray(np.arange(6.).reshape(2, 3))
  (tmp_path / "f.pkl").write_bytes(pickle.dumps({"f": fortran}, protocol=5))
  np.testing.assert_array_equal(load_pickle(tmp_path / "f.pkl")["f"], fortran)

  data = pickle.loads((synthetic_folder / "generic_model.pkl").read_bytes())
  (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps(data, protocol=5))
  args = (np.zeros((1, 100)), np.zeros((1, 50)), np.full((1, 6), 0.1))
  out = load_flame(tmp_path / "generic_model.pkl",
                   landmarks=synthetic_folder / "landmark_embedding.npz")(*args)
  ref = load_flame(synthetic_folder / "generic_model.pkl")(*args)
  np.testing.assert_array_equal(out.vertices, ref.vertices)


def test_text_file_is_not_a_pickle(tmp_path):
  path = tmp_path / "generic_model.pkl"
  path.write_text("hello, this is a README\n")
  with pytest.raises(FlameAssetError, match=r"generic_model\.pkl: not a pickle"):
    load_flame(path)
  path.write_bytes(b"")
  with pytest.raises(FlameAssetError, match=r"generic_model\.pkl: not a pickle"):
    load_flame(path)
