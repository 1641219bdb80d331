import os

os.environ.setdefault("CUDA_HOME", "/nonexistent")   # gsplat must not try a CUDA build

import jax
import pytest


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield
