"""DDIM / DDPM / min-SNR against diffusers' schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from kaojax.models.mvdiffusion.scheduler import (DDIM, SchedulerConfig, add_noise,
                                                 alphas_cumprod, inference_timesteps,
                                                 min_snr_weights, velocity)

# SD2.1-unCLIP's DDIM config (as FaceLift uses it)
UNCLIP_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", prediction_type="v_prediction",
                   set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                   timestep_spacing="leading")


def test_leading_timesteps():
  cfg = SchedulerConfig.from_diffusers(UNCLIP_DDIM)
  ts = inference_timesteps(cfg, 50)
  assert ts[0] == 981 and ts[-1] == 1 and np.all(np.diff(ts) == -20)
  for spacing in ("leading", "trailing", "linspace"):
    ref = DDIMScheduler(**{**UNCLIP_DDIM, "timestep_spacing": spacing})
    ref.set_timesteps(37)
    got = inference_timesteps(SchedulerConfig.from_diffusers(ref.config), 37)
    np.testing.assert_array_equal(got, ref.timesteps.numpy(), err_msg=spacing)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_ddim_step_by_step(eta, prediction_type):
  conf = {**UNCLIP_DDIM, "prediction_type": prediction_type}
  ref = DDIMScheduler(**conf)
  ref.set_timesteps(50)
  ours = DDIM(SchedulerConfig.from_diffusers(conf))
  ts = ours.timesteps(50)
  rng = np.random.default_rng(0)
  x_ref = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
  x = jnp.asarray(x_ref)
  step = jax.jit(lambda out, t, s, z: ours.step(out, t, s, 50, eta=eta, noise=z))
  x_t = torch.from_numpy(x_ref)
  for i, t in enumerate(ts):
    # a fake "model": any deterministic function of the sample and t
    model_out = np.tanh(0.7 * np.asarray(x_t) + 0.001 * t).astype(np.float32)
    noise = rng.normal(size=x_ref.shape).astype(np.float32)
    out = ref.step(torch.from_numpy(model_out), int(t), x_t, eta=eta,
                   variance_noise=torch.from_numpy(noise))
    x, x0 = step(jnp.asarray(model_out), jnp.int32(t), jnp.asarray(np.asarray(x_t)),
                 jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(x0), out.pred_original_sample.numpy(),
                               atol=1e-5, rtol=1e-5, err_msg=f"x0 at step {i} (t={t})")
    np.testing.assert_allclose(np.asarray(x), out.prev_sample.numpy(), atol=1e-5, rtol=1e-5,
                               err_msg=f"prev sample at step {i} (t={t})")
    x_t = out.prev_sample


def test_ddpm_add_noise_velocity_and_min_snr():
  ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="v_prediction")
  cfg = SchedulerConfig(prediction_type="v_prediction")
  a = jnp.asarray(alphas_cumprod(cfg))
  # diffusers accumulates the product in float32 (relative drift ~1e-6 over 1000 steps)
  np.testing.assert_allclose(np.asarray(a), ref.alphas_cumprod.numpy(), rtol=1e-5)
  exact = np.cumprod(1 - ref.betas.double().numpy())
  np.testing.assert_allclose(np.asarray(a), exact, rtol=1e-6)
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 500, 999])
  tt = torch.from_numpy(t)
  np.testing.assert_allclose(add_noise(a, x0, noise, t),
                             ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt),
                             atol=1e-6)
  np.testing.assert_allclose(velocity(a, x0, noise, t),
                             ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt),
                             atol=1e-6)
  # min-SNR-5 written out from the definition, in float64
  ab = ref.alphas_cumprod.double().numpy()[t]
  snr = ab / (1 - ab)
  np.testing.assert_allclose(min_snr_weights(a, t, 5.0), np.minimum(snr, 5) / snr, rtol=1e-5)
  np.testing.assert_allclose(min_snr_weights(a, t, 5.0, v_prediction_plus_one=True),
                             np.minimum(snr, 5) / (snr + 1), rtol=1e-5)
  assert float(min_snr_weights(a, np.array([999]))[0]) == pytest.approx(1.0)


def test_cosine_schedule_matches_diffusers():
  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
  got = alphas_cumprod(SchedulerConfig(beta_schedule="squaredcos_cap_v2"))
  np.testing.assert_allclose(got, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


def test_eta_needs_noise():
  with pytest.raises(ValueError, match="noise"):
    DDIM().step(jnp.zeros(3), 981, jnp.zeros(3), 50, eta=1.0)
