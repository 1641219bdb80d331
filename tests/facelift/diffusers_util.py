"""Helpers for the diffusers parity tests: random (perturbed) weights and folders."""

import numpy as np
import torch


def perturb_(module: torch.nn.Module, seed: int = 0) -> None:
  """Redraw every parameter so that no zero/one init hides a bug: matrices and conv
  kernels N(0, 1/fan_in), biases 0.1 N(0, 1), norm weights 1 + 0.1 N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(noise / np.sqrt(fan_in))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)
