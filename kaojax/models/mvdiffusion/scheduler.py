"""Diffusion noise schedules: DDPM training noise, DDIM sampling, min-SNR weights.

Notation: alpha_bar[t] = prod_{s<=t} (1 - beta_s) over T training steps (t = 0..T-1).
  forward noising:  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
  v target:         v   = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
DDIM (Song et al. 2021, eq. 12 and 16) from timestep t to t' = t - T/N:
  x_0 and eps predicted from the model output (epsilon / v / sample parameterisation),
  sigma = eta sqrt((1 - a')/(1 - a)) sqrt(1 - a/a'),
  x_t' = sqrt(a') x_0 + sqrt(1 - a' - sigma^2) eps + sigma z,
with a = alpha_bar_t, a' = alpha_bar_t' (or the "final" value when t' < 0: 1 when
set_alpha_to_one, else alpha_bar_0).

FaceLift's sampler is the SD2.1-unCLIP DDIM: scaled_linear betas 0.00085..0.012, 1000
steps, v-prediction, set_alpha_to_one false, steps_offset 1, "leading" spacing, eta 1.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"    # linear | scaled_linear | squaredcos_cap_v2
  prediction_type: str = "v_prediction"   # epsilon | v_prediction | sample
  set_alpha_to_one: bool = False
  steps_offset: int = 1
  timestep_spacing: str = "leading"       # leading | trailing | linspace
  clip_sample: bool = False
  clip_sample_range: float = 1.0

  @classmethod
  def from_diffusers(cls, config: dict) -> "SchedulerConfig":
    """From a diffusers scheduler_config.json dict (unknown keys are ignored;
    unsupported settings raise)."""
    if config.get("thresholding", False):
      raise ValueError("scheduler config: dynamic thresholding is not supported")
    if config.get("rescale_betas_zero_snr", False):
      raise ValueError("scheduler config: rescale_betas_zero_snr is not supported")
    if config.get("trained_betas") is not None:
      raise ValueError("scheduler config: trained_betas is not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


def make_betas(cfg: SchedulerConfig) -> np.ndarray:
  """[T] float32 betas (computed the way diffusers does: float32 throughout)."""
  T = cfg.num_train_timesteps
  if cfg.beta_schedule == "linear":
    return np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float32)
  if cfg.beta_schedule == "scaled_linear":
    return (np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=np.float32) ** 2
            ).astype(np.float32)
  if cfg.beta_schedule == "squaredcos_cap_v2":    # Nichol & Dhariwal cosine schedule
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    i = np.arange(T, dtype=np.float64)
    return np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999).astype(np.float32)
  raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}")


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
  """[T] float32 alpha_bar (the product is accumulated in float64)."""
  return np.cumprod(1.0 - make_betas(cfg).astype(np.float64)).astype(np.float32)


def inference_timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
  """[num_steps] int32 timesteps, descending. 'leading' with 50 steps and offset 1:
  981, 961, ..., 1."""
  T = cfg.num_train_timesteps
  if not 0 < num_steps <= T:
    raise ValueError(f"num_steps must be in 1..{T}, got {num_steps}")
  if cfg.timestep_spacing == "leading":
    ts = np.arange(num_steps)[::-1] * (T // num_steps) + cfg.steps_offset
  elif cfg.timestep_spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  elif cfg.timestep_spacing == "linspace":
    ts = np.linspace(0, T - 1, num_steps).round()[::-1]
  else:
    raise ValueError(f"unknown timestep_spacing {cfg.timestep_spacing!r}")
  return np.asarray(ts, np.int32)


def add_noise(alpha_bar, x0, noise, t):
  """DDPM forward noising. alpha_bar [T]; x0, noise [B, ...]; t [B] int -> x_t [B, ...]."""
  a = _per_sample(alpha_bar[t], x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def velocity(alpha_bar, x0, noise, t):
  """The v-prediction target sqrt(a) eps - sqrt(1 - a) x0, shapes as in `add_noise`."""
  a = _per_sample(alpha_bar[t], x0)
  return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def min_snr_weights(alpha_bar, t, gamma: float = 5.0, v_prediction_plus_one: bool = False):
  """Min-SNR-gamma loss weights [B] for timesteps t [B]: min(snr, gamma) / snr with
  snr = a / (1 - a) (what FaceLift uses, also with the v target); with
  `v_prediction_plus_one`, min(snr, gamma) / (snr + 1) (the v-target form of
  Hang et al. 2023)."""
  a = alpha_bar[t]
  snr = a / (1.0 - a)
  return jnp.minimum(snr, gamma) / (snr + 1.0 if v_prediction_plus_one else snr)


def _per_sample(values, like):
  return jnp.reshape(values, values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)


class DDIM:
  """DDIM sampler. `timesteps(n)` gives the descending schedule; `step` is pure and
  jittable (t may be a traced scalar)."""

  def __init__(self, cfg: SchedulerConfig = SchedulerConfig()):
    self.cfg = cfg
    self.alpha_bar = jnp.asarray(alphas_cumprod(cfg))
    self.final_alpha_bar = 1.0 if cfg.set_alpha_to_one else float(alphas_cumprod(cfg)[0])

  def timesteps(self, num_steps: int) -> np.ndarray:
    return inference_timesteps(self.cfg, num_steps)

  def predict(self, model_output, sample, t):
    """(x0, eps) from the model output at timestep t (scalar)."""
    a = self.alpha_bar[t]
    b = 1.0 - a
    kind = self.cfg.prediction_type
    if kind == "epsilon":
      eps = model_output
      x0 = (sample - jnp.sqrt(b) * eps) / jnp.sqrt(a)
    elif kind == "v_prediction":
      x0 = jnp.sqrt(a) * sample - jnp.sqrt(b) * model_output
      eps = jnp.sqrt(a) * model_output + jnp.sqrt(b) * sample
    elif kind == "sample":
      x0 = model_output
      eps = (sample - jnp.sqrt(a) * x0) / jnp.sqrt(b)
    else:
      raise ValueError(f"unknown prediction_type {kind!r}")
    if self.cfg.clip_sample:
      x0 = jnp.clip(x0, -self.cfg.clip_sample_range, self.cfg.clip_sample_range)
    return x0, eps

  def step(self, model_output, t, sample, num_steps: int, eta: float = 0.0,
           noise: Optional[jax.Array] = None):
    """One DDIM update from timestep t (scalar int) of an `num_steps` schedule.

    model_output, sample, noise: same shape. Returns (x_{t'}, predicted x0).
    `noise` (standard normal) is required when eta > 0."""
    prev_t = t - self.cfg.num_train_timesteps // num_steps
    a = self.alpha_bar[t]
    a_prev = jnp.where(prev_t >= 0, self.alpha_bar[jnp.maximum(prev_t, 0)], self.final_alpha_bar)
    x0, eps = self.predict(model_output, sample, t)
    variance = (1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)
    std = eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std ** 2) * eps
    if eta > 0:
      if noise is None:
        raise ValueError("DDIM.step: eta > 0 needs `noise`")
      prev = prev + std * noise
    return prev.astype(sample.dtype), x0
