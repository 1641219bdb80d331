"""The Stable Diffusion 2.1 UNet (diffusers UNet2DConditionModel layout, NHWC) with
FaceLift's sparse multi-view self-attention in attn1 of every transformer block.

  sample [N, H, W, Cin] (N = B * num_views), timesteps [N] (or a scalar),
  text context [N, T, Dc], class_labels [N, Dp] (the "projection" class embedding:
  CLIP image embedding ++ noise-level embedding, added to the time embedding)
  -> conv_in -> down blocks (resnets [+ transformers], stride-2 conv) -> mid block
  (resnet, transformer, resnet) -> up blocks (resnets on [x ; skip], [+ transformers],
  nearest x2 + conv) -> GroupNorm, SiLU, conv_out -> [N, H, W, Cout].

Sizes come from a diffusers `config.json` (`UNetConfig.from_diffusers`); in diffusers'
naming, `attention_head_dim` holds the number of heads per block when
`num_attention_heads` is absent (SD2.1: [5, 10, 20, 20], head dim 64).
"""

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.models.mvdiffusion.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding,
                                              Upsample2D, timestep_embedding)
from kaojax.models.mvdiffusion.transformer import Transformer2D
from kaojax.models.presets import preset
from kaojax.nn.layers import conv, group_norm
from kaojax.nn.remat import remat_call
from kaojax.sharding import EMBED

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 8
  out_channels: int = 4
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  heads: Tuple[int, ...] = (5, 10, 20, 20)
  transformer_layers: Tuple[int, ...] = (1, 1, 1, 1)
  cross_attention_dim: int = 1024
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  class_embed_type: Optional[str] = "projection"
  projection_class_embeddings_input_dim: Optional[int] = 2048
  num_views: int = 6               # views per group in the multi-view attention
  attention_chunk: Optional[int] = None   # query block size in attention (memory)
  remat: bool = False              # recompute the transformers' activations in backward
  dtype: str = "float32"

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @classmethod
  def from_diffusers(cls, config: dict, num_views: int = 6, **overrides) -> "UNetConfig":
    """From a diffusers UNet2DConditionModel config.json dict. Raises ValueError naming
    the first unsupported setting."""
    unsupported = dict(center_input_sample=False, dual_cross_attention=False,
                       only_cross_attention=False, addition_embed_type=None,
                       num_class_embeds=None, resnet_time_scale_shift="default",
                       time_embedding_type="positional", time_cond_proj_dim=None,
                       encoder_hid_dim=None, attention_type="default",
                       class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
                       mid_block_type="UNetMidBlock2DCrossAttn", act_fn="silu",
                       time_embedding_dim=None, timestep_post_act=None,
                       time_embedding_act_fn=None, resnet_skip_time_act=False,
                       resnet_out_scale_factor=1.0, mid_block_scale_factor=1,
                       downsample_padding=1, cross_attention_norm=None)
    for key, want in unsupported.items():
      got = config.get(key, want)
      if isinstance(want, bool) and isinstance(got, (list, tuple)):
        got = any(got)
      if got != want:
        raise ValueError(f"UNet config: {key}={got!r} is not supported (only {want!r})")
    if config.get("class_embed_type") not in (None, "projection"):
      raise ValueError(f"UNet config: class_embed_type={config['class_embed_type']!r} is not "
                       "supported (only 'projection' or none)")
    boc = tuple(config.get("block_out_channels", cls.block_out_channels))
    nb = len(boc)

    def per_block(value, name):
      value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * nb
      if len(value) != nb:
        raise ValueError(f"UNet config: {name} has {len(value)} entries for {nb} blocks")
      return value

    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
      raise ValueError("UNet config: per-block layers_per_block is not supported")
    tl = config.get("transformer_layers_per_block", 1)
    if config.get("reverse_transformer_layers_per_block") is not None:
      raise ValueError("UNet config: reverse_transformer_layers_per_block is not supported")
    cross = config.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
      raise ValueError("UNet config: per-block cross_attention_dim is not supported")
    kwargs = dict(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        block_out_channels=boc,
        down_block_types=tuple(config.get("down_block_types", cls.down_block_types)),
        up_block_types=tuple(config.get("up_block_types", cls.up_block_types)),
        layers_per_block=layers, heads=per_block(heads, "attention heads"),
        transformer_layers=per_block(tl, "transformer_layers_per_block"),
        cross_attention_dim=cross, norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        class_embed_type=config.get("class_embed_type"),
        projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
        num_views=num_views)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers(self) -> dict:
    """The diffusers UNet2DConditionModel constructor arguments of this network
    (inverse of `from_diffusers`, up to `num_views` and the execution options)."""
    return dict(
        in_channels=self.in_channels, out_channels=self.out_channels,
        block_out_channels=self.block_out_channels, down_block_types=self.down_block_types,
        up_block_types=self.up_block_types, layers_per_block=self.layers_per_block,
        attention_head_dim=self.heads, transformer_layers_per_block=self.transformer_layers,
        cross_attention_dim=self.cross_attention_dim, norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps, flip_sin_to_cos=self.flip_sin_to_cos,
        freq_shift=self.freq_shift, class_embed_type=self.class_embed_type,
        projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim,
        use_linear_projection=True)

  def __post_init__(self):
    for t in self.down_block_types:
      if t not in _DOWN:
        raise ValueError(f"UNet config: down block type {t!r} not supported ({_DOWN})")
    for t in self.up_block_types:
      if t not in _UP:
        raise ValueError(f"UNet config: up block type {t!r} not supported ({_UP})")
    if self.class_embed_type == "projection" and not self.projection_class_embeddings_input_dim:
      raise ValueError("UNet config: class_embed_type 'projection' needs "
                       "projection_class_embeddings_input_dim")


