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

    python -m kaojax.convert.diffusers --in mvdiffusion/unet --out weights/unet

writes a kaojax model directory (`kaojax.models.loading` layout, kind "unet" or "vae":
the config and the parameters); `load_unet` / `load_vae` take that directory as well
as the diffusers folder.
"""

import functools
import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from kaojax.convert.torch_state import (StateMapping, assign_state, conv_kernel_hwio,
                                        converter_parser, linear_kernel, param_count,
                                        param_shapes, read_json, read_state_dict)
from kaojax.models import loading
from kaojax.models.mvdiffusion.unet import UNet, UNetConfig
from kaojax.models.mvdiffusion.vae import VAE, VAEConfig

PathLike = Union[str, os.PathLike]
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# kind of a converted directory: (module, config, diffusers class name)
MODELS = {"unet": (UNet, UNetConfig, "UNet2DConditionModel"),
          "vae": (VAE, VAEConfig, "AutoencoderKL")}


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
  build = MODELS[kind][0]
  return nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))


def _abstract(kind: str, cfg):
  """A module without random weights (shape-only values, assigned next); the traced
  construction is cached per config."""
  graphdef, state = _abstract_parts(kind, cfg)
  return nnx.merge(graphdef, state, copy=True)


def load_unet(folder: Optional[PathLike] = None, *, config: Optional[dict] = None,
              state: Optional[Mapping[str, np.ndarray]] = None, num_views: int = 6,
              **overrides) -> UNet:
  """A diffusers UNet2DConditionModel folder (or config + state dict) -> kaojax UNet.
  `overrides` replace UNetConfig fields (execution options: dtype, attention_chunk)."""
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


# ----------------------------------------------------------------------------
# Command line: convert once, save a kaojax model directory.


def convert(src: PathLike, out: PathLike, kind: str = "auto", num_views: int = 6,
            overwrite: bool = False):
  """diffusers model folder `src` -> model directory `out`; returns the model.
  kind: "unet", "vae" or "auto" (from config.json's _class_name)."""
  config, state = read_diffusers_folder(src)
  if kind == "auto":
    kinds = {name: k for k, (_, _, name) in MODELS.items()}
    if config.get("_class_name") not in kinds:
      raise ValueError(f"{src}: config.json's _class_name {config.get('_class_name')!r} is "
                       f"not one of {sorted(kinds)}; pass the kind")
    kind = kinds[config["_class_name"]]
  if kind == "unet":
    model = load_unet(config=config, state=state, num_views=num_views)
  else:
    model = load_vae(config=config, state=state)
  loading.save_network(out, model, overwrite=overwrite)
  return model


def main(argv=None):
  parser = converter_parser(
      "diffusers", "Convert a diffusers UNet2DConditionModel or AutoencoderKL folder into a "
      "kaojax model directory (kaojax.models.loading.load_network(DIR, 'unet' / 'vae'); "
      "the FaceLift pipeline folder's unet/ and vae/).",
      "diffusers model folder (config.json + diffusion_pytorch_model.*)")
  parser.add_argument("--kind", default="auto", choices=("auto",) + tuple(MODELS))
  parser.add_argument("--num-views", type=int, default=6,
                      help="UNet: views per group of the multi-view attention")
  args = parser.parse_args(argv)
  model = convert(args.src, args.out, args.kind, args.num_views, args.overwrite)
  print(f"saved {type(model).__name__} ({param_count(model):,} parameters) to {args.out}")


if __name__ == "__main__":
  main()
