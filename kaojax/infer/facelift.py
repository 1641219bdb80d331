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

The job `infer_facelift` (`run_job`, configs/infer_facelift.py) runs this on photos,
folders and videos through `kaojax.infer.runner`: MTCNN and FaceLift's crop
(`kaojax.infer.crops.facelift_transform`) first, a results.jsonl row per input.
Not included: background removal (the reference's rembg weights cannot be fetched
here; RGBA inputs are composited on white) and the text encoder (embeddings come from
a file). `tiny_models` builds random-weight presets that run on CPU in seconds.
"""

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaojax.geometry.cameras import (FACELIFT_FOV_DEG, FACELIFT_RADIUS, facelift_cameras,
                                     intrinsics_from_fov, orbit_cameras)
from kaojax.images import check_unit_range
from kaojax.infer import crops, runner
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
  from kaojax.convert.diffusers import read_diffusers_folder
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

  models = FaceLiftModels(
      unet=_network(root / "unet", "unet", num_views=num_views, dtype=dtype,
                    attention_chunk=attention_chunk),
      vae=_network(root / "vae", "vae", dtype=dtype),
      clip=load_clip_vision(root / "image_encoder", dtype=dtype),
      gslrm=_network(gslrm_checkpoint, "gslrm", attention_chunk=attention_chunk),
      text_embeddings=jnp.asarray(load_text_embeddings(text_embeddings)),
      normalizer_mean=jnp.asarray(norm["mean"]).reshape(-1),
      normalizer_std=jnp.asarray(norm["std"]).reshape(-1),
      noising_scheduler=(SchedulerConfig.from_diffusers(noising) if noising
                         else NOISING_SCHEDULER))
  return models, (SchedulerConfig.from_diffusers(sched) if sched else SchedulerConfig())


def _network(path, kind: str, **options):
  """A kaojax model directory (converted, or written by a training run), or the
  released PyTorch / diffusers weights converted on the way in."""
  if loading.is_model_directory(path):
    return loading.load_network(path, kind, **options)
  from kaojax.convert.diffusers import load_unet, load_vae
  from kaojax.convert.gslrm import load_gslrm
  return {"unet": load_unet, "vae": load_vae, "gslrm": load_gslrm}[kind](path, **options)


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


def predict(models: FaceLiftModels, image, cfg: FaceLiftConfig = FaceLiftConfig(),
            render_outputs: bool = True) -> dict:
  """One pre-cropped image [S, S, 3] in [0, 1] -> {"image", "views" [V, S, S, 3],
  "gaussians" (GS-LRM output), "keep" (post-filter mask) and, with `render_outputs`,
  "renders" [V, S, S, 3] at the 6 cameras and "turntable" [F, S, S, 3]}. An image
  outside [0, 1] or not finite, or non-finite views or Gaussians, raise ValueError."""
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
      raise ValueError(f"FaceLift produced non-finite {name}")
  result = {"image": image, "views": views, "gaussians": recon, "keep": keep}
  if render_outputs:
    g = jax.tree_util.tree_map(jnp.asarray, select(
        jax.tree_util.tree_map(lambda a: a[0], recon.gaussians()), keep))
    c2w, K = facelift_cameras(size=cfg.image_size)
    tc2w, tK = turntable_cameras(cfg.turntable_frames, cfg.image_size)
    v = cfg.num_views                      # one renderer call (one compile) for all cameras
    images = render(g, jnp.concatenate([c2w[:v], tc2w]), jnp.concatenate([K[:v], tK]),
                    cfg.image_size)
    result["renders"], result["turntable"] = images[:v], images[v:]
  return result


def write_outputs(result: dict, out_dir, fps: int = 30) -> dict:
  """A `predict` result -> input.png, multiview.png, gaussians.ply and (when
  rendered) output.png and turntable.mp4 (GIF without ffmpeg) in out_dir; returns
  {name: path}."""
  from kaojax.export.animation import write_animation
  from kaojax.export.ply import write_gslrm_ply
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  _save_png(out_dir / "input.png", result["image"])
  _save_png(out_dir / "multiview.png", jnp.concatenate(list(result["views"]), axis=1))
  paths = {"input": out_dir / "input.png", "multiview": out_dir / "multiview.png",
           "ply": write_gslrm_ply(out_dir / "gaussians.ply", result["gaussians"],
                                  mask=result["keep"])}
  if "renders" in result:
    _save_png(out_dir / "output.png", jnp.concatenate(list(result["renders"]), axis=1))
    paths["output"] = out_dir / "output.png"
    paths["turntable"] = write_animation(out_dir / "turntable.mp4",
                                         np.asarray(result["turntable"]), fps)
  return paths


def run(models: FaceLiftModels, image, out_dir, cfg: FaceLiftConfig = FaceLiftConfig(),
        render_outputs: bool = True) -> dict:
  """`predict` then `write_outputs`: nothing is written when predict fails. Returns
  the result with the written paths added."""
  result = predict(models, image, cfg, render_outputs)
  result.update(write_outputs(result, out_dir, cfg.turntable_fps))
  return result


# ----------------------------------------------------------------------------
# The job over photos, folders and videos (configs/infer_facelift.py).


CROP_SIZE = 512                                # the released models' image size


class FaceLiftTask(runner.Task):
  """FaceLift as the runner's task: MTCNN -> FaceLift's crop (512 canvas, resized to
  the models' image size) -> views, Gaussians, renders -> the files of
  `write_outputs` plus face.npz (box, score, landmarks5, crop_transform, crop_size,
  image_size) per face."""
  name = "infer_facelift"
  batch_size = 1

  def __init__(self, config):
    self.config = config
    if config.crop not in ("facelift", "full"):
      raise ValueError(f"crop must be 'facelift' or 'full' for FaceLift, got {config.crop!r}")
    self.crop_kind = config.crop
    if config.tiny:
      self.models, scheduler, self.image_size = tiny_models(), SchedulerConfig(), 32
      if config.gslrm:      # a trained (e.g. tiny) GS-LRM in place of the toy one
        self.models.gslrm = _network(config.gslrm, "gslrm")
    else:
      missing = [k for k in ("mvdiffusion", "gslrm", "text_embeddings") if not config[k]]
      if missing:
        raise ValueError("FaceLift weights: set " + ", ".join(f"--config.{k}" for k in missing)
                         + " (or use the :tiny preset)")
      self.models, scheduler = load_models(config.mvdiffusion, config.gslrm,
                                           config.text_embeddings, dtype=config.dtype)
      self.image_size = CROP_SIZE
    self.crop_size = crops.FACELIFT_SIZE if self.crop_kind == "facelift" else CROP_SIZE
    self.cfg = FaceLiftConfig(image_size=self.image_size, num_steps=int(config.steps),
                              guidance_scale=float(config.guidance), seed=int(config.seed),
                              turntable_frames=int(config.turntable_frames),
                              turntable_fps=int(config.turntable_fps), scheduler=scheduler)

  def prepare(self, crop):
    from PIL import Image
    if crop.shape[0] != self.image_size:
      crop = np.asarray(Image.fromarray(crop).resize((self.image_size,) * 2, Image.BICUBIC))
    return crop.astype(np.float32) / 255.0

  def predict(self, sources):
    results = []
    for image in sources:
      r = predict(self.models, image, self.cfg, render_outputs=True)
      results.append({"image": np.asarray(r["image"]), "views": np.asarray(r["views"]),
                      "renders": np.asarray(r["renders"]),
                      "turntable": np.asarray(r["turntable"]), "keep": r["keep"],
                      "gaussians": jax.tree.map(np.asarray, r["gaussians"])})
    return results

  def write_face(self, folder, face, frame):
    np.savez(folder / "face.npz", box=np.asarray(face.box, np.float32),
             score=np.float32(face.score),
             landmarks5=np.asarray(face.landmarks5, np.float32),
             crop_transform=face.transform, crop_size=np.int32(self.crop_size),
             image_size=np.array(frame.image_size, np.int32))
    write_outputs(face.result, folder, self.cfg.turntable_fps)


def run_job(config, workdir) -> dict:
  """The job `infer_facelift` (configs/infer_facelift.py)."""
  settings = {k: config[k] for k in ("tiny", "mvdiffusion", "gslrm", "text_embeddings",
                                     "steps", "guidance", "turntable_frames", "dtype")}
  return runner.run(lambda: FaceLiftTask(config), config, workdir, settings)


def main(argv=None):
  """python -m kaojax.infer.facelift --image PHOTO --out DIR (--tiny | --mvdiffusion ...):
  the job `infer_facelift` on one photo (kept for the old command line)."""
  import argparse
  from configs import infer_facelift
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image", required=True, help="a photo (or a folder of photos)")
  parser.add_argument("--out", required=True, help="output folder (the job's workdir)")
  parser.add_argument("--tiny", action="store_true", help="random-weight toy models (smoke test)")
  parser.add_argument("--precropped", action="store_true",
                      help="the image is already FaceLift's crop: no face detection")
  parser.add_argument("--mvdiffusion", default="", help="diffusers pipeline folder")
  parser.add_argument("--gslrm", default="", help="GS-LRM checkpoint")
  parser.add_argument("--text-embeddings", default="", help="[6, 77, 1024] prompt embeddings")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--guidance", type=float, default=3.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--turntable-frames", type=int, default=150)
  parser.add_argument("--dtype", default="float32", help="UNet/VAE/CLIP compute dtype")
  args = parser.parse_args(argv)
  config = infer_facelift.get_config("tiny" if args.tiny else "")
  config.input = args.image
  config.crop = "full" if args.precropped else "facelift"
  for key in ("mvdiffusion", "gslrm", "steps", "guidance", "seed", "turntable_frames",
              "dtype"):
    config[key] = getattr(args, key)
  config.text_embeddings = args.text_embeddings
  if args.tiny:
    config.steps = min(config.steps, 2)
  summary = run_job(config, args.out)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
