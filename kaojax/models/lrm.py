"""The OpenLRM image-to-triplane backbone (used unchanged by KaoLRM).

image tokens (DINOv2) + camera embedding -> transformer over 3*r*r learned queries
(cross-attention to the image tokens, self-attention, MLP; every LayerNorm modulated
by the camera) -> final LayerNorm -> transposed-conv upsampler -> three planes.

Layout: planes are channel-last, [B, 3, H, W, C]; plane 0 spans (x, y), plane 1
(x, z), plane 2 (z, y) of the Z-up triplane world, the first coordinate along W.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.models.dinov2 import Dinov2, Dinov2Config
from kaojax.models.presets import preset
from kaojax.nn.attention import dot_product_attention
from kaojax.nn.layers import layer_norm, linear
from kaojax.nn.params import call_frozen, mark_parameters
from kaojax.nn.remat import remat_scan
from kaojax.sharding import COND, EMBED, HEADS, MLP_HIDDEN


@dataclasses.dataclass(frozen=True)
class LRMConfig:
  encoder: Dinov2Config = Dinov2Config()
  dim: int = 768                 # transformer width
  layers: int = 12
  heads: int = 12
  camera_dim: int = 1024         # camera embedding width
  triplane_low: int = 32         # token grid per plane
  triplane_high: int = 64        # plane resolution after the 2x upsampler
  triplane_dim: int = 48         # plane channels
  mlp_ratio: float = 4.0
  ln_eps: float = 1e-6
  efficient_attention: bool = True
  attention_chunk: int | None = None  # transformer self/cross-attention query block (memory)
  remat: bool = False
  # Frozen parts of the backbone: their parameters are never updated (OpenLRM
  # fine-tunes everything; KaoLRM freezes the encoder and the upsampler).
  freeze_encoder: bool = False
  freeze_upsampler: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if self.triplane_high != 2 * self.triplane_low:
      raise ValueError("the upsampler doubles the resolution: triplane_high must be "
                       f"2 * triplane_low, got {self.triplane_high} and {self.triplane_low}")

  @property
  def frozen_parts(self) -> tuple:
    """Attribute names of the backbone's frozen sub-modules."""
    return tuple(name for name, frozen in (("encoder", self.freeze_encoder),
                                           ("upsampler", self.freeze_upsampler)) if frozen)


def _released(encoder_dim: int, encoder_heads: int, image_size: int, dim: int, layers: int,
              heads: int, triplane_dim: int) -> LRMConfig:
  """A released OpenLRM size (spec section 1): a 12-block DINOv2 encoder, camera
  embedding 1024, 32x32 tokens per plane -> 64x64 planes, head dim 64."""
  encoder = Dinov2Config(dim=encoder_dim, depth=12, heads=encoder_heads, image_size=image_size)
  return LRMConfig(encoder=encoder, dim=dim, layers=layers, heads=heads,
                   triplane_dim=triplane_dim)


PRESETS = {
    # CPU tests: 2 tiny blocks, 56 px, 4x4 token grid per plane.
    "tiny": LRMConfig(encoder=Dinov2Config(dim=32, depth=2, heads=2, image_size=56),
                      dim=32, layers=2, heads=2, camera_dim=32, triplane_low=4,
                      triplane_high=8, triplane_dim=8),
    "small": _released(384, 6, 224, dim=512, layers=12, heads=8, triplane_dim=32),
    "base": _released(768, 12, 336, dim=768, layers=12, heads=12, triplane_dim=48),
    "large": _released(768, 12, 448, dim=1024, layers=16, heads=16, triplane_dim=80),
}


def openlrm_config(name: str = "base", image_size: int = None, **overrides) -> LRMConfig:
  """OpenLRM presets: 'tiny' or the released 'small' / 'base' / 'large'.
  `image_size` replaces the preset's input size (the position table is resized to
  it); `overrides` replace LRMConfig fields."""
  cfg = preset("OpenLRM", PRESETS, name, overrides)
  if image_size is not None:
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder,
                                                               image_size=image_size))
  return cfg


