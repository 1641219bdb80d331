"""Builds the native rasterizers (kaojax/render/native/csrc) at install time:
the CPU library with the C++ compiler, the CUDA library when `nvcc` is found
(or where $CUDA_HOME/bin/nvcc exists). Set KAOJAX_BUILD_CUDA=0 to skip CUDA,
KAOJAX_CUDA_ARCHS="80;90" to choose the GPU architectures.

They are plain shared libraries loaded with ctypes (not Python extension
modules); XLA's FFI headers come from jaxlib (a build requirement).
"""

import importlib.util
import os
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "kaojax/render/native/csrc"


def _ffi_include() -> str:
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("kaojax setup: jaxlib is needed to build the native rasterizers")
  include = os.path.join(list(spec.submodule_search_locations)[0], "include")
  if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    raise RuntimeError(f"kaojax setup: XLA FFI headers not found under {include}")
  return include


def _nvcc():
  if os.environ.get("KAOJAX_BUILD_CUDA", "1") == "0":
    return None
  found = shutil.which("nvcc")
  home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
  if not found and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
    found = os.path.join(home, "bin", "nvcc")
  return found


class NativeLibrary(Extension):
  def __init__(self, name, source, cuda=False):
    super().__init__(name, sources=[])
    self.source, self.cuda = source, cuda


class BuildNative(build_ext):
  """Compiles each NativeLibrary with one compiler call."""

  def build_extension(self, ext):
    out = self.get_ext_fullpath(ext.name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    include = [f"-I{_ffi_include()}", f"-I{CSRC}"]
    src = os.path.join(CSRC, ext.source)
    if ext.cuda:
      archs = os.environ.get("KAOJAX_CUDA_ARCHS", "80;90").split(";")
      gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
      cmd = [_nvcc(), "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC",
             "--expt-relaxed-constexpr", "-w", *gencode, *include, src, "-o", out]
    else:
      cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O3", "-fPIC", "-shared",
             "-pthread", "-w", *include, src, "-o", out]
    print("kaojax setup:", " ".join(cmd))
    subprocess.check_call(cmd)


libraries = [NativeLibrary("kaojax.render.native._kaojax_render_cpu", "cpu_ops.cc")]
if _nvcc():
  libraries.append(NativeLibrary("kaojax.render.native._kaojax_render_cuda", "cuda_ops.cu",
                                 cuda=True))

setup(ext_modules=libraries, cmdclass={"build_ext": BuildNative})
