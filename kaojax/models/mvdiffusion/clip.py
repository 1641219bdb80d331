"""CLIP vision tower with projection (OpenCLIP ViT-H/14 in SD2.1-unCLIP), NHWC.

pixels [N, S, S, 3] (CLIP-normalised) -> patch conv (no bias) -> [CLS ; patches] +
learned positions -> pre-LayerNorm -> pre-LN blocks (x += attn(LN1 x); x += MLP(LN2 x);
q/k/v/out with bias, GELU) -> LayerNorm of the CLS token -> Linear (no bias)
-> image embedding [N, projection_dim].

`preprocess` stands in for CLIPImageProcessor on float images: resize the short side to
`image_size` (bicubic, antialiased), centre crop, normalise with CLIP's mean/std. It is
close to, not bit-identical with, the PIL-based processor.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.models.mvdiffusion.attention import attention
from kaojax.models.presets import preset
from kaojax.nn.layers import conv, layer_norm, linear
from kaojax.sharding import COND, EMBED, HEADS, MLP_HIDDEN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 1280
  layers: int = 32
  heads: int = 16
  intermediate_size: int = 5120
  patch_size: int = 14
  image_size: int = 224
  projection_dim: int = 1024
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"          # gelu (OpenCLIP ViT-H) | quick_gelu (OpenAI)
  dtype: str = "float32"

  @classmethod
  def from_transformers(cls, config: dict) -> "CLIPVisionConfig":
    """From a transformers CLIPVisionConfig dict (or a CLIPConfig with vision_config)."""
    projection_dim = config.get("projection_dim", 512)
    config = config.get("vision_config", config)
    projection_dim = config.get("projection_dim", projection_dim)
    return cls(hidden_size=config["hidden_size"], layers=config["num_hidden_layers"],
               heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
               patch_size=config["patch_size"], image_size=config["image_size"],
               projection_dim=projection_dim,
               layer_norm_eps=config.get("layer_norm_eps", 1e-5),
               hidden_act=config.get("hidden_act", "quick_gelu"))

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


PRESETS = {
    "tiny": CLIPVisionConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64,
                             patch_size=8, image_size=32, projection_dim=16),   # CPU tests
    "facelift": CLIPVisionConfig(),   # OpenCLIP ViT-H/14 of SD2.1-unCLIP (released)
}


def clip_vision_config(name: str = "facelift", **overrides) -> CLIPVisionConfig:
  """CLIP vision presets: 'tiny' (1 layer, 32 px; CPU tests) or 'facelift' (OpenCLIP
  ViT-H/14 with a 1024-d projection). `overrides` replace CLIPVisionConfig fields."""
  return preset("CLIP vision", PRESETS, name, overrides)


def _layer_norm(cfg: CLIPVisionConfig, rngs, dtype):
  return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, dtype, exact_variance=True)


def _act(name):
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"CLIP config: hidden_act {name!r} not supported (gelu, quick_gelu)")


class CLIPAttention(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, rngs, dtype):
    d = cfg.hidden_size
    self.heads = cfg.heads
    self.q_proj = linear(d, d, (EMBED, HEADS), rngs, dtype=dtype)
    self.k_proj = linear(d, d, (EMBED, HEADS), rngs, dtype=dtype)
    self.v_proj = linear(d, d, (EMBED, HEADS), rngs, dtype=dtype)
    self.out_proj = linear(d, d, (HEADS, EMBED), rngs, dtype=dtype)

  def __call__(self, x):
    return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPLayer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, rngs, dtype):
    d = cfg.hidden_size
    self.layer_norm1 = _layer_norm(cfg, rngs, dtype)
    self.self_attn = CLIPAttention(cfg, rngs, dtype)
    self.layer_norm2 = _layer_norm(cfg, rngs, dtype)
    self.fc1 = linear(d, cfg.intermediate_size, (EMBED, MLP_HIDDEN), rngs, dtype=dtype)
    self.fc2 = linear(cfg.intermediate_size, d, (MLP_HIDDEN, EMBED), rngs, dtype=dtype)
    self.act = _act(cfg.hidden_act)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPVisionEncoder(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    d, p = cfg.hidden_size, cfg.patch_size
    _act(cfg.hidden_act)
    self.patch_embedding = conv(3, d, p, rngs, stride=p, padding=0, dtype=dtype,
                                axes=(None, EMBED), use_bias=False)
    self.class_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)),
                                     out_sharding=(EMBED,), eager_sharding=False)
    self.position_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (cfg.num_positions, d)),
        out_sharding=(None, EMBED), eager_sharding=False)
    self.pre_layrnorm = _layer_norm(cfg, rngs, dtype)
    self.layers = nnx.List([CLIPLayer(cfg, rngs, dtype) for _ in range(cfg.layers)])
    self.post_layernorm = _layer_norm(cfg, rngs, dtype)
    self.visual_projection = linear(d, cfg.projection_dim, (EMBED, COND), rngs,
                                    use_bias=False, dtype=dtype)

  def __call__(self, pixels):
    """pixels [N, S, S, 3] CLIP-normalised -> image embeddings [N, projection_dim]."""
    cfg = self.cfg
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"CLIP pixels must be [N, {cfg.image_size}, {cfg.image_size}, 3], "
                       f"got {pixels.shape}")
    n = pixels.shape[0]
    patches = self.patch_embedding(pixels).reshape(n, -1, cfg.hidden_size)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                           (n, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], 1) + self.position_embedding[...].astype(patches.dtype)
    x = self.pre_layrnorm(x)
    for layer in self.layers:
      x = layer(x)
    return self.visual_projection(self.post_layernorm(x[:, 0]))


def preprocess(images, image_size: int = 224):
  """images [N, H, W, 3] in [0, 1] -> CLIP pixels [N, S, S, 3]."""
  n, h, w, _ = images.shape
  scale = image_size / min(h, w)
  nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
  resized = jax.image.resize(images, (n, nh, nw, 3), "bicubic", antialias=True)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  crop = resized[:, top:top + image_size, left:left + image_size]
  return (crop - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
