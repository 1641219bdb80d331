"""Layer constructors shared by every network in kaojax (DINOv2, LRM, KaoLRM, GS-LRM,
the diffusion UNet and VAE, VGG).

Each returns a flax.nnx layer whose parameters carry logical axis names
(`kaojax.sharding`), so the sharding rules apply to every model alike. Pass the
names per dimension (`axes`); None replicates that dimension.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kaojax.sharding import EMBED


def param_init(initializer, *axes):
  """`initializer` annotated with one logical axis name (or None) per dimension."""
  return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)


def torch_uniform_init(fan_in: int, *axes):
  """PyTorch's default nn.Linear / nn.Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  for the weight (kaiming_uniform with a=sqrt(5)) and the bias alike."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return param_init(init, *axes)


def linear(d_in: int, d_out: int, axes, rngs: nnx.Rngs, use_bias: bool = True, dtype=None,
           init: str = "lecun", zero_bias: bool = True):
  """nnx.Linear, kernel [d_in, d_out] with logical names `axes` (bias: axes[1]).

  init: "lecun" (LeCun normal kernel) or "torch" (PyTorch's default nn.Linear init)
    or a float (normal with that standard deviation).
  zero_bias: zero bias (else, with init="torch", PyTorch's uniform bias).
  """
  if init == "torch":
    kernel_init = torch_uniform_init(d_in, *axes)
  elif init == "lecun":
    kernel_init = param_init(nnx.initializers.lecun_normal(), *axes)
  else:
    kernel_init = param_init(nnx.initializers.normal(float(init)), *axes)
  bias_init = (param_init(nnx.initializers.zeros_init(), axes[1])
               if zero_bias or init != "torch" else torch_uniform_init(d_in, axes[1]))
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    kernel_init=kernel_init, bias_init=bias_init)


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, dtype=None, axis=EMBED,
               use_bias: bool = True, exact_variance: bool = False):
  """nnx.LayerNorm over the last axis, scale (and bias) named `axis`.
  exact_variance: two-pass variance as torch computes it (else E[x^2] - E[x]^2)."""
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs, use_bias=use_bias,
                       use_fast_variance=not exact_variance,
                       scale_init=param_init(nnx.initializers.ones_init(), axis),
                       bias_init=param_init(nnx.initializers.zeros_init(), axis))


def group_norm(channels: int, groups: int, eps: float, rngs: nnx.Rngs, dtype=None,
               axis=None):
  """GroupNorm over NHWC (or token) inputs; exact two-pass variance like torch."""
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype,
                       use_fast_variance=False, rngs=rngs,
                       scale_init=param_init(nnx.initializers.ones_init(), axis),
                       bias_init=param_init(nnx.initializers.zeros_init(), axis))


def conv(c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs, stride: int = 1,
         padding=None, dtype=None, axes=(None, None), precision=None,
         use_bias: bool = True):
  """Conv2d (NHWC) with torch-style symmetric zero padding (kernel // 2 by default);
  kernel [k, k, c_in, c_out] named (None, None, *axes), bias axes[1]."""
  pad = kernel // 2 if padding is None else padding
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride,
                  padding=((pad, pad), (pad, pad)), dtype=dtype, precision=precision,
                  use_bias=use_bias, rngs=rngs,
                  kernel_init=param_init(nnx.initializers.lecun_normal(), None, None, *axes),
                  bias_init=param_init(nnx.initializers.zeros_init(), axes[1]))
