"""FaceLift inference: one face image -> 6 generated views -> GS-LRM 3D Gaussians ->
gaussians.ply, renders at the 6 cameras and a turntable.

Stages (S = image size, V = 6 views, f = VAE downsampling, all NHWC):
1. conditioning: CLIP image embedding of the input (noise-augmented at `noise_level`
   through the unCLIP normaliser: scale, DDPM-noise with the cosine schedule, unscale)
   ++ sinusoidal embedding of the noise level -> class_labels [V, 2P]; input VAE latent
   (posterior mean x scaling) [V, S/f, S/f, 4]; per-view text embeddings [V, T, Dc]
   read from a file.
2. multi-view diffusion: DDIM (v-prediction, eta) over the UNet with classifier-free
   guidance; batch [uncond (zero class labels, zero image latents) ; cond]; the UNet's
   sparse attention groups each set of V views. Decode z / scaling, x/2 + 0.5 in [0, 1].
3. GS-LRM on the V views at FaceLift's fixed cameras -> Gaussians, post-filter,
   .ply export, renders (white background) and a turntable.

Not included: background removal and MTCNN face cropping (the input must already be
the 512 x 512 FaceLift crop on white), and the text encoder (embeddings come from a
file). `tiny_models` builds random-weight presets that run on CPU in seconds.
"""

import dataclasses
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaojax.geometry.cameras import (FACELIFT_FOV_DEG, FACELIFT_RADIUS, facelift_cameras,
                                     intrinsics_from_fov, orbit_cameras)
from kaojax.images import check_unit_range
from kaojax.models import loading
from kaojax.models.gslrm import GSLRM, PostFilter, gslrm_config, post_filter_mask, select
from kaojax.models.mvdiffusion.clip import CLIPVisionEncoder, clip_vision_config, preprocess
from kaojax.models.mvdiffusion.layers import timestep_embedding
from kaojax.models.mvdiffusion.scheduler import DDIM, SchedulerConfig, add_noise, alphas_cumprod
from kaojax.models.mvdiffusion.unet import UNet, unet_config
from kaojax.models.mvdiffusion.vae import VAE, vae_config

# SD2.1-unCLIP's image-noising scheduler (DDPM, cosine schedule).
NOISING_SCHEDULER = SchedulerConfig(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                                    steps_offset=0)


@dataclasses.dataclass(frozen=True)
class FaceLiftConfig:
  image_size: int = 512
  num_views: int = 6
  num_steps: int = 50
  guidance_scale: float = 3.0
  eta: float = 1.0
  noise_level: int = 0
  seed: int = 0
  turntable_frames: int = 150
  turntable_fps: int = 30
  post_filter: PostFilter = PostFilter()
  scheduler: SchedulerConfig = SchedulerConfig()


@dataclasses.dataclass
class FaceLiftModels:
  unet: UNet
  vae: VAE
  clip: CLIPVisionEncoder
  gslrm: GSLRM
  text_embeddings: jax.Array          # [V, T, cross_attention_dim]
  normalizer_mean: jax.Array          # [P] unCLIP image-embedding statistics
  normalizer_std: jax.Array           # [P]
  noising_scheduler: SchedulerConfig = NOISING_SCHEDULER


