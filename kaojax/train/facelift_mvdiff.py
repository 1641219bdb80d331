"""Multi-view diffusion fine-tuning (FaceLift's view generator; configs/facelift_mvdiff.py):
the job `train_mvdiff`.

Per subject, FaceLift's six fixed views (front first) on a random background
(data_pipeline.facelift_sources). Conditions, as the reference computes them: the
front view's CLIP image embedding, noise-augmented at level 0 through the unCLIP
normaliser (`models/mvdiffusion/conditioning.py`), and its VAE posterior mode x
scaling as 4 extra input channels; targets are VAE posterior samples x scaling of the
six views. The objective is `models/mvdiffusion/loss.mvdiffusion_loss`: one DDPM
timestep per subject, v target, min-SNR-5 weights, condition dropout drawn per subject
(rate r: CLIP only [0, r), both [r, 2r), latents only [2r, 3r)). The UNet trains; the
VAE, CLIP and the per-view text embeddings are frozen (`Conditioners`). EMA weights
follow diffusers' EMAModel (decay min(d, (1 + n) / (10 + n))).

Evaluation on held-out subjects (white background): `eval/loss` (and `eval/loss_ema`
with the EMA weights) is the same objective at fixed timesteps (config.eval.timesteps)
with fixed noise, no dropout and posterior modes as targets; with
config.eval.sample_steps > 0, six views are sampled (DDIM + guidance, EMA weights) for
the first config.eval.sample_subjects subjects and scored against the ground truth
(`eval/sample_psnr`, `eval/sample_ssim`), with grids in WORKDIR/images.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import facelift_layout, facelift_sources
from data_pipeline.view_batch import make_view_batch
from kaojax import losses
from kaojax.geometry.cameras import FACELIFT_VIEWS
from kaojax.infer import facelift as facelift_infer
from kaojax.models.mvdiffusion.clip import CLIPVisionEncoder, clip_vision_config, preprocess
from kaojax.models.mvdiffusion.conditioning import noise_augmented_labels
from kaojax.models.mvdiffusion.loss import denoising_loss, mvdiffusion_loss
from kaojax.models.mvdiffusion.scheduler import SchedulerConfig, alphas_cumprod
from kaojax.models.mvdiffusion.unet import UNet, unet_config
from kaojax.models.mvdiffusion.vae import VAE, vae_config
from kaojax.nn.params import mark_parameters
from kaojax.train import facelift_loop

NUM_VIEWS = len(FACELIFT_VIEWS)


class Conditioners(nnx.Module):
  """The frozen networks and tables of the conditioning: VAE, CLIP vision encoder,
  per-view text embeddings [V, T, D], unCLIP normaliser mean / std [P]."""

  def __init__(self, vae: VAE, clip: CLIPVisionEncoder, text, mean, std):
    self.vae, self.clip = vae, clip
    self.text = nnx.Variable(jnp.asarray(text, jnp.float32))
    self.mean = nnx.Variable(jnp.asarray(mean, jnp.float32))
    self.std = nnx.Variable(jnp.asarray(std, jnp.float32))


def random_networks(config):
  """(UNet, Conditioners) with random weights at config.model's presets."""
  m = config.model
  unet_cfg = unet_config(m.preset, num_views=NUM_VIEWS, dtype=m.dtype,
                         attention_chunk=m.attention_chunk or None, remat=m.remat)
  clip_cfg = clip_vision_config(m.clip_preset, dtype=m.dtype)
  unet = facelift_infer.random_init(lambda: UNet(unet_cfg, nnx.Rngs(0)), config.seed)
  vae = facelift_infer.random_init(
      lambda: VAE(vae_config(m.vae_preset, dtype=m.dtype), nnx.Rngs(0)), config.seed + 1)
  clip = facelift_infer.random_init(lambda: CLIPVisionEncoder(clip_cfg, nnx.Rngs(0)),
                                    config.seed + 2)
  text = jax.random.normal(jax.random.key(config.seed + 3),
                           (NUM_VIEWS, m.text_tokens, unet_cfg.cross_attention_dim))
  dim = clip_cfg.projection_dim
  return unet, Conditioners(vae, clip, text, jnp.zeros(dim), jnp.ones(dim))


def widen_input(unet: UNet) -> UNet:
  """A 4-channel (stock SD2.1-unCLIP) UNet -> the same UNet taking 8 channels (noisy
  latent ++ input-view latent), the new input channels' conv_in weights zero, so that
  it starts as the stock model (an assumption: the reference widens the layer inside
  its own UNet class)."""
  cfg = dataclasses.replace(unet.cfg, in_channels=8)
  wide = nnx.eval_shape(lambda: UNet(cfg, nnx.Rngs(0)))
  params = nnx.state(unet)
  kernel = params["conv_in"]["kernel"]
  kernel.set_value(jnp.concatenate([kernel[...], jnp.zeros_like(kernel[...])], axis=2))
  nnx.update(wide, params)
  return wide


