"""Loading FLAME assets without executing anything from the files.

Official FLAME pickles (2017/2020/2023) hold chumpy objects and scipy sparse
matrices and were written by Python 2. `SafeUnpickler` maps exactly those classes to
inert placeholders that are turned into numpy arrays afterwards; any other class
named in a pickle is refused with an error naming the file and the class.

Supported files:
* model: official `generic_model.pkl` / `FLAME_NEUTRAL.pkl` / `flame2023.pkl`, an
  `.npz` with the same keys, or the `flame_model.*` buffers of a KaoLRM checkpoint
  (`.safetensors`, or an already-loaded state dict);
* landmark embeddings: RingNet `flame_static_embedding.pkl` (+ optional
  `flame_dynamic_embedding.npy`), DECA's combined `landmark_embedding.npy` (whose
  dynamic arrays are pickled torch tensors), or an `.npz` with DECA's key names;
* masks: `FLAME_masks.pkl` (region name -> vertex indices).
"""

import collections
import io
import pathlib
import pickle
import zipfile

import numpy as np


class FlameAssetError(ValueError):
  """A FLAME asset file is missing, unreadable, or has the wrong content."""


# ----------------------------------------------------------------------------
# Restricted unpickling.


class _Inert:
  """Stand-in for a chumpy / scipy.sparse object: keeps only its pickled state."""
  kind = ""
  name = ""
  state = None

  def __init__(self, *args):
    self.args = args

  def __setstate__(self, state):
    self.state = state


_INERT_TYPES = {}


def _inert_class(kind, name):
  if (kind, name) not in _INERT_TYPES:
    _INERT_TYPES[kind, name] = type(name.rsplit(".", 1)[-1], (_Inert,),
                                    {"kind": kind, "name": name})
  return _INERT_TYPES[kind, name]


def _reconstructor(cls, base, state):
  # copy_reg._reconstructor(cls, object, None), as Python 2 pickles new-style objects.
  if not (isinstance(cls, type) and issubclass(cls, _Inert)):
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
  return cls.__new__(cls)


def _torch_rebuild_tensor(storage, offset, size, stride, *unused):
  flat = np.asarray(storage).reshape(-1)
  itemsize = flat.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


def _torch_storage_from_bytes(data):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise pickle.UnpicklingError(
        "this file stores torch tensors; install torch to read it, or re-save it as .npz"
    ) from e
  storage = torch.load(io.BytesIO(data), weights_only=True)
  return torch.tensor([], dtype=storage.dtype).set_(storage).numpy()


def _latin1_encode(text, encoding="latin1"):
  if encoding != "latin1" or not isinstance(text, str):
    raise pickle.UnpicklingError("unexpected _codecs.encode call")
  return text.encode("latin1")


_NUMPY_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class SafeUnpickler(pickle.Unpickler):
  """Unpickler that only builds numpy arrays, plain containers, and inert
  placeholders for chumpy / scipy.sparse objects (and torch tensors as numpy)."""

  def __init__(self, file, source: str):
    super().__init__(file, encoding="latin1")
    self.source = source

  def find_class(self, module, name):
    if (module, name) in _NUMPY_ALLOWED:
      return super().find_class(module, name)
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
      return _reconstructor
    if module in ("__builtin__", "builtins") and name == "object":
      return object
    if module == "_codecs" and name == "encode":  # bytes in protocol-2 pickles
      return _latin1_encode
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module.split(".")[0] == "chumpy":
      return _inert_class("chumpy", f"{module}.{name}")
    if module.startswith("scipy.sparse") and name in ("csc_matrix", "csr_matrix", "coo_matrix"):
      return _inert_class("sparse", name)
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _torch_rebuild_tensor
    if module == "torch.storage" and name == "_load_from_bytes":
      return _torch_storage_from_bytes
    raise pickle.UnpicklingError(
        f"{self.source}: refusing to load class {module}.{name} (only numpy arrays, "
        "chumpy and scipy.sparse data are allowed in FLAME files)")