def with_runtime_options(cfg: LRMConfig, efficient_attention: bool = None, remat: bool = None,
                         dtype: str = None, attention_chunk: int = None) -> LRMConfig:
  """The same network with other execution options (attention kernel,
  rematerialisation, compute dtype), set on the encoder and the transformer alike,
  and the transformer's attention query block (0: one block). Options left as None
  keep their value."""
  options = {k: v for k, v in dict(efficient_attention=efficient_attention, remat=remat,
                                   dtype=dtype).items() if v is not None}
  if attention_chunk is not None:
    cfg = dataclasses.replace(cfg, attention_chunk=attention_chunk or None)
  return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **options),
                             **options)


class CameraEmbedder(nnx.Module):
  """camera [B, 16] (OpenLRM vector) -> [B, camera_dim]: Linear, SiLU, Linear."""

  def __init__(self, camera_dim: int, rngs: nnx.Rngs, dtype=None):
    self.fc1 = linear(16, camera_dim, (None, COND), rngs, dtype=dtype)
    self.fc2 = linear(camera_dim, camera_dim, (COND, COND), rngs, dtype=dtype)

  def __call__(self, camera):
    return self.fc2(jax.nn.silu(self.fc1(camera)))


class ModulatedLayerNorm(nnx.Module):
  """LN(x) * (1 + scale) + shift, (shift, scale) = Linear(SiLU(cond)) split in two."""

  def __init__(self, dim: int, cond_dim: int, eps: float, rngs: nnx.Rngs, dtype=None):
    self.norm = layer_norm(dim, eps, rngs, dtype)
    self.modulation = linear(cond_dim, 2 * dim, (COND, EMBED), rngs, dtype=dtype)

  def __call__(self, x, cond):
    # x [B, T, D], cond [B, E]
    shift, scale = jnp.split(self.modulation(jax.nn.silu(cond)), 2, axis=-1)
    return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class Attention(nnx.Module):
  """nn.MultiheadAttention(bias=False): separate q/k/v/out projections, no biases,
  scale 1/sqrt(head_dim)."""

  def __init__(self, dim: int, kv_dim: int, heads: int, rngs: nnx.Rngs,
               efficient: bool = True, query_chunk: int | None = None, dtype=None):
    self.heads = heads
    self.efficient = efficient
    self.query_chunk = query_chunk
    self.q = linear(dim, dim, (EMBED, HEADS), rngs, use_bias=False, dtype=dtype)
    self.k = linear(kv_dim, dim, (COND, HEADS), rngs, use_bias=False, dtype=dtype)
    self.v = linear(kv_dim, dim, (COND, HEADS), rngs, use_bias=False, dtype=dtype)
    self.out = linear(dim, dim, (HEADS, EMBED), rngs, use_bias=False, dtype=dtype)

  def __call__(self, x, context):
    # x [B, Tq, D], context [B, Tk, Dkv] -> [B, Tq, D]
    b, tq, d = x.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, d // self.heads)
    out = dot_product_attention(split(self.q(x)), split(self.k(context)),
                                split(self.v(context)), self.efficient, self.query_chunk)
    return self.out(out.reshape(b, tq, d))


class ModulatedBlock(nnx.Module):
  """x += CrossAttn(ModLN1(x), img); x += SelfAttn(ModLN2(x)); x += MLP(ModLN3(x))."""

  def __init__(self, cfg: LRMConfig, rngs: nnx.Rngs):
    d, e, dt = cfg.dim, cfg.camera_dim, cfg.dtype
    self.norm1 = ModulatedLayerNorm(d, e, cfg.ln_eps, rngs, dt)
    attention = dict(efficient=cfg.efficient_attention, query_chunk=cfg.attention_chunk,
                     dtype=dt)
    self.cross_attn = Attention(d, cfg.encoder.dim, cfg.heads, rngs, **attention)
    self.norm2 = ModulatedLayerNorm(d, e, cfg.ln_eps, rngs, dt)
    self.self_attn = Attention(d, d, cfg.heads, rngs, **attention)
    self.norm3 = ModulatedLayerNorm(d, e, cfg.ln_eps, rngs, dt)
    self.fc1 = linear(d, int(d * cfg.mlp_ratio), (EMBED, MLP_HIDDEN), rngs, dtype=dt)
    self.fc2 = linear(int(d * cfg.mlp_ratio), d, (MLP_HIDDEN, EMBED), rngs, dtype=dt)

  def __call__(self, x, image_tokens, cond):
    x = x + self.cross_attn(self.norm1(x, cond), image_tokens)
    h = self.norm2(x, cond)
    x = x + self.self_attn(h, h)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm3(x, cond)), approximate=False))


