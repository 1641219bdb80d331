"""GS-LRM: multi-view images + cameras -> pixel-aligned 3D Gaussians (FaceLift's
reconstructor).

Pipeline (shapes for B scenes of V views, H x W pixels, patch p, width D):
  images [B, V, H, W, 3] in [0, 1], c2w [B, V, 4, 4] (OpenCV), K [B, V, 3, 3]
  -> 9-channel ray encoding [B, V, H, W, 9] (2 rgb - 1, unit ray direction, the ray's
     point nearest the world origin; `kaojax.geometry.rays.facelift_ray_encoding`)
  -> patchify, each patch flattened (ph, pw, c) with c fastest -> Linear (no bias)
     -> [B, V*(H/p)*(W/p), D]
  -> [G learned global tokens ; image tokens] -> LayerNorm -> pre-LN transformer
     (full attention over all views, no biases anywhere, LayerNorms without bias)
  -> globals: LN -> Linear(D, 14); image tokens: LN -> Linear(D, p*p*14) unpacked to
     one Gaussian per pixel in (view, patch-row, patch-col, ph, pw) order
  -> activations (see `GSLRMOutput`).

A raw Gaussian row is [xyz 3, f_dc 3, scale 3, rotation 4 (w, x, y, z), opacity 1].
"""

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaojax.geometry.rays import facelift_ray_encoding, pixel_rays
from kaojax.models.presets import preset
from kaojax.nn.attention import dot_product_attention
from kaojax.nn.layers import layer_norm, linear
from kaojax.nn.remat import remat_scan
from kaojax.render.gaussians import Gaussians
from kaojax.sharding import EMBED, HEADS, MLP_HIDDEN

SH_C0 = 0.28209479177387814     # degree-0 real spherical harmonic
RAW_CHANNELS = 14               # xyz 3 + f_dc 3 + scale 3 + rotation 4 + opacity 1


@dataclasses.dataclass(frozen=True)
class GSLRMConfig:
  dim: int = 1024
  heads: int = 16
  head_dim: int = 64
  layers: int = 24
  patch: int = 8
  in_channels: int = 9
  num_global: int = 2             # learned global Gaussian tokens
  mlp_ratio: int = 4
  ln_eps: float = 1e-5
  depth_preact_bias: float = 0.0  # added to the mean xyz logit before the sigmoid
  depth_range: float = 1.8        # t = (2 sigmoid(.) - 1) * depth_range + (-o.d)
  attention_chunk: Optional[int] = 1024   # query block size (memory), None: one block
  remat: bool = False             # recompute each block's activations in the backward pass
  dtype: str = "float32"


PRESETS = {
    "tiny": GSLRMConfig(dim=64, heads=2, head_dim=32, layers=1, patch=8),   # CPU tests
    "small": GSLRMConfig(dim=512, heads=8, head_dim=64, layers=6, patch=8),
    "facelift": GSLRMConfig(),                                               # released
}


def gslrm_config(name: str = "facelift", **overrides) -> GSLRMConfig:
  """GS-LRM presets: 'tiny' (random-weight CPU tests), 'small' (6 layers of width
  512, benchmarks) or 'facelift' (the released model: width 1024, 24 layers, 16
  heads, patch 8). `overrides` replace GSLRMConfig fields."""
  return preset("GS-LRM", PRESETS, name, overrides)


@flax.struct.dataclass
class GSLRMOutput:
  """Every array has N = num_global + V*H*W Gaussians (globals first).

  posed_images: [B, V, H, W, 9] transformer input
  tokens:       [B, num_global + V*(H/p)*(W/p), D] after the last block (no final norm)
  raw:          [B, N, 14] head outputs before activations
  xyz:          [B, N, 3] globals raw; pixels o + t d,
                t = (2 sigmoid(mean(raw xyz) + bias) - 1) * depth_range + (-o.d)
  scales:       [B, N, 3] exp(min(raw - 2.3, -1.2))
  rotations:    [B, N, 4] normalised (w, x, y, z)
  opacities:    [B, N]    sigmoid(raw - 2)
  colors:       [B, N, 3] max(SH_C0 f_dc + 0.5, 0)
  f_dc:         [B, N, 3] raw SH degree-0 coefficients (for .ply export)
  """
  posed_images: jax.Array
  tokens: jax.Array
  raw: jax.Array
  xyz: jax.Array
  scales: jax.Array
  rotations: jax.Array
  opacities: jax.Array
  colors: jax.Array
  f_dc: jax.Array

  def gaussians(self) -> Gaussians:
    return Gaussians(means=self.xyz, quats=self.rotations, scales=self.scales,
                     opacities=self.opacities, colors=self.colors)


