"""KaoLRM: OpenLRM's triplane backbone + a FLAME decoder + a Gaussian decoder.

image [B, H, W, 3] + source camera [B, 16] -> planes -> FLAME parameters -> FLAME
mesh (vertices * scale + translation) and its 68 3D landmarks -> 8,000 area-weighted
surface samples (redrawn every call from an explicit key) -> one 2D Gaussian surfel
per sample, its attributes decoded from the triplane at s * (x, -z, y),
s = synth_focal / 0.75 -> renders at any cameras through `kaojax.render`.

`forward_and_render` is the one path from images to renders that training,
evaluation and inference share (the monocular model's Gaussian selection included).

Frozen (KaoLRM training): the backbone's encoder and upsampler (`LRMConfig.frozen_parts`,
tagged on the parameters by `kaojax.nn.params.mark_parameters`; the optimiser updates
only `kaojax.nn.params.TRAINABLE`). Trainable: the camera embedder, the transformer
(with its pos_embed), the FLAME and Gaussian decoders.
"""

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from kaojax import geometry
from kaojax.flame import FlameModel
from kaojax.geometry.cameras import SOURCE_FOCAL, flame_to_triplane
from kaojax.geometry.mesh import sample_surface
from kaojax.models.lrm import (LRMConfig, OpenLRMBackbone, PointDecoder, concat_plane_features,
                               openlrm_config, rgb_activation, sample_triplane)
from kaojax.models.presets import preset
from kaojax.nn.layers import linear
from kaojax.nn.params import mark_parameters
from kaojax.render import rasterize_mesh, rasterize_surfels
from kaojax.render.gaussians import Gaussians
from kaojax.sharding import MLP_HIDDEN

# KaoLRM's monocular mode renders the int(N / MONOCULAR_KEEP_DIVISOR) Gaussians
# nearest the camera (those on the far side of the head are dropped).
MONOCULAR_KEEP_DIVISOR = 1.8


@dataclasses.dataclass(frozen=True)
class KaoLRMConfig:
  lrm: LRMConfig = LRMConfig()
  flame_hidden: tuple = (2048, 1024, 512)   # FLAME decoder MLP widths
  gating_hidden: int = 128                  # channel self-gating bottleneck
  n_shape: int = 100
  n_expr: int = 50
  gaussian_hidden: int = 64
  num_samples: int = 8000                   # surface samples = Gaussians per forward
  monocular: bool = False                   # z-translation forced to 0

  @property
  def flame_out(self) -> int:
    """Width of the FLAME decoder's output (see `FlameParams.from_raw`)."""
    return self.n_shape + self.n_expr + POSE_DIM + 1 + 3


POSE_DIM = 6  # global rotation (3) + jaw (3), axis-angle
MIN_SCALE = 0.1


# KaoLRM feeds 224-px source images to every backbone size (the position table is
# resized to 16x16 patches); encoder and upsampler are frozen.
_FROZEN = dict(freeze_encoder=True, freeze_upsampler=True)
PRESETS = {
    "tiny": KaoLRMConfig(lrm=openlrm_config("tiny", **_FROZEN), flame_hidden=(64, 32, 16),
                         gating_hidden=8, gaussian_hidden=16, num_samples=256),
    **{name: KaoLRMConfig(lrm=openlrm_config(name, image_size=224, **_FROZEN))
       for name in ("small", "base", "large")},
}


def kaolrm_config(name: str = "base", **overrides) -> KaoLRMConfig:
  """Presets: 'tiny' (tests), 'small' / 'base' / 'large' (the OpenLRM backbone of
  that size; 'base' is KaoLRM as released). `overrides` replace KaoLRMConfig fields."""
  return preset("KaoLRM", PRESETS, name, overrides)


@flax.struct.dataclass
class FlameParams:
  """shape [B, n_shape]; expression [B, n_expr]; pose [B, 6] (global + jaw
  axis-angle); scale [B, 1] (>= 0.1); translation [B, 3]; raw [B, flame_out]."""
  shape: jax.Array
  expression: jax.Array
  pose: jax.Array
  scale: jax.Array
  translation: jax.Array
  raw: jax.Array

  @classmethod
  def from_raw(cls, raw, n_shape: int, n_expr: int, monocular: bool = False) -> "FlameParams":
    """The FLAME decoder's output [B, n_shape + n_expr + 10], in this order: shape,
    expression, pose (6), scale (softplus, at least MIN_SCALE), translation (3; its z
    forced to 0 in monocular mode)."""
    pose_at = n_shape + n_expr
    scale_at = pose_at + POSE_DIM
    translation = raw[:, scale_at + 1:scale_at + 4]
    if monocular:
      translation = translation.at[:, 2].set(0.0)
    return cls(shape=raw[:, :n_shape], expression=raw[:, n_shape:pose_at],
               pose=raw[:, pose_at:scale_at],
               scale=jnp.maximum(jax.nn.softplus(raw[:, scale_at:scale_at + 1]), MIN_SCALE),
               translation=translation, raw=raw)