class TriplaneTransformer(nnx.Module):
  """(image tokens [B, T, Denc], camera embedding [B, E]) -> [B, 3*r*r, D]."""

  def __init__(self, cfg: LRMConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    n = 3 * cfg.triplane_low ** 2
    self.pos_embed = nnx.Param(
        jax.random.normal(rngs.params(), (1, n, cfg.dim)) / math.sqrt(cfg.dim),
        out_sharding=(None, None, EMBED), eager_sharding=False)
    self.layers = nnx.List([ModulatedBlock(cfg, rngs) for _ in range(cfg.layers)])
    self.norm = layer_norm(cfg.dim, cfg.ln_eps, rngs, cfg.dtype)

  def initial_tokens(self, image_tokens):
    """The learned plane tokens, one copy per batch element: [B, N, D]."""
    b = image_tokens.shape[0]
    return jnp.broadcast_to(self.pos_embed[...].astype(image_tokens.dtype),
                            (b,) + self.pos_embed.shape[1:])

  def run_layers(self, image_tokens, cond):
    """All blocks, without rematerialisation; returns the list of per-layer outputs
    (before the final norm)."""
    x = self.initial_tokens(image_tokens)
    outs = []
    for layer in self.layers:
      x = layer(x, image_tokens, cond)
      outs.append(x)
    return outs

  def __call__(self, image_tokens, cond):
    if self.cfg.remat:
      x = remat_scan(list(self.layers), self.initial_tokens(image_tokens), image_tokens, cond)
    else:
      x = self.run_layers(image_tokens, cond)[-1]
    return self.norm(x)


class Upsampler(nnx.Module):
  """ConvTranspose2d(D, C, kernel 2, stride 2) on each plane:
  tokens [B, 3*r*r, D] -> planes [B, 3, 2r, 2r, C].
  out[2i+a, 2j+b, o] = sum_c x[i, j, c] W[c, a, b, o] + bias[o]."""

  def __init__(self, dim: int, channels: int, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(channels * 4)   # torch's default for ConvTranspose2d
    self.kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (dim, 2, 2, channels), minval=-bound, maxval=bound),
        out_sharding=(EMBED, None, None, None), eager_sharding=False)
    self.bias = nnx.Param(
        jax.random.uniform(rngs.params(), (channels,), minval=-bound, maxval=bound),
        out_sharding=(None,), eager_sharding=False)

  def __call__(self, tokens):
    b, n, d = tokens.shape
    r = math.isqrt(n // 3)
    kernel = self.kernel[...].astype(tokens.dtype)
    bias = self.bias[...].astype(tokens.dtype)
    x = tokens.reshape(b, 3, r, r, d)
    out = jnp.einsum("bpijd,dxyc->bpixjyc", x, kernel)
    return out.reshape(b, 3, 2 * r, 2 * r, -1) + bias


def grid_sample(plane, coords):
  """torch grid_sample(bilinear, zeros padding, align_corners=False) on one plane.

  plane [H, W, C]; coords [N, 2] in [-1, 1], (u along W, v along H) -> [N, C].
  """
  h, w, _ = plane.shape
  x = ((coords[:, 0] + 1) * w - 1) / 2
  y = ((coords[:, 1] + 1) * h - 1) / 2
  x0, y0 = jnp.floor(x), jnp.floor(y)
  out = 0.0
  for dx in (0, 1):
    for dy in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      xc = jnp.clip(xi, 0, w - 1).astype(jnp.int32)
      yc = jnp.clip(yi, 0, h - 1).astype(jnp.int32)
      value = plane[yc, xc]
      out = out + value * jnp.where(inside, weight, 0.0)[:, None].astype(plane.dtype)
  return out


# Which two coordinates each plane is indexed by: (width axis, height axis).
PLANE_AXES = ((0, 1), (0, 2), (2, 1))


def sample_triplane(planes, points, box_warp: float = 2.0):
  """planes [B, 3, H, W, C], points [B, N, 3] (triplane world) -> [B, 3, N, C]."""
  coords = points * (2.0 / box_warp)

  def one(planes_b, coords_b):
    return jnp.stack([grid_sample(planes_b[i], coords_b[:, list(axes)])
                      for i, axes in enumerate(PLANE_AXES)])

  return jax.vmap(one)(planes, coords.astype(planes.dtype))


# OpenLRM's colour activation: sigmoid stretched by RGB_MARGIN on both sides of [0, 1].
RGB_MARGIN = 0.001


def rgb_activation(raw):
  """[..., 3] decoder output -> colour sigmoid(raw) * (1 + 2 m) - m, m = RGB_MARGIN."""
  return jax.nn.sigmoid(raw) * (1 + 2 * RGB_MARGIN) - RGB_MARGIN


def concat_plane_features(features):
  """[B, 3, N, C] -> [B, N, 3C] (plane-major)."""
  b, p, n, c = features.shape
  return jnp.moveaxis(features, 1, 2).reshape(b, n, p * c)


class PointDecoder(nnx.Module):
  """OpenLRM's OSGDecoder MLP: 3C -> 64 -> 64 -> 64 -> out with ReLU."""

  def __init__(self, in_dim: int, out_dim: int, rngs: nnx.Rngs, hidden: int = 64,
               zero_bias: bool = False, dtype=None):
    dims = (in_dim, hidden, hidden, hidden, out_dim)
    self.layers = nnx.List([linear(a, b, (None, None), rngs, dtype=dtype, init="torch",
                                   zero_bias=zero_bias)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class OpenLRMBackbone(nnx.Module):
  """The image-to-triplane network shared by OpenLRM and KaoLRM:
  images [B, H, W, 3] in [0, 1] + source cameras [B, 16] -> planes [B, 3, 2r, 2r, C]."""

  def __init__(self, cfg: LRMConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Dinov2(cfg.encoder, rngs)
    self.camera_embedder = CameraEmbedder(cfg.camera_dim, rngs, cfg.dtype)
    self.transformer = TriplaneTransformer(cfg, rngs)
    self.upsampler = Upsampler(cfg.dim, cfg.triplane_dim, rngs)

  def _run(self, name: str, *args):
    """Sub-module `name` on `args`, its gradients stopped when it is frozen."""
    module = getattr(self, name)
    return call_frozen(module, *args) if name in self.cfg.frozen_parts else module(*args)

  def __call__(self, images, cameras):
    tokens = self._run("encoder", images)
    cond = self.camera_embedder(cameras.astype(tokens.dtype))
    return self._run("upsampler", self.transformer(tokens, cond))


class OpenLRM(nnx.Module):
  """The OpenLRM network: the backbone's planes, and `query_points` to decode NeRF
  density and colour from them."""

  def __init__(self, cfg: LRMConfig, rngs: nnx.Rngs, nerf_decoder: bool = True):
    self.cfg = cfg
    self.backbone = OpenLRMBackbone(cfg, rngs)
    self.synthesizer = (PointDecoder(3 * cfg.triplane_dim, 4, rngs, dtype=cfg.dtype)
                        if nerf_decoder else None)
    mark_parameters(self, frozen=[("backbone", part) for part in cfg.frozen_parts])

  def __call__(self, images, cameras):
    """images [B, H, W, 3] in [0, 1], cameras [B, 16] -> planes [B, 3, 2r, 2r, C]."""
    return self.backbone(images, cameras)

  def query_points(self, planes, points):
    """planes [B, 3, H, W, C], points [B, N, 3] -> dict sigma [B, N, 1] (softplus(raw - 1)),
    rgb [B, N, 3] (rgb_activation), raw [B, N, 4]."""
    raw = self.synthesizer(concat_plane_features(sample_triplane(planes, points)))
    return {"raw": raw, "sigma": jax.nn.softplus(raw[..., :1] - 1.0),
            "rgb": rgb_activation(raw[..., 1:])}