def pretrained_networks(config):
  """(UNet, Conditioners) from a diffusers SD2.1-unCLIP-layout folder
  (config.init.mvdiffusion: unet/ - FaceLift's 8-channel UNet, or SD2.1-unCLIP's
  4-channel one widened by `widen_input` -, vae/, image_encoder/, image_normalizer/)
  and the [6, 77, 1024] prompt embeddings file (config.init.text_embeddings)."""
  from kaojax.convert.clip import load_clip_vision  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from kaojax.convert.diffusers import load_unet, load_vae, read_diffusers_folder
  root, m = pathlib.Path(config.init.mvdiffusion), config.model
  _, norm = read_diffusers_folder(root / "image_normalizer")
  unet = load_unet(root / "unet", num_views=NUM_VIEWS, dtype=m.dtype,
                   attention_chunk=m.attention_chunk or None, remat=m.remat)
  if unet.cfg.in_channels == 4:
    unet = widen_input(unet)
  if unet.cfg.in_channels != 8:
    raise ValueError(f"{root / 'unet'} has {unet.cfg.in_channels} input channels; FaceLift's "
                     "UNet takes 8 (noisy latent + input-view latent)")
  conditioners = Conditioners(
      load_vae(root / "vae", dtype=m.dtype),
      load_clip_vision(root / "image_encoder", dtype=m.dtype),
      facelift_infer.load_text_embeddings(config.init.text_embeddings),
      np.reshape(norm["mean"], -1), np.reshape(norm["std"], -1))
  return unet, conditioners


def build_networks(config):
  if config.init.mvdiffusion:
    unet, conditioners = pretrained_networks(config)
    logging.info("multi-view diffusion initialised from %s", config.init.mvdiffusion)
  else:
    unet, conditioners = random_networks(config)
  # torch's AdamW in the reference decays every parameter (norms and biases too).
  mark_parameters(unet)
  for _, param in nnx.iter_graph(unet):
    if isinstance(param, nnx.Param):
      param.set_metadata(weight_decay=True)
  return unet, conditioners


def conditions(cond: Conditioners, images, key):
  """images [B, V, S, S, 3] (view 0 the input) -> (class_labels [B*V, 2P], input
  latents [B*V, h, w, 4], text [B*V, T, D])."""
  b, v = images.shape[:2]
  front = images[:, 0]
  embeds = cond.clip(preprocess(front, cond.clip.cfg.image_size)).astype(jnp.float32)
  noising = jnp.asarray(alphas_cumprod(facelift_infer.NOISING_SCHEDULER))
  labels = noise_augmented_labels(embeds, cond.mean[...], cond.std[...], noising, 0,
                                  jax.random.normal(key, embeds.shape))
  sf = cond.vae.cfg.scaling_factor
  latents = cond.vae.encode(front * 2.0 - 1.0)[0].astype(jnp.float32) * sf
  text = jnp.tile(cond.text[...], (b, 1, 1))
  return jnp.repeat(labels, v, 0), jnp.repeat(latents, v, 0), text


def flat_views(images):
  return images.reshape((-1,) + images.shape[2:])


def make_loss(config):
  """loss_fn(unet, batch, key, conditioners) -> (total, terms)."""
  alpha_bar = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  r = config.loss.condition_drop_rate

  def loss_fn(unet, batch, key, cond):
    k_aug, k_sample, k_loss = jax.random.split(key, 3)
    labels, latents, text = conditions(cond, batch.images, k_aug)
    targets = cond.vae.sample(flat_views(batch.images) * 2.0 - 1.0, k_sample)
    targets = targets.astype(jnp.float32) * cond.vae.cfg.scaling_factor
    loss, aux = mvdiffusion_loss(unet, targets, latents, labels, text, k_loss, alpha_bar,
                                 NUM_VIEWS, config.loss.snr_gamma, (r, 2 * r, 3 * r))
    return loss, {"mse": jnp.mean(aux["per_view_mse"])}

  return loss_fn


def load_eval_set(root, config):
  """Held-out subjects (six views on white) -> list of ViewBatches."""
  uids = facelift_layout.read_split(root, "val")[:config.eval.max_subjects]
  rng = np.random.default_rng(config.seed)
  samples = [facelift_sources.load_fixed_views(pathlib.Path(root) / uid, rng,
                                               config.data.image_size, "white")
             for uid in uids]
  size = config.eval.batch_size
  return [make_view_batch(samples[i:i + size]) for i in range(0, len(samples), size)]