def _linear(d_in, d_out, axes, rngs, dtype):
  """GS-LRM's Linear: no bias, N(0, 0.02) kernel."""
  return linear(d_in, d_out, axes, rngs, use_bias=False, dtype=dtype, init=0.02)


def _norm(dim, eps, rngs, dtype):
  """GS-LRM's LayerNorm: no bias."""
  return layer_norm(dim, eps, rngs, dtype, use_bias=False)


class SelfAttention(nnx.Module):
  """Fused q|k|v projection (no bias), softmax(q k^T / sqrt(head_dim)) v, output fc."""

  def __init__(self, cfg: GSLRMConfig, rngs: nnx.Rngs, dtype=None):
    self.heads, self.head_dim = cfg.heads, cfg.head_dim
    self.query_chunk = cfg.attention_chunk
    inner = cfg.heads * cfg.head_dim
    self.to_qkv = _linear(cfg.dim, 3 * inner, (EMBED, HEADS), rngs, dtype)
    self.fc = _linear(inner, cfg.dim, (HEADS, EMBED), rngs, dtype)

  def __call__(self, x):
    """x [B, L, D] -> [B, L, D]."""
    b, n, _ = x.shape
    q, k, v = jnp.split(self.to_qkv(x), 3, axis=-1)
    shape = (b, n, self.heads, self.head_dim)
    out = dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                query_chunk=self.query_chunk)
    return self.fc(out.reshape(b, n, self.heads * self.head_dim))


