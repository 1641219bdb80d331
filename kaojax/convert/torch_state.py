"""Shared helpers for converting PyTorch checkpoints into flax.nnx models.

Reading: `read_state_dict` loads `*.safetensors` or `pytorch_model.bin` files into a
flat `{name: np.ndarray}` dict (no torch tensors leak out; a file it cannot read
raises a `CheckpointError` naming it); `read_json` reads an optional `config.json`.

Converting: a converter builds a `StateMapping` - it `take`s torch keys one by one,
turns them into arrays laid out for flax (helpers `linear_kernel` for [out, in] ->
[in, out] and `conv_kernel_hwio` for OIHW -> HWIO) and `put`s them at nnx paths.
`StateMapping.finish` reports every missing, unexpected (not taken and not on the
allow-list) and mis-shaped key in ONE `CheckpointError`; `assign_state` writes the
arrays into an nnx module and refuses to leave any parameter unassigned.
"""

import fnmatch
import json
import os
import pathlib
from typing import Iterable, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
  """A checkpoint file is unreadable (the message names the file), or does not match
  the model (the message lists every offending key)."""


# ----------------------------------------------------------------------------
# Reading files.


def read_state_dict(path: PathLike) -> dict:
  """`model.safetensors` or `pytorch_model.bin` (or a folder holding one) ->
  {name: np.ndarray}. bfloat16/float16 tensors are returned as float32."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (path / name).is_file():
        path = path / name
        break
    else:
      raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  import torch
  try:
    if path.suffix == ".safetensors":
      from safetensors.torch import load_file
      tensors = load_file(str(path), device="cpu")
    else:
      tensors = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # safetensors / torch / zipfile / pickle errors: a bad file
    raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
  if isinstance(tensors, dict) and "state_dict" in tensors and len(tensors) <= 3:
    tensors = tensors["state_dict"]
  if not isinstance(tensors, dict):
    raise CheckpointError(f"{path}: expected a dictionary of tensors, got "
                          f"{type(tensors).__name__}")
  return {k: _to_numpy(v, path, k) for k, v in tensors.items()}


def _to_numpy(tensor, path, key) -> np.ndarray:
  import torch
  if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
    raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
  if tensor.dtype in (torch.bfloat16, torch.float16):
    tensor = tensor.float()
  try:
    return tensor.detach().cpu().numpy()
  except (TypeError, RuntimeError) as e:  # dtypes numpy lacks, e.g. float8
    raise CheckpointError(f"{path}: tensor {key!r} cannot be read as numpy ({e})") from e


def read_json(path: PathLike) -> Optional[dict]:
  """A JSON file as a dict, or None when `path` does not exist."""
  path = pathlib.Path(path)
  return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------
# Layout changes.


def linear_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax kernel [in, out]."""
  return np.ascontiguousarray(np.asarray(weight).T)


