"""Per-image PSNR, SSIM and LPIPS as FaceLift's released metric helpers define them.

Images are NHWC float in [0, 1] (any leading axes); every function returns one value
per image [...].

  psnr   both images clipped to [0, 1]; -10 log10 of the image's MSE over all its
         pixels and channels.
  ssim   scikit-image's `structural_similarity(win_size=11, gaussian_weights=True,
         data_range=1.0)` per channel, averaged over channels: Gaussian weights with
         sigma 1.5 over an 11 x 11 window, the sample-covariance factor 121 / 120 on the
         (co)variances, C1 = 0.01^2, C2 = 0.03^2, and the mean taken over the pixels at
         least 5 from the border (skimage's crop). Not clipped, as the reference.
         (`kaojax.losses.photometric.ssim_map`, the training loss, pads with zeros and
         has no covariance factor: it is not this metric.)
  lpips  LPIPS-VGG v0.1 (`kaojax.losses.perceptual.LPIPS`, lpips' normalize=True).

Masks (optional, [..., H, W], foreground > 0.5): FaceLift's release scores whole
images (its tables use none). With a mask, PSNR averages the squared error over the
foreground pixels only, and SSIM and LPIPS see both images with the background set to
grey 0.5, the convention of the masked variant of these helpers.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kaojax.losses.photometric import SSIM_C1, SSIM_C2, gaussian_window

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
NEUTRAL = 0.5


def _binary(mask):
  return (jnp.asarray(mask, jnp.float32) > 0.5).astype(jnp.float32)[..., None]


def neutral_background(image, mask):
  """image [..., H, W, C] with the pixels where mask [..., H, W] <= 0.5 set to 0.5."""
  m = _binary(mask)
  return image * m + NEUTRAL * (1.0 - m)


def psnr(target, pred, mask=None):
  """-> [...] dB (module doc). A perfect image gives +inf."""
  target = jnp.clip(jnp.asarray(target, jnp.float32), 0.0, 1.0)
  pred = jnp.clip(jnp.asarray(pred, jnp.float32), 0.0, 1.0)
  err = jnp.square(target - pred)
  if mask is None:
    mse = jnp.mean(err, axis=(-3, -2, -1))
  else:
    m = jnp.broadcast_to(_binary(mask), err.shape)
    mse = jnp.sum(err * m, axis=(-3, -2, -1)) / jnp.maximum(
        jnp.sum(m, axis=(-3, -2, -1)), 1.0)
  return -10.0 * jnp.log10(mse)


def _blur_valid(images, window):
  """Separable Gaussian filter keeping only full windows: [N, H, W, C] ->
  [N, H - k + 1, W - k + 1, C]."""
  n, h, w, c = images.shape
  size = window.shape[0]
  x = jnp.moveaxis(images, -1, 1).reshape(n * c, 1, h, w)
  for kernel in (window.reshape(1, 1, size, 1), window.reshape(1, 1, 1, size)):
    x = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(x.reshape(n, c, h - size + 1, w - size + 1), 1, -1)


def ssim(target, pred, mask=None):
  """-> [...] (module doc). Images need at least 11 pixels per side."""
  target = jnp.asarray(target, jnp.float32)
  pred = jnp.asarray(pred, jnp.float32)
  if mask is not None:
    target, pred = neutral_background(target, mask), neutral_background(pred, mask)
  if min(target.shape[-3:-1]) < SSIM_WINDOW:
    raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} pixels per side, got "
                     f"{target.shape[-3:-1]}")
  batch = target.shape[:-3]
  x = target.reshape((-1,) + target.shape[-3:])
  y = pred.reshape((-1,) + pred.shape[-3:])
  window = gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
  blur = lambda a: _blur_valid(a, window)
  mu_x, mu_y = blur(x), blur(y)
  cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1.0)    # skimage's sample covariance
  var_x = cov_norm * (blur(x * x) - mu_x * mu_x)
  var_y = cov_norm * (blur(y * y) - mu_y * mu_y)
  cov = cov_norm * (blur(x * y) - mu_x * mu_y)
  s = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2) /
       ((mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)))
  return jnp.mean(s, axis=(-3, -2, -1)).reshape(batch)


def lpips(net, target, pred, mask=None, batch_size: int = 10):
  """-> [...] LPIPS of `net` (a `kaojax.losses.perceptual.LPIPS`, or any jitted
  (pred [B, H, W, 3], target) -> [B] wrapper of one), in chunks of `batch_size`."""
  target = jnp.asarray(target, jnp.float32)
  pred = jnp.asarray(pred, jnp.float32)
  if mask is not None:
    target, pred = neutral_background(target, mask), neutral_background(pred, mask)
  batch = target.shape[:-3]
  x = target.reshape((-1,) + target.shape[-3:])
  y = pred.reshape((-1,) + pred.shape[-3:])
  values = [np.asarray(net(x[i:i + batch_size], y[i:i + batch_size]))
            for i in range(0, len(x), batch_size)]
  return jnp.asarray(np.concatenate(values)).reshape(batch)


def image_metrics(target, pred, mask=None, net=None) -> dict:
  """-> {"psnr", "ssim"(, "lpips" when `net` is given)}: numpy arrays [...]."""
  out = {"psnr": np.asarray(psnr(target, pred, mask)),
         "ssim": np.asarray(ssim(target, pred, mask))}
  if net is not None:
    out["lpips"] = np.asarray(lpips(net, target, pred, mask))
  return out
