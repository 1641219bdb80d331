"""GS-LRM PyTorch checkpoints -> `kaojax.models.gslrm.GSLRM`.

Accepted inputs: a `torch.save` file holding {"model": state_dict, "optimizer": ...}
(FaceLift's training checkpoints), a bare state dict saved with torch.save, or a
`.safetensors` state dict. `loss_calculator.*` (VGG/LPIPS weights of the training
loss) are dropped; any other unused key, any missing key and any mis-shaped key is
reported in one `CheckpointError`.

    python -m kaojax.convert.gslrm --in gslrm.pt --out weights/gslrm

writes a kaojax model directory (`kaojax.models.loading` layout, kind "gslrm": the
GSLRMConfig and the parameters, no PyTorch needed to read it); `load_gslrm` takes
that directory as well as the checkpoint.
"""

import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from kaojax.convert.torch_state import (CheckpointError, StateMapping, assign_state,
                                        converter_parser, linear_kernel, param_count,
                                        param_shapes)
from kaojax.models.gslrm import GSLRM, GSLRMConfig
from kaojax.models import loading

PathLike = Union[str, os.PathLike]
DROPPED = ("loss_calculator.*",)
KIND = "gslrm"


def read_gslrm_state(path: PathLike) -> dict:
  """A GS-LRM checkpoint file -> {torch key: np.ndarray} (the `model` dict)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GS-LRM checkpoint not found: {path}")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
  import torch
  blob = torch.load(str(path), map_location="cpu", weights_only=True)
  if isinstance(blob, Mapping) and "model" in blob and isinstance(blob["model"], Mapping):
    blob = blob["model"]
  if not isinstance(blob, Mapping):
    raise CheckpointError(f"{path}: expected a state dict or a dict with a 'model' entry, "
                          f"got {type(blob).__name__}")
  out = {}
  for key, value in blob.items():
    if not hasattr(value, "detach"):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    out[key] = value.detach().float().cpu().numpy()
  return out


def infer_config(state: Mapping[str, np.ndarray], head_dim: int = 64, **overrides) -> GSLRMConfig:
  """Read the sizes of a GS-LRM state dict (the head count is not stored in the
  weights: it is width / head_dim unless `heads=` is given)."""
  try:
    dim, patch_dim = state["patch_embedder.1.weight"].shape
    num_global = state["gaussian_position_embeddings"].shape[0]
    pixel_out = state["pixel_gaussian_decoder.1.weight"].shape[0]
    mlp = state["transformer_layers.0.mlp.mlp.0.weight"].shape[0]
  except KeyError as err:
    raise CheckpointError(f"not a GS-LRM state dict: no {err.args[0]!r}") from None
  layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_layers."))
  patch = int(round(np.sqrt(pixel_out / 14)))
  if patch * patch * 14 != pixel_out or patch_dim % (patch * patch):
    raise CheckpointError(f"pixel_gaussian_decoder.1.weight has {pixel_out} outputs, which "
                          "is not patch*patch*14 (only SH degree 0 is supported)")
  kwargs = dict(dim=dim, heads=overrides.pop("heads", dim // head_dim), head_dim=head_dim,
                layers=layers, patch=patch, in_channels=patch_dim // (patch * patch),
                num_global=num_global, mlp_ratio=mlp // dim)
  kwargs.update(overrides)
  return GSLRMConfig(**kwargs)


def gslrm_arrays(state: Mapping[str, np.ndarray], model: GSLRM,
                 source: str = "GS-LRM checkpoint") -> dict:
  """{nnx path: array} for `model` from a torch state dict (raises CheckpointError)."""
  m = StateMapping(state, source=source, allow=DROPPED)

  def lin(key, *path):
    w = m.take(key)
    m.put(path + ("kernel",), None if w is None else linear_kernel(w), key)

  def norm(key, *path):
    m.put(path + ("scale",), m.take(key), key)

  lin("patch_embedder.1.weight", "patch_embedder")
  m.put(("global_tokens",), m.take("gaussian_position_embeddings"), "gaussian_position_embeddings")
  norm("input_layer_norm.weight", "input_norm")
  for i in range(model.cfg.layers):
    t = f"transformer_layers.{i}."
    norm(t + "norm1.weight", "blocks", i, "norm1")
    norm(t + "norm2.weight", "blocks", i, "norm2")
    lin(t + "attn.to_qkv.weight", "blocks", i, "attn", "to_qkv")
    lin(t + "attn.fc.weight", "blocks", i, "attn", "fc")
    lin(t + "mlp.mlp.0.weight", "blocks", i, "mlp", "fc1")
    lin(t + "mlp.mlp.2.weight", "blocks", i, "mlp", "fc2")
  norm("gaussian_upsampler.layernorm.weight", "global_norm")
  lin("gaussian_upsampler.linear.weight", "global_head")
  norm("pixel_gaussian_decoder.0.weight", "pixel_norm")
  lin("pixel_gaussian_decoder.1.weight", "pixel_head")
  return m.finish(param_shapes(model))


def load_gslrm(source: Union[PathLike, Mapping[str, np.ndarray]],
               cfg: Optional[GSLRMConfig] = None, **config_overrides) -> GSLRM:
  """A GS-LRM checkpoint (path or state dict) -> a GSLRM with its weights.

  With no `cfg`, sizes are read from the weights (`infer_config`), `config_overrides`
  replacing execution fields (attention_chunk, dtype)."""
  name = str(source) if not isinstance(source, Mapping) else "GS-LRM state dict"
  state = read_gslrm_state(source) if not isinstance(source, Mapping) else dict(source)
  if cfg is None:
    cfg = infer_config(state, **config_overrides)
  # shape-only construction (no eager random init); every value is assigned next
  model = nnx.eval_shape(lambda: GSLRM(cfg, nnx.Rngs(0)))
  assign_state(model, gslrm_arrays(state, model, source=name))
  return model


# ----------------------------------------------------------------------------
# Command line: convert once, save a kaojax model directory.


def convert(src: PathLike, out: PathLike, heads: Optional[int] = None, head_dim: int = 64,
            overwrite: bool = False) -> GSLRM:
  """Checkpoint file `src` -> model directory `out`; returns the model."""
  overrides = {} if heads is None else {"heads": heads}
  model = load_gslrm(read_gslrm_state(src), head_dim=head_dim, **overrides)
  loading.save_network(out, model, overwrite=overwrite)
  return model


def main(argv=None):
  parser = converter_parser(
      "gslrm", "Convert a FaceLift GS-LRM PyTorch checkpoint into a kaojax model directory "
      "(kaojax.models.loading.load_network(DIR, 'gslrm'); the FaceLift job's --gslrm).",
      "torch.save checkpoint ({'model': state_dict, ...}), bare state dict or .safetensors")
  parser.add_argument("--head-dim", type=int, default=64,
                      help="attention head width (not stored in the weights; FaceLift: 64)")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads (default: width / head dim)")
  args = parser.parse_args(argv)
  model = convert(args.src, args.out, args.heads, args.head_dim, args.overwrite)
  print(f"saved GS-LRM ({param_count(model):,} parameters, {model.cfg.layers} layers of width "
        f"{model.cfg.dim}) to {args.out}")


if __name__ == "__main__":
  main()