def conv_kernel_hwio(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] (OIHW) -> flax kernel [kh, kw, in, out] (HWIO)."""
  return np.ascontiguousarray(np.transpose(np.asarray(weight), (2, 3, 1, 0)))


# ----------------------------------------------------------------------------
# Mapping keys to nnx paths.


class StateMapping:
  """Collects {nnx path: array} from a torch state dict and remembers which
  torch key each array came from, for error messages.

  `allow` lists fnmatch patterns of torch keys that may be present in the
  checkpoint but are deliberately unused (e.g. "synthesizer.*" for KaoLRM).
  """

  def __init__(self, state: Mapping[str, np.ndarray], source: str = "checkpoint",
               allow: Sequence[str] = ()):
    self.state = state
    self.source = source
    self.allow = tuple(allow)
    self.arrays = {}       # nnx path (tuple of str) -> np.ndarray
    self.origin = {}       # nnx path -> torch key(s)
    self.taken = set()
    self.missing = []
    self.malformed = []    # "key: what is wrong with it"

  def has(self, key: str) -> bool:
    return key in self.state

  def take(self, key: str) -> Optional[np.ndarray]:
    """The array stored under `key` (recorded as used), or None when missing."""
    if key not in self.state:
      self.missing.append(key)
      return None
    self.taken.add(key)
    return np.asarray(self.state[key])

  def malformed_key(self, key: str, message: str) -> None:
    """Record a key whose array cannot be converted (reported by `finish`)."""
    self.malformed.append(f"{key}: {message}")

  def put(self, path: Iterable, array: Optional[np.ndarray], origin: str) -> None:
    """Store `array` at nnx `path` (skipped when a needed key was missing)."""
    if array is None:
      return
    path = tuple(str(p) for p in path)
    self.arrays[path] = array
    self.origin[path] = origin

  def unexpected(self) -> list:
    return sorted(k for k in self.state if k not in self.taken
                  and not any(fnmatch.fnmatchcase(k, pat) for pat in self.allow))

  def finish(self, expected_shapes: Mapping[tuple, tuple]) -> dict:
    """Check against the model's {nnx path: shape}; raise one CheckpointError that
    lists missing, unexpected and mis-shaped keys; else return {path: array}."""
    problems = []
    if self.missing:
      problems.append("missing keys:\n  " + "\n  ".join(sorted(set(self.missing))))
    unexpected = self.unexpected()
    if unexpected:
      problems.append("unexpected keys:\n  " + "\n  ".join(unexpected))
    shaped = list(self.malformed)
    for path, array in self.arrays.items():
      want = expected_shapes.get(path)
      if want is None:
        shaped.append(f"{self.origin[path]} -> {'/'.join(path)}: no such model parameter")
      elif tuple(array.shape) != tuple(want):
        shaped.append(f"{self.origin[path]}: converted shape {tuple(array.shape)} but the "
                      f"model expects {tuple(want)} at {'/'.join(path)}")
    if shaped:
      problems.append("mis-shaped keys:\n  " + "\n  ".join(shaped))
    not_loaded = sorted("/".join(p) for p in expected_shapes if p not in self.arrays)
    if not_loaded and not self.missing:
      problems.append("model parameters with no checkpoint value:\n  " + "\n  ".join(not_loaded))
    if problems:
      raise CheckpointError(f"{self.source} does not match the model:\n" + "\n".join(problems))
    return self.arrays


def param_shapes(module: nnx.Module, variable_type=nnx.Param) -> dict:
  """{nnx path (tuple of str): shape} of the module's variables of one type."""
  flat = nnx.to_flat_state(nnx.state(module, variable_type))
  return {tuple(str(p) for p in path): tuple(v.get_value().shape) for path, v in flat}


def param_count(module: nnx.Module) -> int:
  """Number of parameter values of a module (what a converter's command line reports)."""
  return sum(int(np.prod(shape)) for shape in param_shapes(module).values())


def assign_state(module: nnx.Module, arrays: Mapping[tuple, np.ndarray],
                 variable_type=nnx.Param, scope: Optional[Sequence[str]] = None) -> None:
  """Write {nnx path: array} into the module's variables (in place), keeping each
  variable's dtype. Every variable of `variable_type` (restricted to the top-level
  attributes named in `scope`, when given) must be covered."""
  state = nnx.state(module, variable_type)
  flat = dict((tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(state))
  if scope is not None:
    flat = {p: v for p, v in flat.items() if p[0] in scope}
  missing = sorted("/".join(p) for p in flat if p not in arrays)
  extra = sorted("/".join(p) for p in arrays if p not in flat)
  if missing or extra:
    raise CheckpointError("state does not cover the model: missing " + str(missing)
                          + ", unknown " + str(extra))
  for path, var in flat.items():
    value = var.get_value()
    array = np.asarray(arrays[path])
    if tuple(array.shape) != tuple(value.shape):
      raise CheckpointError(f"{'/'.join(path)}: shape {array.shape}, model wants {value.shape}")
    var.set_value(jnp.asarray(array, value.dtype))
  nnx.update(module, state)


def converter_parser(module: str, description: str, input_help: Optional[str] = None):
  """The argparse parser of a converter's command line (`python -m kaojax.convert.X`):
  --out and --overwrite, and --in (as `src`) when `input_help` is given."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog=f"python -m kaojax.convert.{module}",
                                   description=description)
  if input_help is not None:
    parser.add_argument("--in", dest="src", required=True, help=input_help)
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  return parser