def _torch_linear(d_in, d_out, rngs, axes=(None, None), dtype=None):
  return linear(d_in, d_out, axes, rngs, dtype=dtype, init="torch", zero_bias=False)


class FlameDecoder(nnx.Module):
  """planes [B, 3, H, W, C] -> FLAME parameters.

  mean over channels -> [B, 3*H*W] (plane, row, col) -> Linear, GELU, Linear, GELU ->
  channel gating x * sigmoid(Linear(ReLU(Linear(x)))) -> Linear, GELU, Linear(160).
  """

  def __init__(self, in_dim: int, cfg: KaoLRMConfig, rngs: nnx.Rngs, dtype=None):
    h1, h2, h3 = cfg.flame_hidden
    self.n_shape, self.n_expr = cfg.n_shape, cfg.n_expr
    self.monocular = cfg.monocular
    self.fc1 = _torch_linear(in_dim, h1, rngs, (None, MLP_HIDDEN), dtype)
    self.fc2 = _torch_linear(h1, h2, rngs, (MLP_HIDDEN, None), dtype)
    self.gate_down = _torch_linear(h2, cfg.gating_hidden, rngs, dtype=dtype)
    self.gate_up = _torch_linear(cfg.gating_hidden, h2, rngs, dtype=dtype)
    self.fc3 = _torch_linear(h2, h3, rngs, dtype=dtype)
    self.fc4 = _torch_linear(h3, cfg.flame_out, rngs, dtype=dtype)

  @staticmethod
  def plane_means(planes):
    """[B, 3, H, W, C] -> [B, 3*H*W]: per-texel mean over channels."""
    return jnp.mean(planes, axis=-1).reshape(planes.shape[0], -1)

  def raw(self, planes):
    gelu = lambda x: jax.nn.gelu(x, approximate=False)
    x = gelu(self.fc2(gelu(self.fc1(self.plane_means(planes)))))
    x = x * jax.nn.sigmoid(self.gate_up(jax.nn.relu(self.gate_down(x))))
    return self.fc4(gelu(self.fc3(x)))

  def __call__(self, planes) -> FlameParams:
    return FlameParams.from_raw(self.raw(planes), self.n_shape, self.n_expr, self.monocular)


def gaussian_query_points(points, synth_focal):
  """FLAME-world points [..., 3] -> triplane query (synth_focal / SOURCE_FOCAL) *
  (x, -z, y)."""
  return flame_to_triplane(points) * (synth_focal / SOURCE_FOCAL)


def gaussian_activations(raw):
  """raw [..., 11] -> (opacity [..., 1] sigmoid, scales [..., 3] 0.5*softplus,
  quaternion [..., 4] (w, x, y, z) L2-normalised, rgb [..., 3] rgb_activation)."""
  opacity = jax.nn.sigmoid(raw[..., 0:1])
  scales = 0.5 * jax.nn.softplus(raw[..., 1:4])
  quat = raw[..., 4:8]
  quat = quat / jnp.maximum(jnp.linalg.norm(quat, axis=-1, keepdims=True), 1e-12)
  rgb = rgb_activation(raw[..., 8:11])
  return opacity, scales, quat, rgb


class GaussianDecoder(nnx.Module):
  """(planes [B, 3, H, W, C], surface points [B, N, 3] in the FLAME world) ->
  Gaussians centred at the points. Zero-initialised biases."""

  def __init__(self, channels: int, hidden: int, rngs: nnx.Rngs, dtype=None):
    self.decoder = PointDecoder(3 * channels, 11, rngs, hidden=hidden, zero_bias=True,
                                dtype=dtype)

  def raw(self, planes, points, synth_focal):
    """-> [B, N, 11] decoder output before activations (planes' dtype)."""
    query = gaussian_query_points(points, synth_focal).astype(planes.dtype)
    return self.decoder(concat_plane_features(sample_triplane(planes, query)))

  def __call__(self, planes, points, synth_focal) -> Gaussians:
    """Gaussians in float32 whatever the compute dtype (means = `points`)."""
    raw = self.raw(planes, points, synth_focal).astype(jnp.float32)
    opacity, scales, quats, rgb = gaussian_activations(raw)
    return Gaussians(means=points, quats=quats, scales=scales, opacities=opacity[..., 0],
                     colors=rgb)


