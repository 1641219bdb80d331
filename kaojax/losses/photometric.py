"""Image losses: masked pixel MSE, (D-)SSIM and the alpha-mask L1.

Images are float NHWC in [0, 1] (any leading axes); masks [..., H, W].
"""

import jax
import jax.numpy as jnp

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def masked_pixel_mse(pred, target, mask, inside_weight: float = 0.7):
  """KaoLRM's pixel loss: (1 - w) * MSE over the whole image + w * MSE over the
  pixels where `mask` is set (w = lambda = 0.7).

  pred, target: [..., H, W, C]; mask: [..., H, W] (bool or {0, 1} float).
  Means are over every element of the batch; an all-empty mask adds 0.
  """
  err = jnp.square(pred - target)
  mask = jnp.asarray(mask, err.dtype)[..., None]
  inside = jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask) * err.shape[-1], 1.0)
  return (1.0 - inside_weight) * jnp.mean(err) + inside_weight * inside


def gaussian_window(size: int = 11, sigma: float = 1.5):
  """Normalised 1D Gaussian [size]."""
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / jnp.sum(w)


def _blur(images, window):
  """Separable 'same' Gaussian blur with zero padding: images [N, H, W, C]."""
  size = window.shape[0]
  n, h, w, c = images.shape
  x = jnp.moveaxis(images, -1, 1).reshape(n * c, 1, h, w)
  pad = size // 2
  # Rows, then columns.
  for kernel, padding in ((window.reshape(1, 1, size, 1), [(pad, pad), (0, 0)]),
                          (window.reshape(1, 1, 1, size), [(0, 0), (pad, pad)])):
    x = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), padding,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(x.reshape(n, c, h, w), 1, -1)


def ssim_map(pred, target, window_size: int = 11, sigma: float = 1.5):
  """Per-pixel SSIM [..., H, W, C] with an `window_size` Gaussian window (sigma 1.5),
  zero-padded 'same' statistics and constants C1 = 0.01^2, C2 = 0.03^2 (data range 1).
  """
  batch_shape = pred.shape[:-3]
  p = pred.reshape((-1,) + pred.shape[-3:])
  t = target.reshape((-1,) + target.shape[-3:])
  window = gaussian_window(window_size, sigma)
  mu_p, mu_t = _blur(p, window), _blur(t, window)
  var_p = _blur(p * p, window) - mu_p * mu_p
  var_t = _blur(t * t, window) - mu_t * mu_t
  cov = _blur(p * t, window) - mu_p * mu_t
  num = (2 * mu_p * mu_t + SSIM_C1) * (2 * cov + SSIM_C2)
  den = (mu_p * mu_p + mu_t * mu_t + SSIM_C1) * (var_p + var_t + SSIM_C2)
  return (num / den).reshape(batch_shape + pred.shape[-3:])


def ssim(pred, target, window_size: int = 11, sigma: float = 1.5):
  """Mean SSIM over every pixel and channel of [..., H, W, C] images."""
  return jnp.mean(ssim_map(pred, target, window_size, sigma))


def dssim(pred, target, window_size: int = 11, sigma: float = 1.5):
  """D-SSIM = 1 - SSIM."""
  return 1.0 - ssim(pred, target, window_size, sigma)


def mask_l1(alpha, target_alpha):
  """Mean |alpha - target| over [..., H, W] alpha maps."""
  return jnp.mean(jnp.abs(alpha - target_alpha))