def load_models(mvdiffusion_folder, gslrm_checkpoint, text_embeddings,
                num_views: int = 6, dtype: str = "float32", attention_chunk: int = 1024):
  """Released weights -> (FaceLiftModels, the DDIM SchedulerConfig for FaceLiftConfig).

  mvdiffusion_folder: a diffusers StableUnCLIP-style pipeline folder with unet/, vae/,
  image_encoder/ (transformers CLIPVisionModelWithProjection), image_normalizer/ (mean,
  std), scheduler/ and image_noising_scheduler/ (scheduler_config.json); unet/ and vae/
  may also be directories written by `python -m kaojax.convert.diffusers`. The layout of
  the OpenFaceLift release is inferred from the reference code, not verified.
  gslrm_checkpoint: torch.save file with a `model` dict (or .safetensors), or a
  directory written by `python -m kaojax.convert.gslrm`.
  text_embeddings: file with the [6, 77, 1024] prompt embeddings.
  dtype: compute dtype of the UNet, VAE and CLIP ("bfloat16" / "float16" on
  accelerators; parameters stay float32); GS-LRM and rendering stay float32.
  attention_chunk: query block size of every attention (bounds the logits memory:
  at 512 px the UNet's first level has 6 x 2 x 4096 queries against 8192 keys)."""
  from kaojax.convert.clip import load_clip_vision
  from kaojax.convert.diffusers import load_unet, load_vae, read_diffusers_folder
  from kaojax.convert.gslrm import load_gslrm
  from kaojax.convert.torch_state import read_json
  root = pathlib.Path(mvdiffusion_folder)
  for sub in ("unet", "vae", "image_encoder", "image_normalizer"):
    if not (root / sub).is_dir():
      raise FileNotFoundError(f"{root}: missing the {sub}/ folder of a FaceLift/unCLIP pipeline")
  _, norm = read_diffusers_folder(root / "image_normalizer")
  if "mean" not in norm or "std" not in norm:
    raise ValueError(f"{root / 'image_normalizer'}: expected 'mean' and 'std' tensors, "
                     f"got {sorted(norm)}")
  sched = read_json(root / "scheduler" / "scheduler_config.json")
  noising = read_json(root / "image_noising_scheduler" / "scheduler_config.json")

  def network(path, kind, convert_now, **options):
    """A kaojax model directory, or the released weights converted on the way in."""
    if loading.is_model_directory(path):
      return loading.load_network(path, kind, **options)
    return convert_now(path, **options)

  models = FaceLiftModels(
      unet=network(root / "unet", "unet", load_unet, num_views=num_views, dtype=dtype,
                   attention_chunk=attention_chunk),
      vae=network(root / "vae", "vae", load_vae, dtype=dtype),
      clip=load_clip_vision(root / "image_encoder", dtype=dtype),
      gslrm=network(gslrm_checkpoint, "gslrm", load_gslrm, attention_chunk=attention_chunk),
      text_embeddings=jnp.asarray(load_text_embeddings(text_embeddings)),
      normalizer_mean=jnp.asarray(norm["mean"]).reshape(-1),
      normalizer_std=jnp.asarray(norm["std"]).reshape(-1),
      noising_scheduler=(SchedulerConfig.from_diffusers(noising) if noising
                         else NOISING_SCHEDULER))
  return models, (SchedulerConfig.from_diffusers(sched) if sched else SchedulerConfig())


