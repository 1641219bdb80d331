"""DINOv2 ViT/14 with register tokens, as used by OpenLRM and KaoLRM.

OpenLRM's semantics: the input is RGB in [0, 1] with NO mean/std normalisation;
the position table is stored already resized to the fixed patch grid (the converter
does the resize, see `kaojax.convert.dinov2`); register tokens follow CLS and get no
position embedding; the output is the final-LayerNorm'd [CLS, patches] with the
registers dropped. Blocks: pre-norm attention and MLP (exact GELU), each scaled by a
LayerScale vector; LayerNorm eps 1e-6.

Images are NHWC: [B, H, W, 3].
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.nn.attention import dot_product_attention
from kaojax.nn.remat import remat_scan
from kaojax.nn.layers import layer_norm, linear
from kaojax.sharding import EMBED, HEADS, MLP_HIDDEN


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  patch: int = 14
  num_registers: int = 4
  image_size: int = 224        # fixed input size; pos table has (image_size/patch)^2 + 1 rows
  ln_eps: float = 1e-6
  efficient_attention: bool = True
  remat: bool = False
  dtype: str = "float32"       # compute dtype
  # Initial position table: "normal" (DINOv2's truncated N(0, 0.02)) or "sincos" (a
  # fixed-scale 2D sine-cosine table, `sincos_positions`). Loaded weights replace it.
  position_init: str = "normal"

  @property
  def grid(self) -> int:
    if self.image_size % self.patch:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
    return self.image_size // self.patch


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init: float = 1.0):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32), out_sharding=(EMBED,),
                           eager_sharding=False)

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class ViTAttention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (with bias)."""

  def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
    self.heads = cfg.heads
    self.efficient = cfg.efficient_attention
    self.qkv = linear(cfg.dim, 3 * cfg.dim, (EMBED, HEADS), rngs, dtype=cfg.dtype)
    self.proj = linear(cfg.dim, cfg.dim, (HEADS, EMBED), rngs, dtype=cfg.dtype)

  def __call__(self, x):
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.efficient)
    return self.proj(out.reshape(b, t, d))


class ViTMlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=None):
    self.fc1 = linear(dim, hidden, (EMBED, MLP_HIDDEN), rngs, dtype=dtype)
    self.fc2 = linear(hidden, dim, (MLP_HIDDEN, EMBED), rngs, dtype=dtype)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class ViTBlock(nnx.Module):
  def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
    self.norm1 = layer_norm(cfg.dim, cfg.ln_eps, rngs, cfg.dtype)
    self.attn = ViTAttention(cfg, rngs)
    self.ls1 = LayerScale(cfg.dim)
    self.norm2 = layer_norm(cfg.dim, cfg.ln_eps, rngs, cfg.dtype)
    self.mlp = ViTMlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), rngs, cfg.dtype)
    self.ls2 = LayerScale(cfg.dim)

  def __call__(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


def sincos_positions(grid: int, dim: int):
  """[1 + grid*grid, dim] position table: a zero row for CLS, then for each patch
  (row-major) sin/cos of its row and column at dim/4 geometric frequencies
  (1 / 10000^(k / (dim/4))), rows in the first half of the channels, columns in the
  second. Every entry is in [-1, 1]: a random frozen encoder's patch tokens then say
  where they are, as a pre-trained encoder's do (DINOv2's random N(0, 0.02) table is
  ~2% of a patch embedding)."""
  if dim % 4:
    raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
  freqs = 1.0 / 10000.0 ** (jnp.arange(dim // 4) / (dim // 4))
  rows, cols = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
  angles = [c.reshape(-1, 1).astype(jnp.float32) * freqs for c in (rows, cols)]
  table = jnp.concatenate([f(a) for a in angles for f in (jnp.sin, jnp.cos)], -1)
  return jnp.concatenate([jnp.zeros((1, dim)), table])


class Dinov2(nnx.Module):
  """images [B, H, W, 3] in [0, 1] -> tokens [B, 1 + (H/14)*(W/14), D] (CLS first,
  registers dropped)."""

  # The patch embedding's bias (a Conv2d bias in the torch model): never weight-decayed.
  BIASES = ("patch_bias",)

  def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.dim, cfg.patch
    trunc = nnx.initializers.truncated_normal(0.02)
    self.patch_kernel = nnx.Param(
        nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)(
            rngs.params(), (p, p, 3, d)), out_sharding=(None, None, None, EMBED),
        eager_sharding=False)
    self.patch_bias = nnx.Param(jnp.zeros((d,)), out_sharding=(EMBED,), eager_sharding=False)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, d)),
                               out_sharding=(None, None, EMBED), eager_sharding=False)
    self.register_tokens = nnx.Param(
        1e-6 * jax.random.normal(rngs.params(), (1, cfg.num_registers, d)),
        out_sharding=(None, None, EMBED), eager_sharding=False) if cfg.num_registers else None
    if cfg.position_init == "normal":
      positions = trunc(rngs.params(), (1, 1 + cfg.grid ** 2, d))
    elif cfg.position_init == "sincos":
      positions = sincos_positions(cfg.grid, d)[None]
    else:
      raise ValueError(f"position_init must be 'normal' or 'sincos', got {cfg.position_init!r}")
    self.pos_embed = nnx.Param(positions, out_sharding=(None, None, EMBED), eager_sharding=False)
    self.blocks = nnx.List([ViTBlock(cfg, rngs) for _ in range(cfg.depth)])
    self.norm = layer_norm(d, cfg.ln_eps, rngs, cfg.dtype)

  def patch_embed(self, images):
    """images [B, H, W, 3] -> [B, gh*gw, D] (a stride-14 14x14 convolution)."""
    b, h, w, c = images.shape
    p = self.cfg.patch
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    if (h // p) * (w // p) + 1 != self.pos_embed.shape[1]:
      raise ValueError(f"image size {h}x{w} does not match the position table of "
                       f"{self.pos_embed.shape[1] - 1} patches (built for "
                       f"{self.cfg.image_size} px)")
    patches = images.reshape(b, h // p, p, w // p, p, c)
    kernel = self.patch_kernel[...].astype(images.dtype)
    out = jnp.einsum("bipjqc,pqcd->bijd", patches, kernel) + self.patch_bias[...]
    return out.reshape(b, (h // p) * (w // p), -1)

  def prepare_tokens(self, images):
    """[B, H, W, 3] -> [B, 1 + R + gh*gw, D]: [CLS + pos0, registers, patches + pos]."""
    dtype = jnp.dtype(self.cfg.dtype)
    x = self.patch_embed(images.astype(dtype))
    b = x.shape[0]
    pos = self.pos_embed[...].astype(dtype)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype) + pos[:, :1], (b, 1, x.shape[-1]))
    parts = [cls, x + pos[:, 1:]]
    if self.register_tokens is not None:
      parts.insert(1, jnp.broadcast_to(self.register_tokens[...].astype(dtype),
                                       (b, self.cfg.num_registers, x.shape[-1])))
    return jnp.concatenate(parts, axis=1)

  def run_blocks(self, x):
    if self.cfg.remat:
      return remat_scan(list(self.blocks), x)
    for block in self.blocks:
      x = block(x)
    return x

  def __call__(self, images):
    x = self.norm(self.run_blocks(self.prepare_tokens(images)))
    return jnp.concatenate([x[:, :1], x[:, 1 + self.cfg.num_registers:]], axis=1)
