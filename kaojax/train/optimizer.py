"""KaoLRM's optimiser: AdamW (betas 0.9/0.95, weight decay where OpenLRM's rule says:
not on LayerNorm parameters nor biases), global-norm clipping at 1.0, linear warm-up
from 1e-10 then cosine decay to 0 (optionally restarted at a given step, e.g. the
stage switch)."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kaojax.nn.params import is_frozen


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           init: float = 1e-10):
  """Step -> learning rate: linear from `init` to `peak` over `warmup_steps`, then
  cosine from `peak` to 0 at `total_steps` (0 afterwards)."""
  if warmup_steps < 0 or total_steps <= warmup_steps:
    raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, "
                     f"{total_steps}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = init + (peak - init) * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    cosine = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def weight_decay_mask(params):
  """True where AdamW decays. params: a model, or an nnx.State of its parameters
  (e.g. `nnx.state(model, nnx.Param)` or the trainable split), whose parameters carry
  the tags of `kaojax.nn.params.mark_parameters`. -> the same tree of bools: True
  for trainable parameters that the rule decays (not LayerNorm parameters, not
  biases); False for the others and for frozen parameters (never updated)."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)

  def decays(variable):
    if not isinstance(variable, nnx.Variable) or "weight_decay" not in variable.get_metadata():
      raise ValueError("weight_decay_mask needs the parameters of a kaojax model, tagged by "
                       "kaojax.nn.params.mark_parameters (got an untagged "
                       f"{type(variable).__name__})")
    return variable.replace(variable.get_metadata()["weight_decay"] and not is_frozen(variable))

  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constant_schedule(peak: float, warmup_steps: int, init: float = 1e-10):
  """Step -> learning rate: linear from `init` to `peak` over `warmup_steps`, then
  `peak` (diffusers' "constant_with_warmup"; FaceLift's diffusion fine-tuning)."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step < warmup_steps,
                     init + (peak - init) * step / max(warmup_steps, 1), peak)

  return schedule


def restarted_schedule(peak: float, warmup_steps: int, total_steps: int, restart_step: int,
                       restart_peak: float):
  """learning_rate_schedule over [0, restart_step), then a second one peaking at
  `restart_peak` (its warm-up shortened to fit) over [restart_step, total_steps)."""
  if not 0 < restart_step < total_steps:
    raise ValueError(f"need 0 < restart_step < total_steps, got {restart_step}, {total_steps}")
  first = learning_rate_schedule(peak, min(warmup_steps, restart_step - 1), restart_step)
  rest = total_steps - restart_step
  second = learning_rate_schedule(restart_peak, min(warmup_steps, rest - 1), rest)
  return lambda step: jnp.where(step < restart_step, first(step), second(step - restart_step))


def make_optimizer(peak_lr: float = 4e-4, warmup_steps: int = 3000,
                   total_steps: int = 100_000, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.05,
                   clip_norm: float = 1.0, restart_step: int | None = None,
                   restart_lr: float | None = None, schedule: str = "cosine"):
  """optax transformation: clip -> AdamW with the warm-up/cosine schedule (restarted
  at `restart_step` with peak `restart_lr` when both are given; schedule="constant":
  warm-up, then constant); weight decay only where `weight_decay_mask` says so."""
  if schedule not in ("cosine", "constant"):
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
  if schedule == "constant":
    schedule = constant_schedule(peak_lr, warmup_steps)
  elif restart_step is None or restart_lr is None:
    schedule = learning_rate_schedule(peak_lr, warmup_steps, total_steps)
  else:
    schedule = restarted_schedule(peak_lr, warmup_steps, total_steps, restart_step, restart_lr)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=weight_decay_mask))