class FlameBuffer(nnx.Variable):
  """A FlameModel held by the network: not a parameter, never trained."""


@flax.struct.dataclass
class KaoLRMOutput:
  """planes [B, 3, 2r, 2r, C]; flame: FlameParams; vertices [B, V, 3] (scaled and
  translated FLAME mesh, FLAME world); landmarks [B, 68, 3] (static 3D landmarks);
  gaussians: Gaussians with N = num_samples; face_idx [B, N], bary [B, N, 3]: where
  each Gaussian sits on the mesh."""
  planes: jax.Array
  flame: FlameParams
  vertices: jax.Array
  landmarks: jax.Array
  gaussians: Gaussians
  face_idx: jax.Array
  bary: jax.Array


@dataclasses.dataclass(frozen=True)
class RenderTiling:
  """Screen-tile settings of KaoLRM's renders (None: the renderer's default).
  mesh_tile_size: the mesh rasterizer's tile side in pixels (smaller tiles test
  fewer faces per pixel: a dense mesh in a small image renders faster with them).
  Nothing is ever dropped: the renderers bin without a per-tile cap."""
  mesh_tile_size: int | None = None

  def mesh_options(self) -> dict:
    return {} if self.mesh_tile_size is None else {"tile_size": self.mesh_tile_size}


DEFAULT_TILING = RenderTiling()