def load_text_embeddings(path) -> np.ndarray:
  """Per-view prompt embeddings [V, T, D] from .npy, .npz (first array), .safetensors
  (first tensor) or a torch .pt/.bin tensor (e.g. FaceLift's clr_embeds.pt, fp16)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"text embeddings not found: {path}")
  if path.suffix == ".npy":
    arr = np.load(path)
  elif path.suffix == ".npz":
    with np.load(path) as data:
      arr = data[data.files[0]]
  elif path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    arr = tensors[sorted(tensors)[0]]
  else:
    import torch
    arr = torch.load(str(path), map_location="cpu", weights_only=True).float().numpy()
  arr = np.asarray(arr, np.float32)
  if arr.ndim != 3:
    raise ValueError(f"{path}: text embeddings must be [views, tokens, dim], got {arr.shape}")
  return arr


def random_init(build, seed: int = 0):
  """Build a module with random weights without running its initializers (eager
  initializers compile one XLA program per shape, which is slow on CPU): kernels
  N(0, 1/fan_in), LayerNorm/GroupNorm scales 1, biases 0.1 N(0, 1), other parameters
  (tokens, position tables) 0.02 N(0, 1)."""
  model = nnx.eval_shape(build)
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    shape, name = var.get_value().shape, str(path[-1])
    if name == "kernel":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      value = np.ones(shape)
    elif name == "bias":
      value = 0.1 * rng.normal(size=shape)
    else:
      value = 0.02 * rng.normal(size=shape)
    var.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(model, state)
  return model


def tiny_models(num_views: int = 6, seed: int = 0) -> FaceLiftModels:
  """Random weights at the 'tiny' presets (FaceLift's structure at toy sizes, for CPU
  tests): 8-channel UNet with projection class embedding, 2-level VAE (f = 2), 1-layer
  CLIP, 1-layer GS-LRM with patch 8."""
  clip_cfg = clip_vision_config("tiny")
  unet_cfg = unet_config("tiny", num_views=num_views)
  vae_cfg = vae_config("tiny")
  gslrm_cfg = gslrm_config("tiny")
  key = jax.random.key(seed + 1)
  return FaceLiftModels(
      unet=random_init(lambda: UNet(unet_cfg, nnx.Rngs(0)), seed),
      vae=random_init(lambda: VAE(vae_cfg, nnx.Rngs(0)), seed + 1),
      clip=random_init(lambda: CLIPVisionEncoder(clip_cfg, nnx.Rngs(0)), seed + 2),
      gslrm=random_init(lambda: GSLRM(gslrm_cfg, nnx.Rngs(0)), seed + 3),
      text_embeddings=jax.random.normal(key, (num_views, 5, unet_cfg.cross_attention_dim)),
      normalizer_mean=jnp.zeros(clip_cfg.projection_dim),
      normalizer_std=jnp.ones(clip_cfg.projection_dim))


# ----------------------------------------------------------------------------
# Stage 0: input crop (after face detection).

CROP_SIZE = 512
CROP_FACE_SIZE = 194.2749650813705            # mean(box w, h) after scaling, pixels
CROP_FACE_CENTRE = (251.8327, 280.0134)       # (x, y) of the box centre in the crop


def composite_on_white(rgba):
  """[H, W, 4] RGBA in [0, 1] -> [H, W, 3] RGB over a white background."""
  rgba = np.asarray(rgba, np.float32)
  return rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])


def crop_to_face(image, box, size: int = CROP_SIZE):
  """FaceLift's input framing from a face box (x0, y0, x1, y1) in pixels: scale by
  CROP_FACE_SIZE / mean(box width, height) (at size 512) and place the box centre at
  CROP_FACE_CENTRE on a white canvas. image [H, W, 3] in [0, 1] -> [size, size, 3].
  Bilinear resampling with continuous pixel coordinates (pixel centres at +0.5)."""
  image = np.asarray(image, np.float32)
  x0, y0, x1, y1 = (float(v) for v in box)
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"face box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
  k = size / CROP_SIZE
  scale = CROP_FACE_SIZE * k / (0.5 * ((x1 - x0) + (y1 - y0)))
  cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
  tx, ty = CROP_FACE_CENTRE[0] * k, CROP_FACE_CENTRE[1] * k
  us = (np.arange(size) + 0.5 - tx) / scale + cx - 0.5      # source pixel-index coordinates
  vs = (np.arange(size) + 0.5 - ty) / scale + cy - 0.5
  h, w = image.shape[:2]
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), constant_values=1.0)   # white outside
  u = np.clip(us + 1.0, 0.0, w + 1.0)
  v = np.clip(vs + 1.0, 0.0, h + 1.0)
  u0 = np.clip(np.floor(u).astype(int), 0, w)
  v0 = np.clip(np.floor(v).astype(int), 0, h)
  fu, fv = (u - u0)[None, :, None], (v - v0)[:, None, None]
  g = lambda vv, uu: padded[vv][:, uu]
  out = ((1 - fv) * ((1 - fu) * g(v0, u0) + fu * g(v0, u0 + 1))
         + fv * ((1 - fu) * g(v0 + 1, u0) + fu * g(v0 + 1, u0 + 1)))
  outside = (((us < -1.0) | (us > w))[None, :] | ((vs < -1.0) | (vs > h))[:, None])
  out[outside] = 1.0
  return out


# ----------------------------------------------------------------------------
# Stage 1: conditioning.


def image_class_labels(models: FaceLiftModels, image, noise_level: int, key):
  """image [H, W, 3] in [0, 1] -> class_labels [1, 2P] (noise-augmented CLIP embedding
  ++ noise-level embedding)."""
  embeds = _clip_embed(models.clip, image[None])                      # [1, P]
  scaled = (embeds - models.normalizer_mean) / models.normalizer_std
  a = jnp.asarray(alphas_cumprod(models.noising_scheduler))
  noisy = add_noise(a, scaled, jax.random.normal(key, scaled.shape), jnp.array([noise_level]))
  embeds = noisy * models.normalizer_std + models.normalizer_mean
  level = timestep_embedding(jnp.array([noise_level]), embeds.shape[-1], True, 0.0)
  return jnp.concatenate([embeds, level], axis=-1)


@nnx.jit
def _clip_embed(clip, images):
  return clip(preprocess(images, clip.cfg.image_size))


@nnx.jit
def _encode_mean(vae, images):
  return vae.encode(images)[0]


def image_latent(models: FaceLiftModels, image):
  """image [H, W, 3] in [0, 1] -> scaled posterior mean [1, H/f, W/f, 4]."""
  return _encode_mean(models.vae, image[None] * 2.0 - 1.0) * models.vae.cfg.scaling_factor


# ----------------------------------------------------------------------------
# Stage 2: multi-view diffusion.


@nnx.jit(static_argnames=("num_steps", "eta", "guidance_scale", "scheduler"))
def _denoise_step(unet, latents, t, image_latents, class_labels, text, noise, *, num_steps,
                  eta, guidance_scale, scheduler):
  """One guided DDIM step for V views. latents [V, h, w, 4]; image_latents [V, h, w, 4];
  class_labels [V, 2P]; text [V, T, D]; noise [V, h, w, 4]."""
  ddim = DDIM(scheduler)
  both = lambda x: jnp.concatenate([jnp.zeros_like(x), x], 0)     # [uncond ; cond]
  model_in = jnp.concatenate([jnp.concatenate([latents, latents], 0), both(image_latents)], -1)
  out = unet(model_in, t, jnp.concatenate([text, text], 0), both(class_labels))
  uncond, cond = jnp.split(out, 2, axis=0)
  guided = uncond + guidance_scale * (cond - uncond)
  prev, _ = ddim.step(guided, t, latents, num_steps, eta=eta, noise=noise)
  return prev


def generate_views(models: FaceLiftModels, image, cfg: FaceLiftConfig, key=None):
  """image [S, S, 3] in [0, 1] -> views [V, S, S, 3] in [0, 1]."""
  key = jax.random.key(cfg.seed) if key is None else key
  k_aug, k_init, k_steps = jax.random.split(key, 3)
  views = cfg.num_views
  if models.text_embeddings.shape[0] != views:
    raise ValueError(f"text embeddings hold {models.text_embeddings.shape[0]} views, "
                     f"config asks for {views}")
  if models.unet.cfg.num_views != views:
    raise ValueError(f"the UNet groups {models.unet.cfg.num_views} views, config asks for {views}")
  labels = jnp.repeat(image_class_labels(models, image, cfg.noise_level, k_aug), views, 0)
  cond_latents = jnp.repeat(image_latent(models, image), views, 0)
  latents = jax.random.normal(k_init, cond_latents.shape)       # DDIM init sigma is 1
  ddim = DDIM(cfg.scheduler)
  for i, t in enumerate(ddim.timesteps(cfg.num_steps)):
    noise = jax.random.normal(jax.random.fold_in(k_steps, i), latents.shape)
    latents = _denoise_step(models.unet, latents, jnp.int32(t), cond_latents, labels,
                            models.text_embeddings, noise, num_steps=cfg.num_steps,
                            eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                            scheduler=cfg.scheduler)
  decoded = _decode(models.vae, latents / models.vae.cfg.scaling_factor)
  return jnp.clip(decoded / 2.0 + 0.5, 0.0, 1.0)


# Module-level jitted calls (a jitted lambda made inside a function is a new function
# at every call, compiled again for every image).
@nnx.jit
def _decode(vae, latents):
  return vae.decode(latents)


@nnx.jit
def _gslrm_forward(gslrm, images, c2w, K):
  return gslrm(images, c2w, K)


# ----------------------------------------------------------------------------
# Stage 3: reconstruction and outputs.


def reconstruct(models: FaceLiftModels, views, size: Optional[int] = None):
  """views [V, S, S, 3] at FaceLift's cameras -> GSLRMOutput (batch 1)."""
  size = views.shape[1] if size is None else size
  c2w, K = facelift_cameras(size=size)
  c2w, K = c2w[:views.shape[0]], K[:views.shape[0]]
  return _gslrm_forward(models.gslrm, views[None], c2w[None], K[None])


