"""The diffusion training loss at fixed timesteps and noise equals diffusers'
computation of it: UNet2DConditionModel + DDPMScheduler (v target, min-SNR-5 weights),
through the diffusers-folder converter, with num_views=1 (the sparse attention of one
view is plain self-attention); a stock 4-channel UNet widened for the input-view
latent computes what it did."""

import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from flax import nnx

from kaojax.convert.diffusers import load_unet
from kaojax.infer.facelift import random_init
from kaojax.models.mvdiffusion.loss import denoising_loss
from kaojax.models.mvdiffusion.scheduler import SchedulerConfig, alphas_cumprod
from kaojax.models.mvdiffusion.unet import UNet, unet_config
from kaojax.train.facelift_mvdiff import widen_input
from tests.facelift.diffusers_util import nchw, perturb_
from tests.facelift.unet_parity_test import TINY


def torch_loss(unet, scheduler, x0, cond, noise, t, text, labels, gamma=5.0):
  """The reference's training loss (v-prediction, min-SNR weights) in torch."""
  noisy = scheduler.add_noise(x0, noise, t)
  target = scheduler.get_velocity(x0, noise, t)
  pred = unet(torch.cat([noisy, cond], 1), t, encoder_hidden_states=text,
              class_labels=labels).sample
  a = scheduler.alphas_cumprod[t]
  snr = a / (1 - a)
  weights = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
  per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
  return float((per_sample * weights).mean())


def test_loss_matches_diffusers(tmp_path):
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**TINY).eval()
  perturb_(ref, seed=1)
  ref.save_pretrained(tmp_path)
  scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            num_train_timesteps=1000, prediction_type="v_prediction")
  rng = np.random.default_rng(0)
  n, size = 3, 8
  x0 = rng.normal(size=(n, size, size, 4)).astype(np.float32)
  cond = rng.normal(size=(n, size, size, 4)).astype(np.float32)
  noise = rng.normal(size=(n, size, size, 4)).astype(np.float32)
  text = rng.normal(size=(n, 5, TINY["cross_attention_dim"])).astype(np.float32)
  labels = rng.normal(size=(n, TINY["projection_class_embeddings_input_dim"])).astype(np.float32)
  t = np.array([20, 480, 977])
  with torch.no_grad():
    want = torch_loss(ref, scheduler, nchw(x0), nchw(cond), nchw(noise), torch.from_numpy(t),
                      torch.from_numpy(text), torch.from_numpy(labels))
  unet = load_unet(tmp_path, num_views=1)
  alpha_bar = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  np.testing.assert_allclose(alpha_bar, scheduler.alphas_cumprod.numpy(), rtol=1e-6)
  got, _ = denoising_loss(unet, jnp.asarray(x0), jnp.asarray(cond), jnp.asarray(labels),
                          jnp.asarray(text), jnp.asarray(t), jnp.asarray(noise), alpha_bar)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_widened_stock_unet_ignores_the_new_channels():
  stock = random_init(lambda: UNet(unet_config("tiny", in_channels=4, num_views=1),
                                   nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  extra = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 3, 24)), jnp.float32)
  labels = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
  want = stock(x, jnp.array([5, 500]), text, labels)
  wide = widen_input(stock)
  assert wide.cfg.in_channels == 8
  got = wide(jnp.concatenate([x, extra], -1), jnp.array([5, 500]), text, labels)
  np.testing.assert_allclose(got, want, atol=1e-5)
