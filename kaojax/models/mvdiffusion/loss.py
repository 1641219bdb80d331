"""FaceLift's multi-view diffusion training objective.

Per subject (a group of V views): one timestep t ~ U{0..T-1} shared by its V views,
Gaussian noise per view, x_t = DDPM-noised target latents, target v; conditioning
dropout drawn once per subject, u ~ U[0, 1):
  u < 0.05          drop the CLIP class labels (zeros)
  0.05 <= u < 0.10  drop both class labels and input-image latents
  0.10 <= u < 0.15  drop the input-image latents
loss = mean over subjects of w(t) * mean((unet(x_t ++ image latents) - v)^2) with the
min-SNR weight w(t) = min(snr, gamma) / snr (gamma 5).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from kaojax.models.mvdiffusion.scheduler import add_noise, min_snr_weights, velocity


def condition_dropout(u, thresholds: Sequence[float] = (0.05, 0.10, 0.15)):
  """u [B] uniform draws -> (keep_labels [B], keep_latents [B]) booleans."""
  a, b, c = thresholds
  drop_labels = u < b                       # [0, a): labels only; [a, b): both
  drop_latents = (u >= a) & (u < c)         # [a, b): both; [b, c): latents only
  return ~drop_labels, ~drop_latents


def mvdiffusion_loss(unet, target_latents, image_latents, class_labels, text, key, alpha_bar,
                     num_views: int, snr_gamma: float = 5.0,
                     dropout: Sequence[float] = (0.05, 0.10, 0.15)):
  """target_latents, image_latents [B*V, h, w, 4] (already x scaling factor);
  class_labels [B*V, 2P]; text [B*V, T, D]; alpha_bar [T]. Returns (loss, aux dict)."""
  n = target_latents.shape[0]
  if n % num_views:
    raise ValueError(f"batch {n} is not a multiple of num_views={num_views}")
  subjects = n // num_views
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t_subject = jax.random.randint(k_t, (subjects,), 0, alpha_bar.shape[0])
  t = jnp.repeat(t_subject, num_views)
  noise = jax.random.normal(k_noise, target_latents.shape, target_latents.dtype)
  keep_labels, keep_latents = condition_dropout(jax.random.uniform(k_drop, (subjects,)), dropout)
  keep_labels = jnp.repeat(keep_labels, num_views)
  keep_latents = jnp.repeat(keep_latents, num_views)
  return denoising_loss(unet, target_latents, image_latents, class_labels, text, t, noise,
                        alpha_bar, keep_labels, keep_latents, snr_gamma)


def denoising_loss(unet, target_latents, image_latents, class_labels, text, t, noise,
                   alpha_bar, keep_labels=None, keep_latents=None, snr_gamma: float = 5.0):
  """The objective at given timesteps t [N], noise [N, h, w, 4] and kept conditions
  keep_labels / keep_latents [N] bool (None: all kept); other shapes as in
  `mvdiffusion_loss`. Returns (loss, aux dict)."""
  n = target_latents.shape[0]
  keep_labels = jnp.ones((n,), bool) if keep_labels is None else keep_labels
  keep_latents = jnp.ones((n,), bool) if keep_latents is None else keep_latents
  noisy = add_noise(alpha_bar, target_latents, noise, t)
  target = velocity(alpha_bar, target_latents, noise, t)
  labels = jnp.where(keep_labels[:, None], class_labels, 0.0)
  cond = jnp.where(keep_latents[:, None, None, None], image_latents, 0.0)
  pred = unet(jnp.concatenate([noisy, cond], -1), t, text, labels)
  per_view = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=(1, 2, 3))
  weights = min_snr_weights(alpha_bar, t, snr_gamma)
  loss = jnp.mean(per_view * weights)
  return loss, {"t": t, "weights": weights, "per_view_mse": per_view,
                "keep_labels": keep_labels, "keep_latents": keep_latents}
