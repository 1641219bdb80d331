"""The SD2.1 VAE (diffusers AutoencoderKL), NHWC.

encode: image [N, H, W, 3] in [-1, 1] -> conv_in -> down blocks (resnets, then a
  stride-2 conv after right/bottom zero padding) -> mid block (resnet, single-head
  attention with GroupNorm and residual, resnet) -> GroupNorm, SiLU, conv_out
  -> quant_conv -> (mean, logvar clamped to [-30, 20]) each [N, H/f, W/f, latent]
decode: z -> post_quant_conv -> conv_in -> mid block -> up blocks (resnets,
  nearest x2 + conv) -> GroupNorm, SiLU, conv_out -> [N, H, W, 3].
Latents are scaled by `scaling_factor` (0.18215) outside, as in SD:
z = mean * 0.18215 (FaceLift conditions on the mode), image = decode(z / 0.18215).
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.models.mvdiffusion.attention import attention
from kaojax.models.mvdiffusion.layers import Downsample2D, ResnetBlock2D, Upsample2D
from kaojax.models.presets import preset
from kaojax.nn.layers import conv, group_norm, linear
from kaojax.sharding import EMBED, HEADS


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: str = "float32"

  @classmethod
  def from_diffusers(cls, config: dict, **overrides) -> "VAEConfig":
    for key, kinds in (("down_block_types", ("DownEncoderBlock2D",)),
                       ("up_block_types", ("UpDecoderBlock2D",))):
      bad = [t for t in config.get(key, []) if t not in kinds]
      if bad:
        raise ValueError(f"VAE config: {key} {bad} not supported (only {kinds})")
    if config.get("act_fn", "silu") != "silu":
      raise ValueError(f"VAE config: act_fn={config['act_fn']!r} not supported (only silu)")
    if config.get("shift_factor") not in (None, 0, 0.0):
      raise ValueError("VAE config: shift_factor is not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in names}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    if kwargs.get("scaling_factor") is None:
      kwargs.pop("scaling_factor", None)
    kwargs.update(overrides)
    return cls(**kwargs)


PRESETS = {
    "tiny": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "facelift": VAEConfig(),        # the SD2.1 VAE (released)
}


def vae_config(name: str = "facelift", **overrides) -> VAEConfig:
  """VAE presets: 'tiny' (2 levels, f = 2; CPU tests) or 'facelift' (SD2.1's VAE,
  f = 8). `overrides` replace VAEConfig fields."""
  return preset("VAE", PRESETS, name, overrides)


class SpatialSelfAttention(nnx.Module):
  """x + to_out(attn(GroupNorm(x))) over the H*W pixels, one head, q/k/v with bias."""

  def __init__(self, channels: int, groups: int, rngs: nnx.Rngs, dtype=None):
    self.group_norm = group_norm(channels, groups, 1e-6, rngs, dtype, axis=EMBED)
    qkv = lambda: linear(channels, channels, (EMBED, HEADS), rngs, dtype=dtype)
    self.to_q, self.to_k, self.to_v = qkv(), qkv(), qkv()
    self.to_out = nnx.List([linear(channels, channels, (HEADS, EMBED), rngs, dtype=dtype)])

  def __call__(self, x):
    n, h, w, c = x.shape
    t = self.group_norm(x).reshape(n, h * w, c)
    out = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
    return x + self.to_out[0](out).reshape(n, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, c: int, cfg: VAEConfig, rngs, dtype):
    g = cfg.norm_num_groups
    self.resnets = nnx.List([ResnetBlock2D(c, c, None, g, 1e-6, rngs, dtype) for _ in range(2)])
    self.attentions = nnx.List([SpatialSelfAttention(c, g, rngs, dtype)]
                               if cfg.mid_block_add_attention else [])

  def __call__(self, x):
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class EncoderBlock(nnx.Module):
  def __init__(self, c_in, c_out, add_downsample, cfg: VAEConfig, rngs, dtype):
    g = cfg.norm_num_groups
    self.resnets = nnx.List([ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, g, 1e-6,
                                           rngs, dtype) for i in range(cfg.layers_per_block)])
    self.downsamplers = nnx.List([Downsample2D(c_out, 0, rngs, dtype)] if add_downsample else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class DecoderBlock(nnx.Module):
  def __init__(self, c_in, c_out, add_upsample, cfg: VAEConfig, rngs, dtype):
    g = cfg.norm_num_groups
    self.resnets = nnx.List([ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, g, 1e-6,
                                           rngs, dtype) for i in range(cfg.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample2D(c_out, rngs, dtype)] if add_upsample else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs, dtype):
    boc = cfg.block_out_channels
    self.conv_in = conv(cfg.in_channels, boc[0], 3, rngs, dtype=dtype, axes=(None, EMBED))
    self.down_blocks = nnx.List([
        EncoderBlock(boc[max(i - 1, 0)], boc[i], i < len(boc) - 1, cfg, rngs, dtype)
        for i in range(len(boc))])
    self.mid_block = MidBlock(boc[-1], cfg, rngs, dtype)
    self.conv_norm_out = group_norm(boc[-1], cfg.norm_num_groups, 1e-6, rngs, dtype, axis=EMBED)
    self.conv_out = conv(boc[-1], 2 * cfg.latent_channels, 3, rngs, dtype=dtype,
                         axes=(EMBED, None))

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, rngs, dtype):
    rev = cfg.block_out_channels[::-1]
    self.conv_in = conv(cfg.latent_channels, rev[0], 3, rngs, dtype=dtype, axes=(None, EMBED))
    self.mid_block = MidBlock(rev[0], cfg, rngs, dtype)
    self.up_blocks = nnx.List([
        DecoderBlock(rev[max(i - 1, 0)], rev[i], i < len(rev) - 1, cfg, rngs, dtype)
        for i in range(len(rev))])
    self.conv_norm_out = group_norm(rev[-1], cfg.norm_num_groups, 1e-6, rngs, dtype, axis=EMBED)
    self.conv_out = conv(rev[-1], cfg.out_channels, 3, rngs, dtype=dtype, axes=(EMBED, None))

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAE(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    lat = cfg.latent_channels
    self.encoder = Encoder(cfg, rngs, dtype)
    self.decoder = Decoder(cfg, rngs, dtype)
    self.quant_conv = conv(2 * lat, 2 * lat, 1, rngs, dtype=dtype) if cfg.use_quant_conv else None
    self.post_quant_conv = (conv(lat, lat, 1, rngs, dtype=dtype)
                            if cfg.use_post_quant_conv else None)

  def encode(self, images):
    """images [N, H, W, C] in [-1, 1] -> (mean, logvar) [N, H/f, W/f, latent]."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def sample(self, images, key):
    """A draw from the posterior N(mean, exp(logvar))."""
    mean, logvar = self.encode(images)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

  def decode(self, z):
    """latents [N, h, w, latent] (unscaled) -> images [N, h*f, w*f, C] in about [-1, 1]."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)
