"""The unCLIP image conditioning of FaceLift's UNet, batched and jittable:

  class_labels = [unscale(DDPM-noise(scale(clip_embedding), level)) ;
                  sinusoidal(level)]                                   [N, 2P]
  with scale(x) = (x - mean) / std (the unCLIP image normaliser) and the image-noising
  scheduler's alpha_bar (FaceLift trains and samples at level 0).
"""

import jax.numpy as jnp

from kaojax.models.mvdiffusion.layers import timestep_embedding
from kaojax.models.mvdiffusion.scheduler import add_noise


def noise_augmented_labels(embeds, mean, std, noising_alpha_bar, level, noise):
  """embeds [N, P] CLIP image embeddings; mean, std [P]; noising_alpha_bar [T];
  level [] or [N] int; noise [N, P] standard normal -> class_labels [N, 2P]."""
  n = embeds.shape[0]
  level = jnp.broadcast_to(jnp.asarray(level, jnp.int32), (n,))
  scaled = (embeds - mean) / std
  noisy = add_noise(noising_alpha_bar, scaled, noise, level) * std + mean
  return jnp.concatenate([noisy, timestep_embedding(level, embeds.shape[-1], True, 0.0)
                          .astype(noisy.dtype)], axis=-1)