class KaoLRM(nnx.Module):
  """The KaoLRM network (module doc). Build it with `KaoLRM(cfg, flame, rngs)`, or
  abstractly (no random weights, e.g. to load parameters into) with
  `KaoLRM.abstract(cfg, flame)`."""

  def __init__(self, cfg: KaoLRMConfig, flame: FlameModel, rngs: nnx.Rngs):
    if (flame.n_shape, flame.n_expr) != (cfg.n_shape, cfg.n_expr):
      raise ValueError(f"FLAME model has {flame.n_shape} shape / {flame.n_expr} expression "
                       f"components, the config {cfg.n_shape} / {cfg.n_expr}")
    self.cfg = cfg
    self.backbone = OpenLRMBackbone(cfg.lrm, rngs)
    self.flame = FlameBuffer(flame)
    self.init_decoders(rngs)

  @classmethod
  def abstract(cls, cfg: KaoLRMConfig, flame: FlameModel) -> "KaoLRM":
    """The network with abstract parameters (shapes and dtypes, nothing computed) and
    the given FLAME model, ready for parameters restored from a checkpoint."""
    model = nnx.eval_shape(lambda: cls(cfg, flame, nnx.Rngs(0)))
    model.flame = FlameBuffer(flame)   # eval_shape made the FLAME arrays abstract too
    return model

  def init_decoders(self, rngs: nnx.Rngs):
    """(Re)create the FLAME and Gaussian decoders with KaoLRM's initialisation
    (PyTorch's default nn.Linear init; zero biases in the Gaussian decoder)."""
    lrm = self.cfg.lrm
    self.flame_decoder = FlameDecoder(3 * lrm.triplane_high ** 2, self.cfg, rngs, lrm.dtype)
    self.gaussian_decoder = GaussianDecoder(lrm.triplane_dim, self.cfg.gaussian_hidden, rngs,
                                            lrm.dtype)
    mark_parameters(self, frozen=[("backbone", part) for part in lrm.frozen_parts])

  @property
  def flame_model(self) -> FlameModel:
    return self.flame.get_value()

  def __call__(self, images, cameras, key, synth_focal=SOURCE_FOCAL,
               num_samples: Optional[int] = None) -> KaoLRMOutput:
    """images [B, H, W, 3] in [0, 1] (`kaojax.images.prepare_source_image`); cameras
    [B, 16] OpenLRM source cameras (focal SOURCE_FOCAL); key: PRNG key for the surface
    samples; synth_focal: normalised focal of the render cameras (scalar or [B, 1, 1])."""
    planes = self.backbone(images, cameras)
    params = self.flame_decoder(planes)
    flame = self.flame_model
    mesh = flame(params.shape.astype(jnp.float32), params.expression.astype(jnp.float32),
                 params.pose.astype(jnp.float32), scale=params.scale.astype(jnp.float32),
                 translation=params.translation.astype(jnp.float32))
    n = num_samples or self.cfg.num_samples
    points, face_idx, bary = sample_surface(key, mesh.vertices, flame.faces, n)
    gaussians = self.gaussian_decoder(planes, points, synth_focal)
    return KaoLRMOutput(planes=planes, flame=params, vertices=mesh.vertices,
                        landmarks=mesh.landmarks3d, gaussians=gaussians,
                        face_idx=face_idx, bary=bary)

  def render(self, out: KaoLRMOutput, viewmats, Ks, width: int, height: int, background=None,
             mesh: bool = True, tiling: RenderTiling = DEFAULT_TILING) -> dict:
    """Renders the Gaussians as 2D surfels and (when `mesh`) the FLAME mesh.

    viewmats [B, V, 4, 4] OpenCV world-to-camera in the FLAME world; Ks [B, V, 3, 3]
    pixels; background [B, V, 3] / [3] / None (black). Returns {"surfels": dict color
    [B, V, H, W, 3], alpha, depth, normal (kaojax.render.rasterize_surfels), "mesh":
    dict depth, normal, mask, face_id, bary (kaojax.render.rasterize_mesh)}. Values
    are the renderers' own (no clamping). tiling: the renderers' tile settings.
    """
    renders = {"surfels": rasterize_surfels(out.gaussians, viewmats, Ks, width, height,
                                            background)}
    if mesh:
      renders["mesh"] = rasterize_mesh(out.vertices, self.flame_model.faces, viewmats, Ks,
                                       width, height, **tiling.mesh_options())
    return renders

  def forward_and_render(self, images, cameras, viewmats, Ks, render_size: int, key,
                         synth_focal: float = SOURCE_FOCAL, background=None, mesh: bool = True,
                         tiling: RenderTiling = DEFAULT_TILING):
    """The forward pass from source images, then renders at the target views.

    images [B, S, S, 3], cameras [B, 16] (as `__call__`); viewmats [B, V, 4, 4], Ks
    [B, V, 3, 3] target cameras; render_size: R (square renders); background [B, 3]
    or None (black). -> (KaoLRMOutput, renders as `render` gives them; no "mesh" entry
    when `mesh` is False). A monocular model (cfg.monocular, one view) keeps only its
    Gaussians nearest the camera (`monocular_gaussians`), in the output too.
    """
    out = self(images, cameras, key, synth_focal=synth_focal)
    if self.cfg.monocular:
      if viewmats.shape[1] != 1:
        raise ValueError(f"a monocular model renders one view, got {viewmats.shape[1]}")
      out = monocular_gaussians(out, viewmats)
    if background is not None:
      background = background[:, None, :]
    return out, self.render(out, viewmats, Ks, render_size, render_size, background,
                            mesh=mesh, tiling=tiling)

  def facial_mask(self, mesh_render: dict):
    """[B, V, H, W] bool: the pixels of a mesh render (`render(...)["mesh"]`) whose
    triangle lies in FLAME's facial region (`FlameModel.face_mask`): the reference's
    `flame_mask`, where the pixel and binding losses are taken."""
    return self.flame_model.face_mask[mesh_render["face_id"]] & mesh_render["mask"]


def project_landmarks(landmarks, viewmats, Ks):
  """landmarks [B, 68, 3] world, viewmats [B, V, 4, 4], Ks [B, V, 3, 3]
  -> pixels [B, V, 68, 2]."""
  pixels, _ = geometry.project_points(landmarks[:, None], viewmats, Ks)
  return pixels


def nearest_gaussians(gaussians: Gaussians, viewmat, keep: int) -> Gaussians:
  """The `keep` Gaussians of smallest depth along the camera's viewing axis
  (world-to-camera viewmat [B, 4, 4]); for the canonical camera, those of largest
  world z, as the reference's monocular back-face culling keeps them."""
  depth = (jnp.einsum("bj,bnj->bn", viewmat[:, 2, :3], gaussians.means)
           + viewmat[:, 2, 3][:, None])
  _, idx = jax.lax.top_k(-depth, keep)
  take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
  return jax.tree.map(take, gaussians)


def monocular_gaussians(out: KaoLRMOutput, viewmats) -> KaoLRMOutput:
  """KaoLRM's monocular mode: `out` with only its int(N / MONOCULAR_KEEP_DIVISOR)
  Gaussians nearest the (single) camera in depth, viewmats [B, 1, 4, 4]; face_idx /
  bary are left for all N samples."""
  keep = int(out.gaussians.means.shape[1] / MONOCULAR_KEEP_DIVISOR)
  return out.replace(gaussians=nearest_gaussians(out.gaussians, viewmats[:, 0], keep))
