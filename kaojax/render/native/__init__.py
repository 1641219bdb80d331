"""Native rasterization kernels (C++ on CPU, CUDA on GPU) bound through XLA FFI.

The libraries are compiled by `pip install` (setup.py) next to this file:
`_kaojax_render_cpu*.so` with g++, `_kaojax_render_cuda*.so` with nvcc when it is
found. Which path a renderer takes is its `backend` argument, or, when that is
None, the process-wide default: `set_default_backend(...)` or the environment
variable KAOJAX_RENDER_BACKEND, one of
  "auto"       native where the library for the current JAX platform is loaded
               (and the inputs are not float64), the pure-JAX reference elsewhere
               (the default)
  "native"     native, or an error naming what is missing
  "reference"  always the pure-JAX reference
One log line at import says which libraries were loaded, or why none was.
"""

import ctypes
import glob
import logging
import os

import jax

log = logging.getLogger("kaojax.render")

BACKENDS = ("auto", "native", "reference")
TARGETS = ("surfel_forward", "surfel_backward", "gaussian_forward", "gaussian_backward",
           "mesh_visibility")
_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBRARIES = {"cpu": "_kaojax_render_cpu", "cuda": "_kaojax_render_cuda"}
_FFI_PLATFORM = {"cpu": "cpu", "cuda": "CUDA"}

loaded: dict = {}        # platform -> library path
load_errors: dict = {}   # platform -> why it did not load
_default = os.environ.get("KAOJAX_RENDER_BACKEND", "auto")


def _find(stem: str, directory: str):
  found = sorted(glob.glob(os.path.join(directory, stem + "*.so")))
  return found[0] if found else None


def load(directory: str = _HERE) -> dict:
  """Load and register the libraries found in `directory`; returns `loaded`."""
  for platform, stem in _LIBRARIES.items():
    if platform in loaded:
      continue
    path = _find(stem, directory)
    if path is None:
      load_errors[platform] = f"{stem}*.so not found in {directory}"
      continue
    try:
      lib = ctypes.CDLL(path)
      for target in TARGETS:
        name = f"kaojax_{target}"
        symbol = getattr(lib, f"{name}_{platform}")
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol),
                                    platform=_FFI_PLATFORM[platform])
        jax.ffi.register_ffi_target_as_batch_partitionable(name)
    except (OSError, AttributeError) as e:
      load_errors[platform] = f"{path}: {e}"
      continue
    loaded[platform] = path
    load_errors.pop(platform, None)
  return loaded


def set_default_backend(backend: str) -> None:
  """The backend renderers use when their `backend` argument is None. Set it
  before the first render: jitted renderers keep the path they were traced with."""
  global _default
  if backend not in BACKENDS:
    raise ValueError(f"kaojax.render: backend must be one of {BACKENDS}, got {backend!r}")
  _default = backend


def default_backend() -> str:
  return _default


def resolve(backend=None, dtype=None) -> str:
  """"native" or "reference" for a renderer call on the current JAX platform.
  The kernels compute in float32: "auto" keeps float64 inputs on the reference
  (an explicit "native" casts them to float32)."""
  backend = _default if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"kaojax.render: backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "reference":
    return "reference"
  if backend == "auto" and dtype is not None and jax.numpy.dtype(dtype) == jax.numpy.float64:
    return "reference"
  platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
  if platform in loaded:
    return "native"
  if backend == "native":
    why = load_errors.get(platform, f"no native kernels are built for platform {platform!r}")
    raise RuntimeError(f"kaojax.render: backend='native' asked for, but the {platform} "
                       f"library is not available ({why}); reinstall kaojax "
                       f"(pip install -e .) or use backend='reference'")
  return "reference"


def _announce():
  if loaded:
    log.info("kaojax.render: native rasterizers loaded for %s", ", ".join(sorted(loaded)))
  else:
    log.warning("kaojax.render: native rasterizers not available (%s); using the pure-JAX "
                "reference renderers", load_errors.get("cpu", "not built"))


load()
_announce()