def _to_array(obj, source, key):
  if isinstance(obj, _Inert):
    state = obj.state if isinstance(obj.state, dict) else {}
    if obj.kind == "chumpy":
      if "x" not in state:
        raise FlameAssetError(f"{source}: chumpy object under '{key}' has no value 'x'")
      return np.asarray(_to_array(state["x"], source, key))
    fmt = obj.name[:3]
    shape = tuple(state.get("_shape", state.get("shape", ())))
    if fmt == "coo":
      dense = np.zeros(shape, np.asarray(state["data"]).dtype)
      np.add.at(dense, (np.asarray(state["row"]), np.asarray(state["col"])), state["data"])
      return dense
    data, indices, indptr = (np.asarray(state[k]) for k in ("data", "indices", "indptr"))
    major = shape[1] if fmt == "csc" else shape[0]
    dense = np.zeros(shape, data.dtype)
    for j in range(major):
      sl = slice(indptr[j], indptr[j + 1])
      if fmt == "csc":
        dense[indices[sl], j] = data[sl]
      else:
        dense[j, indices[sl]] = data[sl]
    return dense
  return obj


def _check_exists(path):
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"FLAME asset not found: {path}")
  return path


def load_pickle(path):
  """Loads a pickle safely (see `SafeUnpickler`); chumpy/sparse values -> arrays."""
  path = _check_exists(path)
  try:
    with open(path, "rb") as f:
      obj = SafeUnpickler(f, str(path)).load()
  except pickle.UnpicklingError as e:
    raise FlameAssetError(str(e) if str(path) in str(e) else f"{path}: {e}") from e
  except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
    raise FlameAssetError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
  if isinstance(obj, dict):
    return {k: _to_array(v, path, k) for k, v in obj.items()}
  return _to_array(obj, path, "")


def load_npy(path):
  """Loads an .npy file; object arrays (pickled dicts) go through `SafeUnpickler`."""
  path = _check_exists(path)
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      _, _, dtype = read_header(f, max_header_size=1 << 20)
      if dtype.hasobject:
        obj = SafeUnpickler(f, str(path)).load()
        if isinstance(obj, np.ndarray) and obj.shape == ():
          obj = obj.item()
        if isinstance(obj, dict):
          return {k: _to_array(v, path, k) for k, v in obj.items()}
        return obj
    return np.load(path, allow_pickle=False)
  except pickle.UnpicklingError as e:
    raise FlameAssetError(str(e) if str(path) in str(e) else f"{path}: {e}") from e
  except (EOFError, ValueError, TypeError) as e:
    raise FlameAssetError(f"{path}: truncated or corrupt .npy ({e})") from e


def load_npz(path):
  """Loads an .npz of plain arrays (object arrays are refused)."""
  path = _check_exists(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
    raise FlameAssetError(f"{path}: truncated or corrupt .npz ({e})") from e


def load_safetensors(path):
  """Loads every tensor of a .safetensors file as numpy."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  path = _check_exists(path)
  try:
    return st_numpy.load_file(str(path))
  except Exception as e:  # safetensors raises its own error types
    raise FlameAssetError(f"{path}: unreadable safetensors file ({e})") from e


def load_any(path):
  """Dict of arrays from a .pkl, .npy (dict), .npz or .safetensors file."""
  path = _check_exists(path)
  suffix = path.suffix.lower()
  loaders = {".pkl": load_pickle, ".npy": load_npy, ".npz": load_npz,
             ".safetensors": load_safetensors}
  if suffix not in loaders:
    raise FlameAssetError(f"{path}: unsupported file type '{suffix}'")
  data = loaders[suffix](path)
  if not isinstance(data, dict):
    raise FlameAssetError(f"{path}: expected a dictionary of arrays, got {type(data).__name__}")
  return data
