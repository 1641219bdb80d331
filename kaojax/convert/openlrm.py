"""OpenLRM and KaoLRM checkpoints -> kaojax models.

OpenLRM (`zxhezexin/openlrm-*-1.1`: `model.safetensors` or `pytorch_model.bin`, plus
`config.json`): raw `state_dict()` names, no prefix. Cross-attention weights come
either packed (`in_proj_weight` [3D, D], q|k|v row blocks; when the image-token width
equals the transformer width) or separate (`q_proj_weight` [D, D], `k_proj_weight` /
`v_proj_weight` [D, cond]). Self-attention is always packed. Linear weights are
transposed, the patch conv goes OIHW -> HWIO, the upsampler's ConvTranspose weight
[D, C, 2, 2] becomes [D, 2, 2, C], and the DINOv2 position table is resized once to
the model's fixed patch grid.

KaoLRM checkpoints add `flame_decoder.decoder.*`, `gaussian_decoder.decoder.net.*`
and the FLAME buffers `flame_model.*` (turned into a `kaojax.flame.FlameModel`).

Allow-lists (keys legitimately present but unused):
  * KaoLRM: `synthesizer.*` (OpenLRM's NeRF decoder, unused by KaoLRM) and the
    `flame_model.*` buffers, which go to the FLAME model, not the network;
  * both: `encoder.model.mask_token` (DINOv2's masked-modelling token, never used
    at inference or by LRM training).
Any other unknown key, any missing key and any mis-shaped key raises a
`CheckpointError` listing all of them.
"""

import collections
import math
import os
import pathlib
import re
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from kaojax.convert.dinov2 import count_layers, map_dinov2_original
from kaojax.convert.torch_state import (CheckpointError, StateMapping, assign_state,
                                        converter_parser, linear_kernel, param_shapes,
                                        read_json, read_state_dict)

ENCODER = "encoder.model."
# DINOv2 hub names -> attention heads (head dim 64 in every released model).
DINOV2_HEADS = {"dinov2_vits14": 6, "dinov2_vitb14": 12, "dinov2_vitl14": 16,
                "dinov2_vitg14": 24}
# Released OpenLRM sizes (transformer width) -> source image size.
OPENLRM_IMAGE_SIZE = {512: 224, 768: 336, 1024: 448}
COMMON_ALLOW = (ENCODER + "mask_token",)
KAOLRM_ALLOW = COMMON_ALLOW + ("synthesizer.*", "flame_model.*")


# ----------------------------------------------------------------------------
# Configs from state dict shapes.