def make_eval_loss(config):
  """(unet, batch, noise_key, conditioners) -> mean objective over config.eval.timesteps
  (fixed noise, no dropout, posterior modes as targets)."""
  alpha_bar = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  timesteps = tuple(int(t) for t in config.eval.timesteps)

  def eval_loss(unet, batch, key, cond):
    k_aug, k_noise = jax.random.split(key)
    labels, latents, text = conditions(cond, batch.images, k_aug)
    targets = cond.vae.encode(flat_views(batch.images) * 2.0 - 1.0)[0]
    targets = targets.astype(jnp.float32) * cond.vae.cfg.scaling_factor
    total = 0.0
    for i, t in enumerate(timesteps):
      noise = jax.random.normal(jax.random.fold_in(k_noise, i), targets.shape)
      t_all = jnp.full((targets.shape[0],), t, jnp.int32)
      total = total + denoising_loss(unet, targets, latents, labels, text, t_all, noise,
                                     alpha_bar, snr_gamma=config.loss.snr_gamma)[0]
    return total / len(timesteps)

  return eval_loss


def make_evaluate(config, root, workdir, conditioners):
  """evaluate(graphdef, state, step) -> {"eval/loss", "eval/loss_ema"(, sample scores)}."""
  eval_set = load_eval_set(root, config)
  eval_loss = make_eval_loss(config)
  cond_graph, cond_state = nnx.split(conditioners)
  key = jax.random.key(config.seed + 1)
  workdir = pathlib.Path(workdir)

  def loss_of(graphdef, params, rest, cstate, batch, key):
    return eval_loss(nnx.merge(graphdef, params, rest), batch, key,
                     nnx.merge(cond_graph, cstate))

  jitted = jax.jit(loss_of, static_argnums=0)

  def evaluate(graphdef, state, step):
    metrics = {}
    for name, params in (("loss", state.params), ("loss_ema", state.ema)):
      values = [float(jitted(graphdef, params, state.rest, cond_state, batch,
                             jax.random.fold_in(key, i)))
                for i, batch in enumerate(eval_set)]
      metrics[f"eval/{name}"] = float(np.mean(values))
    if config.eval.sample_steps > 0:
      metrics.update(sample_and_score(config, graphdef, state, conditioners, eval_set[0],
                                      workdir / "images" / f"step_{step:06d}.png"))
    return metrics

  return evaluate


def sample_and_score(config, graphdef, state, conditioners, batch, grid_path):
  """Six views sampled (EMA weights; `kaojax.infer.facelift.generate_views`) for the
  first config.eval.sample_subjects subjects of `batch`, scored against the ground
  truth; a grid (input | truth | samples rows) per evaluation."""
  unet = nnx.merge(graphdef, jax.device_get(state.ema), jax.device_get(state.rest))
  models = facelift_infer.FaceLiftModels(
      unet=unet, vae=conditioners.vae, clip=conditioners.clip, gslrm=None,
      text_embeddings=conditioners.text[...], normalizer_mean=conditioners.mean[...],
      normalizer_std=conditioners.std[...])
  cfg = facelift_infer.FaceLiftConfig(
      image_size=config.data.image_size, num_views=NUM_VIEWS,
      num_steps=config.eval.sample_steps, guidance_scale=config.eval.guidance_scale,
      seed=config.seed)
  truth = np.asarray(batch.images[:config.eval.sample_subjects])
  views = np.stack([np.asarray(facelift_infer.generate_views(models, jnp.asarray(t[0]), cfg))
                    for t in truth])
  mse = np.mean(np.square(views - truth), axis=(-3, -2, -1))
  ssim = np.mean(np.asarray(losses.photometric.ssim_map(jnp.asarray(views),
                                                        jnp.asarray(truth))), axis=(-3, -2, -1))
  if jax.process_index() == 0:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    rows = [np.concatenate(list(x), axis=1) for x in (truth[0], views[0])]
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(np.concatenate(rows, 0), 0, 1) * 255).round()
                    .astype(np.uint8)).save(grid_path)
  return {"eval/sample_psnr": float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10)))),
          "eval/sample_ssim": float(np.mean(ssim))}


def train(config, workdir) -> dict:
  """The job `train_mvdiff`: returns the last evaluation's metrics."""
  workdir, device_mesh = facelift_loop.setup(config, workdir)
  root = facelift_loop.heads_root(config, workdir)
  loader = facelift_sources.mvdiff_loader(root, "train", config.data.image_size,
                                          config.data.background)
  unet, conditioners = build_networks(config)
  task = facelift_loop.Task(
      model=unet, loss_fn=make_loss(config), loader=loader, frozen=conditioners,
      ema_decay=config.ema_decay,
      evaluate=(make_evaluate(config, root, workdir, conditioners)
                if config.eval_every > 0 else None))
  logging.info("multi-view diffusion training: %d subjects, %d steps, device mesh %s",
               loader.num_subjects, config.total_steps, dict(device_mesh.shape))
  return facelift_loop.train(config, workdir, device_mesh, task)
