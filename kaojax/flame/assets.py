"""Loading FLAME assets without executing anything from the files.

Official FLAME pickles (2017/2020/2023) hold chumpy objects and scipy sparse
matrices and were written by Python 2. `SafeUnpickler` maps exactly those classes,
and numpy's / torch's array reconstructors, to inert placeholders; any other class
named in a pickle is refused with an error naming the file and the class. After
loading, `_Resolver` turns the placeholders into numpy arrays, checking each one
(known dtype, non-negative sizes, data that covers the array exactly, views that stay
inside their storage, a sane total size) before any memory is touched: a crafted
file gets a `FlameAssetError` naming the file and the key, never an out-of-bounds
read.

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
import math
import pathlib
import pickle
import pickletools
import re
import zipfile

import numpy as np


class FlameAssetError(ValueError):
  """A FLAME asset file is missing, unreadable, or has the wrong content."""


# Most elements one array of a FLAME file may hold (official models: ~6e6, 5023 x 3 x 400).
MAX_ELEMENTS = 1 << 28
_MAX_DIMS = 32
# dtypes an array in a FLAME file may have: bool, numbers, bytes / unicode, objects.
_DTYPE_RE = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|O[48]?|[SU]\d*)")


# ----------------------------------------------------------------------------
# Restricted unpickling: placeholders.


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


class _Deferred:
  """Stand-in for a numpy / torch object: the reconstructor's `kind`, its arguments and
  (numpy.dtype, ndarray) the state pickle gives it; built by `_Resolver`."""

  def __init__(self, kind, args):
    self.kind = kind
    self.args = args
    self.state = None

  def __setstate__(self, state):
    if self.kind not in ("dtype", "ndarray"):
      raise pickle.UnpicklingError(f"unexpected state for a {self.kind}")
    self.state = state


def _deferred(kind):
  # A function, not a class: NEWOBJ cannot build a placeholder without its arguments.
  return lambda *args: _Deferred(kind, args)


def _reconstructor(cls, base, state):
  # copy_reg._reconstructor(cls, object, None), as Python 2 pickles new-style objects.
  if not (isinstance(cls, type) and issubclass(cls, _Inert)):
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
  return cls.__new__(cls)


def _torch_storage_from_bytes(data):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise pickle.UnpicklingError(
        "this file stores torch tensors; install torch to read it, or re-save it as .npz"
    ) from e
  if not isinstance(data, bytes):
    raise pickle.UnpicklingError("torch storage data is not bytes")
  try:
    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
      raise TypeError(f"got a {type(storage).__name__}")
    return torch.tensor([], dtype=storage.dtype).set_(storage).numpy()
  except Exception as e:  # torch raises many types for bad data
    raise pickle.UnpicklingError(f"unreadable torch storage ({type(e).__name__}: {e})") from e


def _empty_bytes(*args):
  # bytes(): how Python 3 writes b'' at protocol 2 (bytes(n) would allocate n bytes).
  if args:
    raise pickle.UnpicklingError("unexpected bytes() call")
  return b""


def _latin1_encode(text, encoding="latin1"):
  if encoding != "latin1" or not isinstance(text, str):
    raise pickle.UnpicklingError("unexpected _codecs.encode call")
  return text.encode("latin1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric", "numpy")
_NUMPY_ALLOWED = {"_reconstruct": "ndarray", "scalar": "scalar", "_frombuffer": "frombuffer",
                  "dtype": "dtype"}


class SafeUnpickler(pickle.Unpickler):
  """Unpickler that only builds plain containers and placeholders for numpy arrays,
  torch tensors, chumpy and scipy.sparse objects (see `resolve`)."""

  def __init__(self, file, source: str):
    super().__init__(file, encoding="latin1")
    self.source = source

  def find_class(self, module, name):
    if module in _NUMPY_MODULES and name in _NUMPY_ALLOWED:
      return _deferred(_NUMPY_ALLOWED[name])
    if module == "numpy" and name == "ndarray":  # only an argument of _reconstruct
      return "numpy.ndarray"
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
      return _reconstructor
    if module in ("__builtin__", "builtins") and name == "object":
      return object
    if module == "_codecs" and name == "encode":  # bytes in protocol-2 pickles
      return _latin1_encode
    if module in ("__builtin__", "builtins") and name == "bytes":
      return _empty_bytes
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module.split(".")[0] == "chumpy":
      return _inert_class("chumpy", f"{module}.{name}")
    if module.startswith("scipy.sparse") and name in ("csc_matrix", "csr_matrix", "coo_matrix"):
      return _inert_class("sparse", name)
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _deferred("tensor")
    if module == "torch.storage" and name == "_load_from_bytes":
      return _torch_storage_from_bytes
    raise pickle.UnpicklingError(
        f"{self.source}: refusing to load class {module}.{name} (only numpy arrays, "
        "chumpy and scipy.sparse data are allowed in FLAME files)")


# ----------------------------------------------------------------------------
# Restricted unpickling: placeholders -> checked numpy arrays.


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


class _Resolver:
  """Replaces the placeholders in an unpickled object by numpy arrays, checking every
  one; errors name `source` and the key path."""

  def __init__(self, source):
    self.source = source
    self.done = {}  # id -> (placeholder, result): shared objects are built once
    self.active = set()

  def fail(self, key, message):
    return FlameAssetError(f"{self.source}: '{key}': {message}")

  def __call__(self, obj, key):
    if obj is None or isinstance(obj, (str, bytes, bytearray, int, float, np.ndarray)):
      return obj
    if id(obj) in self.done:
      return self.done[id(obj)][1]
    if id(obj) in self.active:
      raise self.fail(key, "contains itself")
    self.active.add(id(obj))
    try:
      result = self._build(obj, key)
    finally:
      self.active.discard(id(obj))
    self.done[id(obj)] = (obj, result)
    return result

  def _build(self, obj, key):
    if isinstance(obj, dict):
      if any(isinstance(k, (_Deferred, _Inert)) for k in obj):
        raise self.fail(key, "dictionary keyed by an array")
      return {k: self(v, f"{key}/{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
      items = [self(v, f"{key}[{i}]") for i, v in enumerate(obj)]
      return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, _Inert):
      return self._chumpy(obj, key) if obj.kind == "chumpy" else self._sparse(obj, key)
    if isinstance(obj, _Deferred):
      return getattr(self, "_" + obj.kind)(obj, key)
    return obj

  # Checks shared by the numpy / torch reconstructors.

  def _ints(self, values, key, what):
    values = tuple(values) if isinstance(values, list) else values
    if not (isinstance(values, tuple) and len(values) <= _MAX_DIMS
            and all(_is_int(n) and n >= 0 for n in values)):
      raise self.fail(key, f"invalid array {what} {values!r}")
    return values

  def _shape(self, shape, key):
    shape = self._ints(shape, key, "shape")
    if math.prod(shape) > MAX_ELEMENTS:
      raise self.fail(key, f"array shape {shape} holds more than {MAX_ELEMENTS} elements")
    return shape

  def _dtype(self, obj, key):
    if not (isinstance(obj, _Deferred) and obj.kind == "dtype" and obj.args
            and isinstance(obj.args[0], str) and _DTYPE_RE.fullmatch(obj.args[0])):
      raise self.fail(key, f"unsupported dtype {getattr(obj, 'args', obj)!r}")
    dtype = np.dtype(obj.args[0])
    state = obj.state
    if state is None:
      return dtype
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
            and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
            and _is_int(state[5])):
      raise self.fail(key, f"unsupported dtype state {state!r}")
    if dtype.kind in "SU":
      chars = state[5] // (4 if dtype.kind == "U" else 1)
      if not 0 <= chars <= 1 << 20:
        raise self.fail(key, f"invalid string length in dtype state {state!r}")
      dtype = np.dtype(f"{dtype.kind}{chars}")
    return dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype

  def _raw(self, data, key):
    if isinstance(data, str):  # Python 2 byte strings read with encoding='latin1'
      try:
        return data.encode("latin1")
      except UnicodeEncodeError:
        raise self.fail(key, "array data is not a byte string") from None
    if not isinstance(data, (bytes, bytearray)):
      raise self.fail(key, f"array data is a {type(data).__name__}, not bytes")
    return bytes(data)

  def _from_bytes(self, data, dtype, shape, order, key):
    if dtype.hasobject:
      raise self.fail(key, "object array stored as raw bytes")
    data = self._raw(data, key)
    want = math.prod(shape) * dtype.itemsize
    if len(data) != want:
      raise self.fail(key, f"array {shape} of {dtype} needs {want} bytes of data, "
                      f"the file holds {len(data)}")
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy()

  # The reconstructors.

  def _ndarray(self, obj, key):
    # numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') + BUILD (version, shape,
    # dtype, is_fortran, data); version is absent in old pickles.
    state = obj.state
    if isinstance(state, tuple) and len(state) == 5:
      state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4):
      raise self.fail(key, "array without a valid state")
    shape, dtype, fortran, data = state
    if not isinstance(fortran, int):
      raise self.fail(key, "array with an invalid memory order")
    shape = self._shape(shape, key)
    dtype = self._dtype(dtype, key)
    order = "F" if fortran else "C"
    if not dtype.hasobject:
      return self._from_bytes(data, dtype, shape, order, key)
    if not (isinstance(data, list) and len(data) == math.prod(shape)):
      raise self.fail(key, f"object array {shape} needs a list of {math.prod(shape)} items")
    array = np.empty(len(data), object)
    array[:] = [self(v, f"{key}[{i}]") for i, v in enumerate(data)]
    return array.reshape(shape, order=order)

  def _frombuffer(self, obj, key):
    # numpy.core.numeric._frombuffer(buffer, dtype, shape, order): protocol-5 pickles.
    if len(obj.args) != 4 or obj.args[3] not in ("C", "F"):
      raise self.fail(key, "invalid _frombuffer call")
    data, dtype, shape, order = obj.args
    return self._from_bytes(data, self._dtype(dtype, key), self._shape(shape, key), order, key)

  def _scalar(self, obj, key):
    # numpy.core.multiarray.scalar(dtype, data)
    if len(obj.args) != 2:
      raise self.fail(key, "invalid numpy scalar")
    dtype = self._dtype(obj.args[0], key)
    if dtype.hasobject:
      return self(obj.args[1], key)
    return self._from_bytes(obj.args[1], dtype, (), "C", key)[()]

  def _tensor(self, obj, key):
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...): a strided view
    # of a flat storage, gathered by index so that nothing outside it is ever read.
    if len(obj.args) < 4:
      raise self.fail(key, "invalid torch tensor")
    storage, offset, size, stride = obj.args[:4]
    storage = self(storage, key)
    if not (isinstance(storage, np.ndarray) and not storage.dtype.hasobject):
      raise self.fail(key, "torch tensor without a numeric storage")
    flat = storage.reshape(-1)
    size = self._shape(size, key)
    stride = self._ints(stride, key, "strides")
    if not (_is_int(offset) and offset >= 0 and len(stride) == len(size)):
      raise self.fail(key, f"invalid torch tensor offset {offset!r} or strides {stride}")
    if math.prod(size) == 0:
      return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(flat):
      raise self.fail(key, f"torch tensor of size {size}, stride {stride} and offset "
                      f"{offset} reaches element {last} of a storage of {len(flat)}")
    index = np.array(offset, np.int64)
    for n, s in zip(size, stride):
      index = index[..., None] + np.arange(n, dtype=np.int64) * s
    return flat[index]

  def _chumpy(self, obj, key):
    state = obj.state if isinstance(obj.state, dict) else {}
    if "x" not in state:
      raise self.fail(key, "chumpy object has no value 'x'")
    return np.asarray(self(state["x"], key))

  def _sparse_index(self, state, name, key, length, upper):
    index = np.asarray(self(state.get(name), f"{key}/{name}"))
    if not (index.dtype.kind in "iu" and index.shape == (length,)
            and (length == 0 or (index.min() >= 0 and index.max() < upper))):
      raise self.fail(key, f"sparse matrix '{name}' must be {length} integers in [0, {upper})")
    return index.astype(np.int64)

  def _sparse(self, obj, key):
    state = obj.state if isinstance(obj.state, dict) else {}
    shape = self(state.get("_shape", state.get("shape")), key)
    if not (isinstance(shape, tuple) and len(shape) == 2):
      raise self.fail(key, f"sparse matrix with invalid shape {shape!r}")
    shape = self._shape(shape, key)
    data = np.asarray(self(state.get("data"), f"{key}/data"))
    if data.ndim != 1 or data.dtype.kind not in "biufc":
      raise self.fail(key, "sparse matrix without numeric 'data'")
    n = len(data)
    fmt = obj.name[:3]
    if fmt == "coo":
      if "coords" in state:
        state = dict(zip(("row", "col"), self(state["coords"], key)))
      rows = self._sparse_index(state, "row", key, n, shape[0])
      cols = self._sparse_index(state, "col", key, n, shape[1])
    else:
      major, minor = (shape[1], shape[0]) if fmt == "csc" else shape
      indptr = self._sparse_index(state, "indptr", key, major + 1, n + 1)
      if indptr[0] != 0 or indptr[-1] != n or np.any(np.diff(indptr) < 0):
        raise self.fail(key, f"sparse matrix 'indptr' is not a partition of {n} entries")
      minors = self._sparse_index(state, "indices", key, n, minor)
      majors = np.repeat(np.arange(major), np.diff(indptr))
      rows, cols = (minors, majors) if fmt == "csc" else (majors, minors)
    dense = np.zeros(shape, data.dtype)
    np.add.at(dense, (rows, cols), data)  # duplicates add up, as in scipy's toarray()
    return dense


def resolve(obj, source, key=""):
  """An unpickled object with every placeholder replaced by a checked numpy array."""
  return _Resolver(str(source))(obj, key)


# ----------------------------------------------------------------------------
# Reading files.


def _check_exists(path):
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"FLAME asset not found: {path}")
  return path


def _check_opcodes(data: bytes):
  """Walks the opcodes before unpickling: a length beyond the end of the data or a huge
  memo index is refused here, before the unpickler allocates that much memory (the
  memo is an array as long as its largest index)."""
  for opcode, arg, pos in pickletools.genops(data):
    if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= len(data):
      raise pickle.UnpicklingError(f"memo index {arg} at byte {pos}")


def _unpickle(data: bytes, source, what="pickle"):
  """Safely unpickles `data` (the bytes of `source`) and resolves its placeholders."""
  try:
    _check_opcodes(data)
    obj = SafeUnpickler(io.BytesIO(data), str(source)).load()
    return resolve(obj, source)
  except FlameAssetError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any failure = a bad file)
    text = f"{type(e).__name__}: {e}"
    if str(source) in text:
      raise FlameAssetError(str(e)) from e
    if not data.startswith(b"\x80"):
      raise FlameAssetError(f"{source}: not a pickle (no pickle protocol header; {text})") from e
    raise FlameAssetError(f"{source}: truncated or corrupt {what} ({text})") from e


def load_pickle(path):
  """Loads a pickle safely (see `SafeUnpickler`); arrays, chumpy and sparse values
  become numpy arrays."""
  path = _check_exists(path)
  return _unpickle(path.read_bytes(), path)


def _read_npy(f, size, source, key="array"):
  """One .npy stream of `size` bytes: a checked header, then exactly the data it
  promises (object arrays through `SafeUnpickler`)."""
  try:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f, max_header_size=1 << 20)
  except Exception as e:  # pylint: disable=broad-except  (numpy parses the header text)
    raise FlameAssetError(f"{source}: '{key}': not a valid .npy header ({e})") from e
  data = f.read(size)
  if dtype.hasobject:
    obj = _unpickle(data, source, ".npy")
    return obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
  if dtype.kind not in "biufcSU" or dtype.fields is not None or dtype.subdtype is not None:
    raise FlameAssetError(f"{source}: '{key}': unsupported dtype {dtype}")
  if not all(n >= 0 for n in shape) or math.prod(shape) > MAX_ELEMENTS:
    raise FlameAssetError(f"{source}: '{key}': invalid .npy shape {shape}")
  want = math.prod(shape) * dtype.itemsize
  if len(data) < want:
    raise FlameAssetError(f"{source}: '{key}': truncated .npy (its header promises an "
                          f"array {shape} of {dtype}, {want} bytes; the file holds {len(data)})")
  return np.frombuffer(data, dtype, math.prod(shape)).reshape(
      shape, order="F" if fortran else "C").copy()


def load_npy(path):
  """Loads an .npy file; object arrays (pickled dicts) go through `SafeUnpickler`."""
  path = _check_exists(path)
  data = path.read_bytes()
  return _read_npy(io.BytesIO(data), len(data), path)


def load_npz(path):
  """Loads an .npz of plain arrays (object arrays are refused)."""
  path = _check_exists(path)
  out = {}
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        limit = MAX_ELEMENTS * 16 + (1 << 20)
        if info.file_size > limit:
          raise FlameAssetError(f"{path}: '{key}' is larger than {limit} bytes")
        with zf.open(info) as f:
          blob = f.read(limit)
        array = _read_npy(io.BytesIO(blob), len(blob), path, key)
        if not isinstance(array, np.ndarray) or array.dtype.hasobject:
          raise FlameAssetError(f"{path}: '{key}' is an object array (pickles are not "
                                "loaded from .npz files)")
        out[key] = array
  except FlameAssetError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (zipfile / zlib / struct errors)
    raise FlameAssetError(f"{path}: truncated or corrupt .npz ({type(e).__name__}: {e})") from e
  return out


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
