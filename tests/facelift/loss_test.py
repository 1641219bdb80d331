"""Multi-view diffusion training objective: shared timesteps, dropout bands, min-SNR
weighting, v target (checked against diffusers' DDPMScheduler)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDPMScheduler

from kaojax.models.mvdiffusion.loss import condition_dropout, mvdiffusion_loss
from kaojax.models.mvdiffusion.scheduler import SchedulerConfig, alphas_cumprod


def test_dropout_bands():
  u = jnp.array([0.01, 0.049, 0.05, 0.09, 0.10, 0.149, 0.15, 0.9])
  keep_labels, keep_latents = condition_dropout(u)
  assert keep_labels.tolist() == [False, False, False, False, True, True, True, True]
  assert keep_latents.tolist() == [True, True, False, False, False, False, True, True]


def test_loss_against_diffusers_noising():
  views, subjects = 3, 2
  n = views * subjects
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(n, 4, 4, 4)).astype(np.float32)
  img = rng.normal(size=(n, 4, 4, 4)).astype(np.float32)
  labels = rng.normal(size=(n, 6)).astype(np.float32)
  text = rng.normal(size=(n, 3, 5)).astype(np.float32)
  calls = {}

  def fake_unet(x, t, ctx, lab):        # records its inputs, predicts a fixed function
    calls.update(x=x, t=t, lab=lab)
    return jnp.tanh(x[..., :4]) + lab[:, :1, None, None]

  a = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  key = jax.random.key(5)
  loss, aux = mvdiffusion_loss(fake_unet, x0, img, labels, text, key, a, views,
                               dropout=(0.0, 0.0, 0.0))
  t = np.array(aux["t"], dtype=np.int64)
  assert np.all(t.reshape(subjects, views) == t.reshape(subjects, views)[:, :1])   # shared
  ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="v_prediction")
  noisy = np.asarray(calls["x"][..., :4])
  np.testing.assert_array_equal(np.asarray(calls["x"][..., 4:]), img)
  # recover the noise from x_t, then rebuild x_t and v with diffusers
  ab = ref.alphas_cumprod.numpy()[t][:, None, None, None]
  noise = (noisy - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
  tt = torch.from_numpy(t)
  np.testing.assert_allclose(
      noisy, ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(), atol=1e-5)
  v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  pred = np.tanh(noisy) + labels[:, :1, None, None]
  snr = ab[:, 0, 0, 0] / (1 - ab[:, 0, 0, 0])
  want = np.mean(((pred - v) ** 2).mean(axis=(1, 2, 3)) * np.minimum(snr, 5.0) / snr)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_dropout_zeroes_conditioning_per_subject():
  views, subjects = 2, 64
  n = views * subjects
  ones = jnp.ones((n, 2, 2, 4))
  seen = {}

  def fake_unet(x, t, ctx, lab):
    seen.update(x=x, lab=lab)
    return jnp.zeros_like(x[..., :4])

  a = jnp.asarray(alphas_cumprod(SchedulerConfig()))
  _, aux = mvdiffusion_loss(fake_unet, ones, ones, jnp.ones((n, 3)), jnp.ones((n, 1, 1)),
                            jax.random.key(0), a, views, dropout=(0.2, 0.4, 0.6))
  kl, kt = np.asarray(aux["keep_labels"]), np.asarray(aux["keep_latents"])
  np.testing.assert_array_equal(np.asarray(seen["lab"])[:, 0], kl.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(seen["x"])[:, 0, 0, 4], kt.astype(np.float32))
  assert np.all(kl.reshape(subjects, views) == kl.reshape(subjects, views)[:, :1])
  assert 0 < (~kl).sum() < n and 0 < (~kt).sum() < n and np.any(~kl & ~kt)