def render(gaussians, c2w, K, size: int):
  """Gaussians [N, *] at cameras c2w [C, 4, 4] -> images [C, S, S, 3] (white background).
  Needs `kaojax.render.rasterize_gaussians`."""
  from kaojax.render import rasterize_gaussians
  out = rasterize_gaussians(gaussians, jnp.linalg.inv(c2w), K, size, size, jnp.ones(3))
  return out["color"]


def turntable_cameras(frames: int, size: int):
  """FaceLift's turntable: azimuth 270..630 deg (frames, endpoint excluded), elevation 0,
  radius 2.7, 50 deg FOV. Returns c2w [F, 4, 4], K [F, 3, 3]."""
  az = jnp.linspace(270.0, 630.0, frames, endpoint=False)
  c2w = orbit_cameras(az, 0.0, FACELIFT_RADIUS, up="z")
  K = jnp.broadcast_to(intrinsics_from_fov(FACELIFT_FOV_DEG, size, size), (frames, 3, 3))
  return c2w, K


def _save_png(path, image):
  from PIL import Image
  Image.fromarray(np.asarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255), np.uint8)).save(path)


def _save_video(path: pathlib.Path, frames, fps: int) -> pathlib.Path:
  """turntable.mp4 when an ffmpeg backend is installed, else an animated GIF next to it."""
  import imageio.v3 as iio
  frames = np.asarray(np.clip(np.asarray(frames) * 255.0 + 0.5, 0, 255), np.uint8)
  try:
    iio.imwrite(path, frames, fps=fps)
    return path
  except Exception:                                      # no ffmpeg / pyav plugin
    path.unlink(missing_ok=True)                         # drop a partial file
    gif = path.with_suffix(".gif")
    iio.imwrite(gif, frames, duration=1000.0 / fps, loop=0)
    return gif


