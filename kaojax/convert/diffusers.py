"""diffusers model folders -> kaojax UNet / VAE.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, or
the `.fp16.` variants). The kaojax modules mirror diffusers' attribute names, so each
torch key maps to the nnx path with the same components; only the leaf changes:
  Linear weight [out, in]          -> kernel [in, out]
  Conv2d weight [out, in, kh, kw]  -> kernel [kh, kw, in, out]
  1x1 Conv2d used as a Linear      -> kernel [in, out] (proj_in/proj_out of
                                      use_linear_projection=False, old VAE attention)
  norm weight [C]                  -> scale
Old-style VAE attention names (query, key, value, proj_attn) are renamed to
(to_q, to_k, to_v, to_out.0). Missing, unexpected and mis-shaped keys are reported
together in one `CheckpointError`. FaceLift's UNet has `in_channels` 8 (`conv_in.weight`
[320, 8, 3, 3]); its config.json says so.
"""

import functools
import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from kaojax.convert.torch_state import (StateMapping, assign_state,
                                        conv_kernel_hwio, linear_kernel, param_shapes,
                                        read_json, read_state_dict)
from kaojax.models.mvdiffusion.unet import UNet, UNetConfig
from kaojax.models.mvdiffusion.vae import VAE, VAEConfig

PathLike = Union[str, os.PathLike]
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_diffusers_folder(folder: PathLike):
  """(config dict, {torch key: np.ndarray}) of a diffusers model folder."""
  folder = pathlib.Path(folder)
  config = read_json(folder / "config.json")
  if config is None:
    raise FileNotFoundError(f"no config.json in {folder}")
  for name in WEIGHT_FILES:
    if (folder / name).is_file():
      return config, read_state_dict(folder / name)
  raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _rename(key: str) -> str:
  parts = key.split(".")
  if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION:
    parts[-2:-1] = _OLD_ATTENTION[parts[-2]].split(".")
  return ".".join(parts)


def mirrored_arrays(state: Mapping[str, np.ndarray], model: nnx.Module,
                    source: str = "checkpoint") -> dict:
  """{nnx path: array} for a module whose attribute names mirror the torch keys."""
  shapes = param_shapes(model)
  m = StateMapping(state, source=source)
  for key in state:
    parts = _rename(key).split(".")
    base, leaf = tuple(parts[:-1]), parts[-1]
    if leaf == "bias" and base + ("bias",) in shapes:
      m.put(base + ("bias",), m.take(key), key)
    elif leaf == "weight" and base + ("scale",) in shapes:
      m.put(base + ("scale",), m.take(key), key)
    elif leaf == "weight" and base + ("kernel",) in shapes:
      w = np.asarray(m.take(key))
      if w.ndim == 4 and len(shapes[base + ("kernel",)]) == 2 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]                       # 1x1 conv used as a per-pixel Linear
      m.put(base + ("kernel",),
            linear_kernel(w) if w.ndim == 2 else conv_kernel_hwio(w) if w.ndim == 4 else w, key)
    # anything else stays untaken and is reported as unexpected
  leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  for path in shapes:
    if path not in m.arrays:
      m.missing.append(".".join(path[:-1] + (leaf_names.get(path[-1], path[-1]),)))
  return m.finish(shapes)


@functools.lru_cache(maxsize=4)
def _abstract_parts(kind, cfg):
  build = {"unet": UNet, "vae": VAE}[kind]
  return nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))


def _abstract(kind: str, cfg):
  """A module without random weights (shape-only values, assigned next); the traced
  construction is cached per config."""
  graphdef, state = _abstract_parts(kind, cfg)
  return nnx.merge(graphdef, state, copy=True)


def load_unet(folder: Optional[PathLike] = None, *, config: Optional[dict] = None,
              state: Optional[Mapping[str, np.ndarray]] = None, num_views: int = 6,
              **overrides) -> UNet:
  """A diffusers UNet2DConditionModel folder (or config + state dict) -> kaojax UNet."""
  source = "UNet state dict"
  if folder is not None:
    config, state = read_diffusers_folder(folder)
    source = str(folder)
  if config is None or state is None:
    raise ValueError("load_unet needs a folder, or both config= and state=")
  cfg = UNetConfig.from_diffusers(config, num_views=num_views, **overrides)
  model = _abstract("unet", cfg)
  assign_state(model, mirrored_arrays(state, model, source))
  return model


def load_vae(folder: Optional[PathLike] = None, *, config: Optional[dict] = None,
             state: Optional[Mapping[str, np.ndarray]] = None, **overrides) -> VAE:
  """A diffusers AutoencoderKL folder (or config + state dict) -> kaojax VAE."""
  source = "VAE state dict"
  if folder is not None:
    config, state = read_diffusers_folder(folder)
    source = str(folder)
  if config is None or state is None:
    raise ValueError("load_vae needs a folder, or both config= and state=")
  cfg = VAEConfig.from_diffusers(config, **overrides)
  model = _abstract("vae", cfg)
  assign_state(model, mirrored_arrays(state, model, source))
  return model
