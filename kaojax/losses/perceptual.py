"""The perceptual loss: LPIPS with a VGG16 trunk (Zhang et al. 2018, version 0.1).

LPIPS(x, y) for images in [0, 1] (kaojax's NHWC convention; LPIPS itself works on
[-1, 1], so inputs are mapped by 2x - 1, as lpips' `normalize=True`):
  1. ScalingLayer: (x - shift) / scale per channel;
  2. VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
  3. each tap unit-normalised over channels: f / (||f|| + 1e-10);
  4. squared difference of the two images' normalised taps, a 1x1 conv without bias
     to one channel ("lin0".."lin4", learned on human judgements), mean over pixels;
  5. summed over the five layers.

The weights come from the user (torchvision's ImageNet VGG16 + lpips' `vgg.pth`),
converted with `python -m kaojax.convert.vgg`; training loads them from
`config.loss.lpips_weights`. Neither is downloaded.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.models.vgg import VGG16_WIDTHS, VGG16Features

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10


def unit_normalize(features, eps: float = NORMALIZE_EPS):
  """features [..., C] / (||features||_C + eps), as lpips' normalize_tensor. The norm
  of an all-zero vector (a dead ReLU pixel) has gradient 0 here (torch: NaN)."""
  sq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return features / (norm + eps)


class LPIPS(nnx.Module):
  """(pred, target) [..., H, W, 3] in [0, 1] -> LPIPS distance [...].

  Parameters: `vgg` (VGG16Features) and `lins` (one [C, 1] bias-free 1x1 conv per
  tap, stored as nnx.Linear kernels). Never trained here."""

  def __init__(self, rngs: nnx.Rngs, widths=VGG16_WIDTHS):
    self.vgg = VGG16Features(rngs, widths)
    # lpips' lin weights are non-negative; a random net gets small positive ones.
    self.lins = nnx.List([
        nnx.Linear(block[-1], 1, use_bias=False, rngs=rngs,
                   precision=jax.lax.Precision.HIGHEST,
                   kernel_init=nnx.initializers.uniform(1.0 / block[-1]))
        for block in self.vgg.widths])

  def __call__(self, pred, target):
    batch_shape = pred.shape[:-3]
    image_shape = pred.shape[-3:]
    x = jnp.concatenate([pred.reshape((-1,) + image_shape),
                         target.reshape((-1,) + image_shape)]).astype(jnp.float32)
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    x = (x * 2.0 - 1.0 - shift) / scale
    n = x.shape[0] // 2
    total = 0.0
    for tap, lin in zip(self.vgg(x), self.lins):
      f = unit_normalize(tap)
      diff = jnp.square(f[:n] - f[n:])                        # [n, h, w, C]
      total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
    return total.reshape(batch_shape)


def lpips_loss(net: LPIPS, pred, target):
  """Mean LPIPS over every image of [..., H, W, 3] batches in [0, 1]."""
  return jnp.mean(net(pred, target))