def run(models: FaceLiftModels, image, out_dir, cfg: FaceLiftConfig = FaceLiftConfig(),
        render_outputs: bool = True) -> dict:
  """Full pipeline on one pre-cropped image [S, S, 3] in [0, 1]; writes input.png,
  multiview.png, gaussians.ply and (with a renderer) output.png and the turntable.
  Returns {name: path or array}. An image with values outside [0, 1] or not finite,
  or a run whose views or Gaussians are not finite, raises ValueError before any
  file is written."""
  from kaojax.export.ply import write_gslrm_ply
  image = jnp.asarray(image, jnp.float32)
  if image.shape != (cfg.image_size, cfg.image_size, 3):
    raise ValueError(f"image must be [{cfg.image_size}, {cfg.image_size}, 3] in [0, 1], "
                     f"got {image.shape}")
  check_unit_range(image, "FaceLift input image")
  views = generate_views(models, image, cfg)
  recon = reconstruct(models, views)
  keep = np.asarray(post_filter_mask(recon.xyz[0], recon.scales[0], recon.opacities[0],
                                     cfg.post_filter))
  for name, value in (("generated views", views), ("Gaussians", recon)):
    if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(value)):
      raise ValueError(f"FaceLift produced non-finite {name}; nothing was written")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  _save_png(out_dir / "input.png", image)
  _save_png(out_dir / "multiview.png", jnp.concatenate(list(views), axis=1))
  result = {"views": views, "gaussians": recon, "keep": keep,
            "ply": write_gslrm_ply(out_dir / "gaussians.ply", recon, mask=keep),
            "input": out_dir / "input.png", "multiview": out_dir / "multiview.png"}
  if render_outputs:
    g = jax.tree_util.tree_map(jnp.asarray, select(
        jax.tree_util.tree_map(lambda a: a[0], recon.gaussians()), keep))
    c2w, K = facelift_cameras(size=cfg.image_size)
    tc2w, tK = turntable_cameras(cfg.turntable_frames, cfg.image_size)
    v = cfg.num_views                      # one renderer call (one compile) for all cameras
    images = render(g, jnp.concatenate([c2w[:v], tc2w]), jnp.concatenate([K[:v], tK]),
                    cfg.image_size)
    renders, frames = images[:v], images[v:]
    result["renders"] = renders
    _save_png(out_dir / "output.png", jnp.concatenate(list(renders), axis=1))
    result["output"] = out_dir / "output.png"
    result["turntable"] = _save_video(out_dir / "turntable.mp4", frames, cfg.turntable_fps)
  return result


def main(argv=None):
  """python -m kaojax.infer.facelift --image crop.png --out DIR (--tiny | --weights ...)"""
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image", required=True, help="pre-cropped face image (square)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--tiny", action="store_true", help="random-weight toy models (smoke test)")
  parser.add_argument("--mvdiffusion", help="diffusers pipeline folder (unet/, vae/, ...)")
  parser.add_argument("--gslrm", help="GS-LRM checkpoint")
  parser.add_argument("--text-embeddings", help="[6, 77, 1024] prompt embeddings file")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--guidance", type=float, default=3.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--turntable-frames", type=int, default=150)
  parser.add_argument("--dtype", default="float32", help="UNet/VAE/CLIP compute dtype")
  args = parser.parse_args(argv)
  from PIL import Image
  if args.tiny:
    models, scheduler, size = tiny_models(), SchedulerConfig(), 32
  else:
    if not (args.mvdiffusion and args.gslrm and args.text_embeddings):
      parser.error("--mvdiffusion, --gslrm and --text-embeddings are required without --tiny")
    models, scheduler = load_models(args.mvdiffusion, args.gslrm, args.text_embeddings,
                                    dtype=args.dtype)
    size = 512
  image = Image.open(args.image).convert("RGB").resize((size, size), Image.BICUBIC)
  cfg = FaceLiftConfig(image_size=size, num_steps=args.steps, guidance_scale=args.guidance,
                       seed=args.seed, turntable_frames=args.turntable_frames,
                       scheduler=scheduler)
  result = run(models, np.asarray(image, np.float32) / 255.0, args.out, cfg)
  for name in ("input", "multiview", "ply", "output", "turntable"):
    if name in result:
      print(f"{name}: {result[name]}")


if __name__ == "__main__":
  main()