PRESETS = {
    # FaceLift's structure at toy width (CPU tests): 8-channel input, projection class
    # embedding, one cross-attention level.
    "tiny": UNetConfig(block_out_channels=(32, 64),
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                       heads=(2, 4), transformer_layers=(1, 1), cross_attention_dim=24,
                       norm_num_groups=8, projection_class_embeddings_input_dim=32),
    # The released layout at a fifth of the width (benchmarks).
    "small": UNetConfig(block_out_channels=(64, 128, 256, 256), heads=(1, 2, 4, 4)),
    "facelift": UNetConfig(),       # SD2.1-unCLIP with 8 input channels (released)
}


def unet_config(name: str = "facelift", **overrides) -> UNetConfig:
  """UNet presets: 'tiny' (random-weight CPU tests), 'small' (benchmarks) or 'facelift'
  (the released SD2.1-unCLIP UNet with 8 input channels). `overrides` replace
  UNetConfig fields (e.g. num_views, dtype)."""
  return preset("UNet", PRESETS, name, overrides)


def attend(transformer, x, context, num_views, remat: bool):
  """transformer(x, context, num_views), rematerialised when `remat`."""
  if remat:
    return remat_call(transformer, x, context, num_views=num_views)
  return transformer(x, context, num_views)


class DownBlock(nnx.Module):
  def __init__(self, c_in, c_out, temb, cross: bool, heads, t_layers, add_downsample,
               cfg: UNetConfig, rngs, dtype):
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    self.resnets = nnx.List([ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb, g, eps, rngs,
                                           dtype) for i in range(cfg.layers_per_block)])
    self.attentions = nnx.List([
        Transformer2D(c_out, heads, cfg.cross_attention_dim, t_layers, g, rngs, dtype,
                      cfg.attention_chunk)
        for _ in range(cfg.layers_per_block)] if cross else [])
    self.downsamplers = nnx.List([Downsample2D(c_out, 1, rngs, dtype)] if add_downsample else [])
    self.remat = cfg.remat

  def __call__(self, x, temb, context, num_views):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if len(self.attentions):
        x = attend(self.attentions[i], x, context, num_views, self.remat)
      skips.append(x)
    for down in self.downsamplers:
      x = down(x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  def __init__(self, c, temb, heads, t_layers, cfg: UNetConfig, rngs, dtype):
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    self.resnets = nnx.List([ResnetBlock2D(c, c, temb, g, eps, rngs, dtype) for _ in range(2)])
    self.attentions = nnx.List([Transformer2D(c, heads, cfg.cross_attention_dim, t_layers, g,
                                              rngs, dtype, cfg.attention_chunk)])
    self.remat = cfg.remat

  def __call__(self, x, temb, context, num_views):
    x = self.resnets[0](x, temb)
    x = attend(self.attentions[0], x, context, num_views, self.remat)
    return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
  def __init__(self, c_in, c_prev, c_out, temb, cross: bool, heads, t_layers, add_upsample,
               cfg: UNetConfig, rngs, dtype):
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    n = cfg.layers_per_block + 1
    resnets = []
    for i in range(n):
      skip = c_in if i == n - 1 else c_out
      base = c_prev if i == 0 else c_out
      resnets.append(ResnetBlock2D(base + skip, c_out, temb, g, eps, rngs, dtype))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([
        Transformer2D(c_out, heads, cfg.cross_attention_dim, t_layers, g, rngs, dtype,
                      cfg.attention_chunk)
        for _ in range(n)] if cross else [])
    self.upsamplers = nnx.List([Upsample2D(c_out, rngs, dtype)] if add_upsample else [])
    self.remat = cfg.remat

  def __call__(self, x, skips, temb, context, num_views):
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
      if len(self.attentions):
        x = attend(self.attentions[i], x, context, num_views, self.remat)
    for up in self.upsamplers:
      x = up(x)
    return x


class UNet(nnx.Module):

  def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    boc, temb = cfg.block_out_channels, cfg.time_embed_dim
    self.conv_in = conv(cfg.in_channels, boc[0], 3, rngs, dtype=dtype, axes=(None, EMBED))
    self.time_embedding = TimestepEmbedding(boc[0], temb, rngs, dtype)
    self.class_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb,
                                              rngs, dtype)
                            if cfg.class_embed_type == "projection" else None)
    down = []
    c_out = boc[0]
    for i, kind in enumerate(cfg.down_block_types):
      c_in, c_out = c_out, boc[i]
      down.append(DownBlock(c_in, c_out, temb, kind.startswith("CrossAttn"), cfg.heads[i],
                            cfg.transformer_layers[i], i < len(boc) - 1, cfg, rngs, dtype))
    self.down_blocks = nnx.List(down)
    self.mid_block = MidBlock(boc[-1], temb, cfg.heads[-1], cfg.transformer_layers[-1], cfg,
                              rngs, dtype)
    rev, rev_heads = boc[::-1], cfg.heads[::-1]
    rev_layers = cfg.transformer_layers[::-1]
    up = []
    c_out = rev[0]
    for i, kind in enumerate(cfg.up_block_types):
      c_prev, c_out = c_out, rev[i]
      c_in = rev[min(i + 1, len(boc) - 1)]
      up.append(UpBlock(c_in, c_prev, c_out, temb, kind.startswith("CrossAttn"), rev_heads[i],
                        rev_layers[i], i < len(boc) - 1, cfg, rngs, dtype))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = group_norm(boc[0], cfg.norm_num_groups, cfg.norm_eps, rngs, dtype,
                                    axis=EMBED)
    self.conv_out = conv(boc[0], cfg.out_channels, 3, rngs, dtype=dtype, axes=(EMBED, None))

  def __call__(self, sample, timesteps, context, class_labels=None,
               num_views: Optional[int] = -1):
    """sample [N, H, W, Cin]; timesteps scalar or [N]; context [N, T, Dc];
    class_labels [N, Dp] (required with the projection class embedding).
    num_views: views per group for attn1 (-1: the config's; None: plain
    self-attention per image, i.e. the stock SD UNet)."""
    cfg = self.cfg
    if num_views == -1:
      num_views = cfg.num_views
    n = sample.shape[0]
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"sample must be [N, H, W, {cfg.in_channels}], got {sample.shape}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (n,))
    temb = self.time_embedding(
        timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                           cfg.freq_shift).astype(sample.dtype))
    if self.class_embedding is not None:
      if class_labels is None:
        raise ValueError("this UNet has a projection class embedding: pass class_labels")
      temb = temb + self.class_embedding(class_labels.astype(temb.dtype))

    x = self.conv_in(sample)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context, num_views)
      skips += block_skips
    x = self.mid_block(x, temb, context, num_views)
    for block in self.up_blocks:
      k = len(block.resnets)
      x = block(x, skips[-k:], temb, context, num_views)
      del skips[-k:]
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
