"""VGG16 convolutional features (torchvision's `vgg16().features`) in flax.nnx.

torchvision's `features` is one Sequential of 31 modules: five blocks of 3x3 convs
(padding 1), each followed by ReLU, and a 2x2 max-pool after every block. The convs
sit at indices 0, 2 | 5, 7 | 10, 12, 14 | 17, 19, 21 | 24, 26, 28 and the pools at 4,
9, 16, 23, 30. `VGG16Features` returns the activations at the end of each block
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: LPIPS's taps), so the last pool is
never applied. Images are NHWC.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.nn.layers import conv

# Output channels of the convs of each block.
VGG16_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def torch_feature_indices(widths=VGG16_WIDTHS) -> list:
  """Index in torchvision's `features` Sequential of every conv, in order."""
  indices, position = [], 0
  for block in widths:
    for _ in block:
      indices.append(position)
      position += 2            # conv, ReLU
    position += 1              # max-pool
  return indices


def max_pool_2x2(x):
  """torch's MaxPool2d(2, 2) (floor mode) on NHWC."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                               "VALID")


class VGG16Features(nnx.Module):
  """images [N, H, W, 3] (already normalised) -> the 5 block outputs (after ReLU,
  before the pool). `widths` other than VGG16_WIDTHS give small test networks."""

  def __init__(self, rngs: nnx.Rngs, widths=VGG16_WIDTHS, in_channels: int = 3,
               dtype=None):
    self.widths = tuple(tuple(b) for b in widths)
    convs, channels = [], in_channels
    for block in self.widths:
      for width in block:
        convs.append(conv(channels, width, 3, rngs, dtype=dtype,
                          precision=jax.lax.Precision.HIGHEST))
        channels = width
    self.convs = nnx.List(convs)

  def __call__(self, x) -> list:
    taps, i = [], 0
    for b, block in enumerate(self.widths):
      if b:
        x = max_pool_2x2(x)
      for _ in block:
        x = jax.nn.relu(self.convs[i](x))
        i += 1
      taps.append(x)
    return taps
