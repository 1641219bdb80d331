"""KaoLRM's optimiser: AdamW (betas 0.9/0.95, weight decay on weights only),
global-norm clipping at 1.0, linear warm-up from 1e-10 then cosine decay to 0
(optionally restarted at a given step, e.g. the stage switch)."""

import jax
import jax.numpy as jnp
import optax

# Parameter leaves named like these are never weight-decayed (LayerNorm scales,
# biases), whatever their rank.
NO_DECAY_NAMES = ("bias", "scale", "norm")


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


def _path_names(path):
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).lower()
          for k in path]


def weight_decay_mask(params):
  """True for leaves that are weights (rank >= 2 and not a norm/bias/scale by name)."""
  def decays(path, leaf):
    names = _path_names(path)
    named_out = any(n in name for name in names for n in NO_DECAY_NAMES)
    return bool(jnp.ndim(leaf) >= 2 and not named_out)
  return jax.tree_util.tree_map_with_path(decays, params)


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
                   restart_lr: float | None = None):
  """optax transformation: clip -> AdamW with the warm-up/cosine schedule (restarted
  at `restart_step` with peak `restart_lr` when both are given); weight decay only
  where `weight_decay_mask` says so."""
  if restart_step is None or restart_lr is None:
    schedule = learning_rate_schedule(peak_lr, warmup_steps, total_steps)
  else:
    schedule = restarted_schedule(peak_lr, warmup_steps, total_steps, restart_step, restart_lr)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=weight_decay_mask))
