"""CLIP vision weights -> `kaojax.models.mvdiffusion.clip.CLIPVisionEncoder`.

Two layouts are read:
- transformers (`CLIPVisionModelWithProjection`, e.g. SD2.1-unCLIP's `image_encoder/`
  folder, or a full `CLIPModel`, whose text tower is ignored): `vision_model.*` +
  `visual_projection.weight`;
- OpenCLIP (`visual.*`: conv1, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}, ln_post, proj [D, P]).
Missing, unexpected and mis-shaped keys are reported in one `CheckpointError`.
"""

import dataclasses
import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from kaojax.convert.torch_state import (StateMapping, assign_state,
                                        conv_kernel_hwio, linear_kernel, param_shapes,
                                        read_json, read_state_dict)
from kaojax.models.mvdiffusion.clip import CLIPVisionConfig, CLIPVisionEncoder

PathLike = Union[str, os.PathLike]
IGNORED = ("text_model.*", "text_projection.*", "logit_scale", "*.position_ids",
           "transformer.*", "token_embedding.*", "positional_embedding", "ln_final.*",
           "text_projection", "attn_pool.*")


def clip_arrays(state: Mapping[str, np.ndarray], model: CLIPVisionEncoder,
                source: str = "CLIP checkpoint") -> dict:
  openclip = any(k.startswith("visual.") for k in state)
  m = StateMapping(state, source=source, allow=IGNORED)

  def lin(key, *path, bias=True):
    w = m.take(key + ".weight")
    m.put(path + ("kernel",), None if w is None else linear_kernel(w), key + ".weight")
    if bias:
      m.put(path + ("bias",), m.take(key + ".bias"), key + ".bias")

  def norm(key, *path):
    m.put(path + ("scale",), m.take(key + ".weight"), key + ".weight")
    m.put(path + ("bias",), m.take(key + ".bias"), key + ".bias")

  def raw(key, *path, fn=lambda a: a):
    a = m.take(key)
    m.put(path, None if a is None else fn(a), key)

  hwio = conv_kernel_hwio
  if openclip:
    v = "visual."
    raw(v + "conv1.weight", "patch_embedding", "kernel", fn=hwio)
    raw(v + "class_embedding", "class_embedding")
    raw(v + "positional_embedding", "position_embedding")
    norm(v + "ln_pre", "pre_layrnorm")
    norm(v + "ln_post", "post_layernorm")
    raw(v + "proj", "visual_projection", "kernel")          # already [D, P]
    d = model.cfg.hidden_size
    for i in range(model.cfg.layers):
      b = f"{v}transformer.resblocks.{i}."
      norm(b + "ln_1", "layers", i, "layer_norm1")
      norm(b + "ln_2", "layers", i, "layer_norm2")
      w, bias = m.take(b + "attn.in_proj_weight"), m.take(b + "attn.in_proj_bias")
      for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        if w is not None:
          m.put(("layers", i, "self_attn", name, "kernel"), linear_kernel(w[j * d:(j + 1) * d]),
                b + "attn.in_proj_weight")
        if bias is not None:
          m.put(("layers", i, "self_attn", name, "bias"), bias[j * d:(j + 1) * d],
                b + "attn.in_proj_bias")
      lin(b + "attn.out_proj", "layers", i, "self_attn", "out_proj")
      lin(b + "mlp.c_fc", "layers", i, "fc1")
      lin(b + "mlp.c_proj", "layers", i, "fc2")
  else:
    v = "vision_model."
    raw(v + "embeddings.patch_embedding.weight", "patch_embedding", "kernel", fn=hwio)
    raw(v + "embeddings.class_embedding", "class_embedding")
    raw(v + "embeddings.position_embedding.weight", "position_embedding")
    norm(v + "pre_layrnorm", "pre_layrnorm")
    norm(v + "post_layernorm", "post_layernorm")
    lin("visual_projection", "visual_projection", bias=False)
    for i in range(model.cfg.layers):
      b = f"{v}encoder.layers.{i}."
      norm(b + "layer_norm1", "layers", i, "layer_norm1")
      norm(b + "layer_norm2", "layers", i, "layer_norm2")
      for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        lin(b + "self_attn." + name, "layers", i, "self_attn", name)
      lin(b + "mlp.fc1", "layers", i, "fc1")
      lin(b + "mlp.fc2", "layers", i, "fc2")
  arrays = m.finish(param_shapes(model))
  return {tuple(str(p) for p in k): a for k, a in arrays.items()}


def load_clip_vision(source: Union[PathLike, Mapping[str, np.ndarray]],
                     cfg: Optional[CLIPVisionConfig] = None,
                     dtype: Optional[str] = None) -> CLIPVisionEncoder:
  """A transformers folder (config.json + model.safetensors / pytorch_model.bin), a
  weights file, or a state dict -> CLIPVisionEncoder. `cfg` is required unless a
  config.json is next to the weights."""
  name = "CLIP state dict"
  if isinstance(source, Mapping):
    state = dict(source)
  else:
    path = pathlib.Path(source)
    name = str(path)
    state = read_state_dict(path)
    if cfg is None:
      config = read_json((path if path.is_dir() else path.parent) / "config.json")
      if config is None:
        raise ValueError(f"{path}: no config.json next to the weights; pass cfg=")
      cfg = CLIPVisionConfig.from_transformers(config)
  if cfg is None:
    raise ValueError("load_clip_vision: pass cfg= with a state dict")
  if dtype is not None:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  # shape-only construction (no eager random init); every value is assigned next
  model = nnx.eval_shape(lambda: CLIPVisionEncoder(cfg, nnx.Rngs(0)))
  assign_state(model, clip_arrays(state, model, source=name))
  return model