class FeedForward(nnx.Module):
  """fc2(GELU(fc1(x))), hidden width mlp_ratio * dim (the reference's `mlp.mlp.0/2`)."""

  def __init__(self, cfg: GSLRMConfig, rngs: nnx.Rngs, dtype=None):
    hidden = cfg.mlp_ratio * cfg.dim
    self.fc1 = _linear(cfg.dim, hidden, (EMBED, MLP_HIDDEN), rngs, dtype)
    self.fc2 = _linear(hidden, cfg.dim, (MLP_HIDDEN, EMBED), rngs, dtype)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """x += Attn(LN1(x)); x += FeedForward(LN2(x))."""

  def __init__(self, cfg: GSLRMConfig, rngs: nnx.Rngs, dtype=None):
    self.norm1 = _norm(cfg.dim, cfg.ln_eps, rngs, dtype)
    self.attn = SelfAttention(cfg, rngs, dtype)
    self.norm2 = _norm(cfg.dim, cfg.ln_eps, rngs, dtype)
    self.mlp = FeedForward(cfg, rngs, dtype)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def patchify(x, patch: int):
  """[B, V, H, W, C] -> [B, V*(H/p)*(W/p), p*p*C], tokens in (view, row, col) order and
  each patch flattened (ph, pw, c) with c fastest."""
  b, v, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
  x = x.reshape(b, v, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, v * (h // patch) * (w // patch), patch * patch * c)


def pixel_order(x, patch: int):
  """Per-pixel values [B, V, H, W, C] -> [B, V*H*W, C] in the Gaussian order
  (view, patch-row, patch-col, ph, pw)."""
  b, c = x.shape[0], x.shape[-1]
  return patchify(x, patch).reshape(b, -1, c)


class GSLRM(nnx.Module):

  def __init__(self, cfg: GSLRMConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    patch_dim = cfg.in_channels * cfg.patch * cfg.patch
    self.patch_embedder = _linear(patch_dim, cfg.dim, (None, EMBED), rngs, dtype)
    self.global_tokens = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (cfg.num_global, cfg.dim), jnp.float32),
        out_sharding=(None, EMBED), eager_sharding=False)
    self.input_norm = _norm(cfg.dim, cfg.ln_eps, rngs, dtype)
    self.blocks = nnx.List([Block(cfg, rngs, dtype) for _ in range(cfg.layers)])
    self.global_norm = _norm(cfg.dim, cfg.ln_eps, rngs, dtype)
    self.global_head = _linear(cfg.dim, RAW_CHANNELS, (EMBED, None), rngs, dtype)
    self.pixel_norm = _norm(cfg.dim, cfg.ln_eps, rngs, dtype)
    self.pixel_head = _linear(cfg.dim, cfg.patch * cfg.patch * RAW_CHANNELS, (EMBED, None),
                              rngs, dtype)

  def __call__(self, images, c2w, K) -> GSLRMOutput:
    """images [B, V, H, W, 3] in [0, 1]; c2w [B, V, 4, 4] OpenCV camera-to-world;
    K [B, V, 3, 3] pixel intrinsics."""
    cfg = self.cfg
    if images.ndim != 5 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, V, H, W, 3], got {images.shape}")
    b, v, h, w, _ = images.shape
    posed = facelift_ray_encoding(images.astype(jnp.float32), c2w, K)   # [B, V, H, W, 9]
    if posed.shape[-1] != cfg.in_channels:
      raise ValueError(f"ray encoding has {posed.shape[-1]} channels, config says "
                       f"in_channels={cfg.in_channels}")
    tokens = self.patch_embedder(patchify(posed, cfg.patch))
    globals_ = jnp.broadcast_to(self.global_tokens[...].astype(tokens.dtype),
                                (b, cfg.num_global, cfg.dim))
    x = self.input_norm(jnp.concatenate([globals_, tokens], axis=1))
    if cfg.remat:
      x = remat_scan(list(self.blocks), x)
    else:
      for block in self.blocks:
        x = block(x)

    raw_global = self.global_head(self.global_norm(x[:, :cfg.num_global]))
    raw_pixel = self.pixel_head(self.pixel_norm(x[:, cfg.num_global:]))
    raw_pixel = raw_pixel.reshape(b, v * h * w, RAW_CHANNELS)   # (.., ph, pw, 14)
    raw = jnp.concatenate([raw_global, raw_pixel], axis=1).astype(jnp.float32)

    origins, dirs = pixel_rays(c2w, K, w, h)                      # [B, V, H, W, 3]
    origins, dirs = pixel_order(origins, cfg.patch), pixel_order(dirs, cfg.patch)
    xyz_raw, f_dc, scale_raw, rot_raw, opacity_raw = jnp.split(raw, [3, 6, 9, 13], axis=-1)
    depth = jax.nn.sigmoid(xyz_raw[:, cfg.num_global:].mean(-1, keepdims=True)
                           + cfg.depth_preact_bias)
    t = (2.0 * depth - 1.0) * cfg.depth_range - jnp.sum(origins * dirs, -1, keepdims=True)
    xyz = jnp.concatenate([xyz_raw[:, :cfg.num_global], origins + t * dirs], axis=1)
    rotations = rot_raw / jnp.maximum(jnp.linalg.norm(rot_raw, axis=-1, keepdims=True), 1e-12)
    return GSLRMOutput(
        posed_images=posed, tokens=x, raw=raw, xyz=xyz,
        scales=jnp.exp(jnp.minimum(scale_raw - 2.3, -1.2)),
        rotations=rotations,
        opacities=jax.nn.sigmoid(opacity_raw[..., 0] - 2.0),
        colors=jnp.maximum(SH_C0 * f_dc + 0.5, 0.0),
        f_dc=f_dc)


# ----------------------------------------------------------------------------
# Post-filter before export (FaceLift's release, Z-up head world).


@dataclasses.dataclass(frozen=True)
class PostFilter:
  min_opacity: float = 0.04       # keep opacity > min_opacity
  max_scale: float = 0.1          # drop max scale >= max_scale unless z > 0
  floater_xy: float = 0.6         # drop |x| > a and |y| > a and z < -a
  crop_xy: float = 0.91           # keep x, y in [-crop_xy, crop_xy]
  crop_z: float = 1.0             # keep z in [-crop_z, crop_z]


def post_filter_mask(xyz, scales, opacities, cfg: PostFilter = PostFilter()):
  """xyz [..., N, 3], scales [..., N, 3], opacities [..., N] -> keep mask [..., N]."""
  x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
  keep = opacities > cfg.min_opacity
  keep &= ~((jnp.max(scales, -1) >= cfg.max_scale) & ~(z > 0))
  keep &= ~((jnp.abs(x) > cfg.floater_xy) & (jnp.abs(y) > cfg.floater_xy) & (z < -cfg.floater_xy))
  keep &= (jnp.abs(x) <= cfg.crop_xy) & (jnp.abs(y) <= cfg.crop_xy) & (jnp.abs(z) <= cfg.crop_z)
  return keep


def select(tree, mask):
  """Keep the rows of every [N, ...] leaf of a pytree where mask [N] is true (NumPy,
  variable size: not jittable)."""
  mask = np.asarray(mask)
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[mask], tree)
