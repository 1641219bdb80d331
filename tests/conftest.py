"""Project-wide test setup."""

import atexit
import os
import shutil
import tempfile

# gsplat (a test oracle) JIT-compiles CUDA code at import when it finds a CUDA
# toolkit; its pure-PyTorch reference math is all the tests use.
os.environ.setdefault("CUDA_HOME", "/nonexistent")

# The suite is dominated by XLA compiling many small programs once each. LLVM's -O0
# halves the CPU compile time (a tiny training step: 20 s -> 11 s; the whole suite:
# 23.3 -> 16.5 min in a fresh clone) at the same run time for a tiny step (0.3 s).
# Results agree to float32 rounding (that step's loss moves by 1e-7 relative), so
# every tolerance is the one used without it. Subprocesses inherit it through the
# environment.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()


# Several tests compile the same programs again (each `train_and_evaluate` builds fresh
# step functions: the resume test runs three of them). JAX's compilation cache, in a
# folder that lives only as long as this session, compiles each program once: the
# suite still starts cold and measures nothing stored by an earlier run. Subprocesses
# inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="kaojax-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