def lrm_config_from_state(state: Mapping[str, np.ndarray], image_size: int,
                          encoder_heads: Optional[int] = None, heads: Optional[int] = None,
                          **overrides):
  """An LRMConfig whose sizes are read from the state dict shapes. Head counts are not
  recoverable from shapes: they default to width / 64 (every released model)."""
  from kaojax.models.dinov2 import Dinov2Config
  from kaojax.models.lrm import LRMConfig
  _require(state, ["pos_embed", ENCODER + "cls_token", ENCODER + "blocks.0.mlp.fc1.weight",
                   ENCODER + "patch_embed.proj.weight", "camera_embedder.mlp.0.weight",
                   "upsampler.weight"])
  enc_dim = state[ENCODER + "cls_token"].shape[-1]
  regs = state.get(ENCODER + "register_tokens")
  encoder = Dinov2Config(
      dim=enc_dim, depth=count_layers(state, ENCODER + "blocks.", "norm1.weight"),
      heads=encoder_heads or _default_heads(enc_dim, "encoder"),
      mlp_ratio=_agreed_width(state, re.escape(ENCODER)
                              + r"blocks\.\d+\.mlp\.(fc1\.weight|fc1\.bias|fc2\.weight)") / enc_dim,
      patch=state[ENCODER + "patch_embed.proj.weight"].shape[-1],
      num_registers=0 if regs is None else regs.shape[1], image_size=image_size,
      **{k: v for k, v in overrides.items() if k in ("efficient_attention", "remat", "dtype")})
  dim = state["pos_embed"].shape[-1]
  low = math.isqrt(state["pos_embed"].shape[1] // 3)
  hidden = _agreed_width(state, r"transformer\.layers\.\d+\.mlp\.(0\.weight|0\.bias|3\.weight)")
  return LRMConfig(
      encoder=encoder, dim=dim, layers=count_layers(state, "transformer.layers.", "norm1.norm.weight"),
      heads=heads or _default_heads(dim, "transformer"), camera_dim=state["camera_embedder.mlp.0.weight"].shape[0],
      triplane_low=low, triplane_high=2 * low, triplane_dim=state["upsampler.weight"].shape[1],
      mlp_ratio=4.0 if hidden is None else hidden / dim, **overrides)


def _agreed_width(state, pattern: str) -> Optional[int]:
  """The feed-forward width most keys matching `pattern` carry (rows of a first
  layer's weight and bias, columns of a second layer's weight), so that one damaged
  tensor is reported as mis-shaped itself instead of mis-sizing the whole model."""
  widths = [np.shape(v)[1 if k.endswith("3.weight") or k.endswith("fc2.weight") else 0]
            for k, v in state.items() if re.fullmatch(pattern, k) and np.ndim(v) >= 1]
  return collections.Counter(widths).most_common(1)[0][0] if widths else None


def _default_heads(width: int, what: str) -> int:
  if width % 64:
    raise ValueError(f"{what} width {width} is not a multiple of the released head dim 64: "
                     f"give the head count (config.json or {what} heads argument)")
  return width // 64


def lrm_config_from_json(config: Mapping, state: Mapping[str, np.ndarray],
                         image_size: Optional[int] = None, encoder_heads: Optional[int] = None,
                         heads: Optional[int] = None, **overrides):
  """An LRMConfig from OpenLRM's config.json (head counts; its sizes are checked
  against the state dict's shapes) and the state shapes. `encoder_heads` / `heads`
  replace the head counts config.json implies."""
  name = config.get("encoder_model_name", "")
  base = name[:-4] if name.endswith("_reg") else name
  if config.get("encoder_type", "dinov2") != "dinov2" or base not in DINOV2_HEADS:
    raise ValueError(f"config.json: unsupported OpenLRM encoder "
                     f"{config.get('encoder_type')}/{name} (DINOv2 ViT-*/14 only)")
  dim = config.get("transformer_dim", state["pos_embed"].shape[-1])
  if image_size is None:
    if dim not in OPENLRM_IMAGE_SIZE:
      raise ValueError(f"no default input size for transformer width {dim}: pass image_size")
    image_size = OPENLRM_IMAGE_SIZE[dim]
  cfg = lrm_config_from_state(state, image_size, encoder_heads or DINOV2_HEADS[base],
                              heads or config.get("transformer_heads"), **overrides)
  stated = {"transformer_dim": cfg.dim, "transformer_layers": cfg.layers,
            "triplane_dim": cfg.triplane_dim, "triplane_low_res": cfg.triplane_low,
            "triplane_high_res": cfg.triplane_high, "camera_embed_dim": cfg.camera_dim,
            "encoder_feat_dim": cfg.encoder.dim}
  clashes = [f"{k}: config.json says {config[k]}, the weights have {v}"
             for k, v in stated.items() if k in config and config[k] != v]
  if clashes:
    raise CheckpointError("config.json does not match the checkpoint:\n  " + "\n  ".join(clashes))
  return cfg


def _require(state, keys):
  missing = [k for k in keys if k not in state]
  if missing:
    raise CheckpointError("not an OpenLRM/KaoLRM state dict; missing keys:\n  "
                          + "\n  ".join(missing))


# ----------------------------------------------------------------------------
# Key mappings.


def _linear(m: StateMapping, key: str, dest: tuple, bias: bool = True):
  w = m.take(key + ".weight")
  m.put(dest + ("kernel",), None if w is None else linear_kernel(w), key + ".weight")
  if bias:
    m.put(dest + ("bias",), m.take(key + ".bias"), key + ".bias")


def _norm(m: StateMapping, key: str, dest: tuple):
  m.put(dest + ("scale",), m.take(key + ".weight"), key + ".weight")
  m.put(dest + ("bias",), m.take(key + ".bias"), key + ".bias")


def _attention(m: StateMapping, key: str, dest: tuple):
  """nn.MultiheadAttention(bias=False), packed or separate q/k/v."""
  if key + ".in_proj_weight" in m.state:
    w = m.take(key + ".in_proj_weight")
    if w.ndim != 2 or w.shape[0] % 3:
      m.malformed_key(key + ".in_proj_weight",
                      f"shape {tuple(w.shape)}, expected [3 x width, width] (q|k|v rows)")
      return
    for name, part in zip("qkv", np.split(w, 3, axis=0)):
      m.put(dest + (name, "kernel"), linear_kernel(part), key + ".in_proj_weight")
  else:
    for name in "qkv":
      w = m.take(f"{key}.{name}_proj_weight")
      m.put(dest + (name, "kernel"), None if w is None else linear_kernel(w),
            f"{key}.{name}_proj_weight")
  _linear(m, key + ".out_proj", dest + ("out",), bias=False)


BACKBONE = ("backbone",)   # where both models hold their OpenLRMBackbone


def map_openlrm_backbone(m: StateMapping, cfg):
  """Encoder, camera embedder, transformer and upsampler (the OpenLRMBackbone both
  models hold)."""
  b = BACKBONE
  map_dinov2_original(m, ENCODER, b + ("encoder",), cfg.encoder.grid, cfg.encoder.depth,
                      cfg.encoder.num_registers)
  _linear(m, "camera_embedder.mlp.0", b + ("camera_embedder", "fc1"))
  _linear(m, "camera_embedder.mlp.2", b + ("camera_embedder", "fc2"))
  m.put(b + ("transformer", "pos_embed"), m.take("pos_embed"), "pos_embed")
  for i in range(cfg.layers):
    k, d = f"transformer.layers.{i}.", b + ("transformer", "layers", str(i))
    for n in ("norm1", "norm2", "norm3"):
      _norm(m, k + n + ".norm", d + (n, "norm"))
      _linear(m, k + n + ".mlp.1", d + (n, "modulation"))
    _attention(m, k + "cross_attn", d + ("cross_attn",))
    _attention(m, k + "self_attn", d + ("self_attn",))
    _linear(m, k + "mlp.0", d + ("fc1",))
    _linear(m, k + "mlp.3", d + ("fc2",))
  _norm(m, "transformer.norm", b + ("transformer", "norm"))
  w = m.take("upsampler.weight")   # [D, C, 2, 2] -> [D, 2, 2, C]
  m.put(b + ("upsampler", "kernel"), None if w is None else np.transpose(w, (0, 2, 3, 1)),
        "upsampler.weight")
  m.put(b + ("upsampler", "bias"), m.take("upsampler.bias"), "upsampler.bias")


def map_point_decoder(m: StateMapping, key: str, dest: tuple, count: int = 4):
  for i in range(count):
    _linear(m, f"{key}.{2 * i}", dest + ("layers", str(i)))


def load_openlrm_state(model, state: Mapping[str, np.ndarray],
                       source: str = "OpenLRM checkpoint") -> None:
  """Load an OpenLRM state dict into a `kaojax.models.lrm.OpenLRM` (in place)."""
  m = StateMapping(state, source, allow=COMMON_ALLOW)
  map_openlrm_backbone(m, model.cfg)
  if model.synthesizer is not None:
    map_point_decoder(m, "synthesizer.decoder.net", ("synthesizer",))
  assign_state(model, m.finish(param_shapes(model)))


def openlrm_from_state(state: Mapping[str, np.ndarray], config: Optional[Mapping] = None,
                       image_size: Optional[int] = None, source: str = "OpenLRM checkpoint",
                       **overrides):
  """An `OpenLRM` holding an OpenLRM state dict; `config` is config.json's dict
  (head counts), else heads are width / 64."""
  from kaojax.models.lrm import OpenLRM
  if config is not None:
    cfg = lrm_config_from_json(config, state, image_size, **overrides)
  else:
    _require(state, ["pos_embed"])
    if image_size is None:
      dim = state["pos_embed"].shape[-1]
      if dim not in OPENLRM_IMAGE_SIZE:
        raise ValueError(f"no config.json and no default input size for width {dim}")
      image_size = OPENLRM_IMAGE_SIZE[dim]
    cfg = lrm_config_from_state(state, image_size, **overrides)
  # Built abstractly (no random init of the weights about to be overwritten).
  model = nnx.eval_shape(lambda: OpenLRM(cfg, nnx.Rngs(0)))
  load_openlrm_state(model, state, source)
  return model


# ----------------------------------------------------------------------------
# KaoLRM.

FLAME_DECODER = "flame_decoder.decoder."
GAUSSIAN_DECODER = "gaussian_decoder.decoder.net"


def kaolrm_config_from_state(state: Mapping[str, np.ndarray], image_size: int = 224,
                             encoder_heads: Optional[int] = None, heads: Optional[int] = None,
                             n_shape: int = 100, n_expr: int = 50,
                             config: Optional[Mapping] = None, **kaolrm_overrides):
  """A KaoLRMConfig with every width read from the state dict shapes (backbone,
  FLAME decoder widths, Gaussian decoder hidden width); encoder/upsampler frozen.
  Head counts: from an OpenLRM-style `config` dict (encoder_model_name,
  transformer_heads) or the arguments (which take precedence), else width / 64."""
  import dataclasses
  from kaojax.models.kaolrm import KaoLRMConfig
  _require(state, [FLAME_DECODER + k for k in ("0.weight", "2.weight", "4.fc.0.weight",
                                                 "5.weight", "7.weight")]
           + [GAUSSIAN_DECODER + ".0.weight"])
  if config is not None:
    lrm = lrm_config_from_json(config, state, image_size, encoder_heads, heads)
  else:
    lrm = lrm_config_from_state(state, image_size, encoder_heads, heads)
  lrm = dataclasses.replace(lrm, freeze_encoder=True, freeze_upsampler=True)
  cfg = KaoLRMConfig(
      lrm=lrm, n_shape=n_shape, n_expr=n_expr,
      flame_hidden=tuple(state[FLAME_DECODER + f"{i}.weight"].shape[0] for i in (0, 2, 5)),
      gating_hidden=state[FLAME_DECODER + "4.fc.0.weight"].shape[0],
      gaussian_hidden=state[GAUSSIAN_DECODER + ".0.weight"].shape[0], **kaolrm_overrides)
  out = state[FLAME_DECODER + "7.weight"].shape[0]
  if out != cfg.flame_out:
    raise CheckpointError(f"{FLAME_DECODER}7.weight has {out} outputs; {n_shape} shape + "
                          f"{n_expr} expression + 10 = {cfg.flame_out} expected")
  return cfg


def map_flame_decoder(m: StateMapping, dest: tuple = ("flame_decoder",)):
  for key, name in (("0", "fc1"), ("2", "fc2"), ("4.fc.0", "gate_down"), ("4.fc.2", "gate_up"),
                    ("5", "fc3"), ("7", "fc4")):
    _linear(m, FLAME_DECODER + key, dest + (name,))


def map_gaussian_decoder(m: StateMapping, dest: tuple = ("gaussian_decoder", "decoder")):
  map_point_decoder(m, GAUSSIAN_DECODER, dest)


def load_kaolrm_state(model, state: Mapping[str, np.ndarray],
                      source: str = "KaoLRM checkpoint") -> None:
  """Load a KaoLRM state dict into a `kaojax.models.kaolrm.KaoLRM` (in place)."""
  m = StateMapping(state, source, allow=KAOLRM_ALLOW)
  map_openlrm_backbone(m, model.cfg.lrm)
  map_flame_decoder(m)
  map_gaussian_decoder(m)
  assign_state(model, m.finish(param_shapes(model)))


def kaolrm_from_state(state: Mapping[str, np.ndarray], image_size: int = 224, flame=None,
                      masks=None, source: str = "KaoLRM checkpoint",
                      config: Optional[Mapping] = None, **overrides):
  """A `KaoLRM` holding a KaoLRM state dict. The FLAME model comes from the
  checkpoint's `flame_model.*` buffers unless `flame` is given; `config`: an
  optional OpenLRM-style config.json dict (head counts)."""
  from kaojax.flame import load_flame_from_kaolrm_state
  from kaojax.models.kaolrm import KaoLRM
  cfg = kaolrm_config_from_state(state, image_size, config=config, **overrides)
  if flame is None:
    flame = load_flame_from_kaolrm_state(state, cfg.n_shape, cfg.n_expr, masks=masks)
  model = KaoLRM.abstract(cfg, flame)
  load_kaolrm_state(model, state, source)
  return model


def kaolrm_init_config(state: Mapping[str, np.ndarray], config: Optional[Mapping] = None,
                       image_size: int = 224, encoder_heads: Optional[int] = None,
                       heads: Optional[int] = None, **kaolrm_overrides):
  """The KaoLRMConfig KaoLRM trains from an OpenLRM state dict: its backbone sizes
  (heads from the arguments, else config.json when given, else width / 64), 224 px
  input, frozen encoder and upsampler, KaoLRM's decoder widths (`kaolrm_overrides`
  replace fields)."""
  import dataclasses
  from kaojax.models.kaolrm import KaoLRMConfig
  if config is not None:
    lrm = lrm_config_from_json(config, state, image_size, encoder_heads, heads)
  else:
    lrm = lrm_config_from_state(state, image_size, encoder_heads, heads)
  lrm = dataclasses.replace(lrm, freeze_encoder=True, freeze_upsampler=True)
  return KaoLRMConfig(lrm=lrm, **kaolrm_overrides)


def kaolrm_from_openlrm(state: Mapping[str, np.ndarray], cfg, flame,
                        rngs: Optional[nnx.Rngs] = None,
                        source: str = "OpenLRM checkpoint"):
  """KaoLRM's starting point: the backbone from an OpenLRM state dict (its
  `synthesizer.*` unused), FLAME and Gaussian decoders freshly initialised
  (PyTorch default init; zero biases in the Gaussian decoder)."""
  from kaojax.models.kaolrm import KaoLRM
  # Built abstractly: the backbone is never randomly initialised, only the decoders.
  model = KaoLRM.abstract(cfg, flame)
  model.init_decoders(rngs or nnx.Rngs(0))
  m = StateMapping(state, source, allow=COMMON_ALLOW + ("synthesizer.*",))
  map_openlrm_backbone(m, cfg.lrm)
  shapes = {p: s for p, s in param_shapes(model).items() if p[:len(BACKBONE)] == BACKBONE}
  assign_state(model, m.finish(shapes), scope=BACKBONE)
  return model


def load_kaolrm_init(path: Union[str, os.PathLike], flame, image_size: int = 224, seed: int = 0,
                     encoder_heads: Optional[int] = None, heads: Optional[int] = None,
                     **kaolrm_overrides):
  """`kaolrm_from_openlrm` on an OpenLRM checkpoint file or folder (config.json
  read when present)."""
  path = pathlib.Path(path)
  folder = path if path.is_dir() else path.parent
  state = read_state_dict(path)
  cfg = kaolrm_init_config(state, read_json(folder / "config.json"), image_size,
                           encoder_heads, heads, **kaolrm_overrides)
  return kaolrm_from_openlrm(state, cfg, flame, nnx.Rngs(seed), str(path))


# ----------------------------------------------------------------------------
# Command line: convert once, save a model directory (kaojax.models.loading).

KINDS = ("auto", "openlrm", "kaolrm", "kaolrm-init")


def convert(src, out, kind: str = "auto", image_size: Optional[int] = None, flame=None,
            masks=None, seed: int = 0, overwrite: bool = False,
            encoder_heads: Optional[int] = None, heads: Optional[int] = None):
  """Convert checkpoint `src` and save it with `kaojax.models.loading.save_model`.

  kind: 'openlrm' (OpenLRM with its NeRF decoder), 'kaolrm' (a released KaoLRM
  checkpoint; the FLAME model from its `flame_model.*` buffers unless `flame` is a
  FLAME file), 'kaolrm-init' (KaoLRM's training start from an OpenLRM checkpoint;
  needs `flame`), or 'auto' (kaolrm when `flame_decoder.*` keys are present, else
  openlrm). encoder_heads / heads: attention head counts when neither config.json
  nor width / 64 gives them. Returns the saved model."""
  from kaojax.models.loading import save_model
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  src = pathlib.Path(src)
  flame_model = None
  if flame is not None:
    from kaojax.flame import load_flame
    flame_model = load_flame(flame, masks=masks)
  if kind == "kaolrm-init":
    if flame_model is None:
      raise ValueError("--kind kaolrm-init needs --flame (OpenLRM checkpoints hold no FLAME model)")
    model = load_kaolrm_init(src, flame_model, image_size or 224, seed,
                             encoder_heads=encoder_heads, heads=heads)
  else:
    state = read_state_dict(src)
    if kind == "auto":
      kind = "kaolrm" if any(k.startswith("flame_decoder.") for k in state) else "openlrm"
    config = read_json((src if src.is_dir() else src.parent) / "config.json")
    if kind == "kaolrm":
      model = kaolrm_from_state(state, image_size or 224, flame_model, masks, str(src), config,
                                encoder_heads=encoder_heads, heads=heads)
    else:
      model = openlrm_from_state(state, config, image_size, str(src),
                                 encoder_heads=encoder_heads, heads=heads)
  save_model(out, model, overwrite=overwrite)
  return model


def main(argv=None):
  parser = converter_parser(
      "openlrm", "Convert an OpenLRM / KaoLRM PyTorch checkpoint into a kaojax model "
      "directory (kaojax.models.loading.load_model; config.init.converted_model).",
      "model.safetensors, pytorch_model.bin or a folder holding one (and config.json)")
  parser.add_argument("--kind", default="auto", choices=KINDS)
  parser.add_argument("--image-size", type=int, default=None,
                      help="fixed input size (default: OpenLRM's per size, 224 for KaoLRM)")
  parser.add_argument("--flame", default=None, help="FLAME model file/folder (kaolrm-init, "
                      "or to replace a KaoLRM checkpoint's FLAME buffers)")
  parser.add_argument("--masks", default=None, help="FLAME_masks.pkl (facial region)")
  parser.add_argument("--seed", type=int, default=0, help="decoder init seed (kaolrm-init)")
  parser.add_argument("--encoder-heads", type=int, default=None,
                      help="encoder attention heads (default: from config.json / width 64)")
  parser.add_argument("--heads", type=int, default=None,
                      help="transformer attention heads (default: config.json / width / 64)")
  args = parser.parse_args(argv)
  model = convert(args.src, args.out, args.kind, args.image_size, args.flame, args.masks,
                  args.seed, args.overwrite, args.encoder_heads, args.heads)
  count = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  print(f"saved {type(model).__name__} ({count:,} parameters) to {args.out}")


if __name__ == "__main__":
  main()
