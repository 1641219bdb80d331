"""Project-wide test setup."""

import os

# gsplat (a test oracle) JIT-compiles CUDA code at import when it finds a CUDA
# toolkit; its pure-PyTorch reference math is all the tests use.
os.environ.setdefault("CUDA_HOME", "/nonexistent")
