"""What every training loop of kaojax shares around its step: multi-host start-up,
built-in data generated once, the placement of a `TrainState` on the ("data",
"fsdp") device mesh, global batches
from each host's share, the non-finite streak guard, Orbax checkpoints (exact resume)
and the absl log filter. Used by KaoLRM's loop
(`train/loop.py`) and FaceLift's (`train/facelift_loop.py`)."""

import logging as std_logging
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from kaojax import sharding


class QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax from the absl log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def initialize_distributed(distributed):
  """jax.distributed.initialize with config.distributed's fields; the empty ones are
  left to JAX's cluster detection."""
  jax.distributed.initialize(
      coordinator_address=distributed.coordinator_address or None,
      num_processes=distributed.num_processes if distributed.num_processes > 0 else None,
      process_id=distributed.process_id if distributed.process_id >= 0 else None)
  logging.info("process %d of %d; %d local and %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def checkpoint_manager(workdir, config):
  """Orbax manager of WORKDIR/checkpoints (config: checkpoint_every, keep_checkpoints,
  async_checkpoints)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every, max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=config.async_checkpoints)
  return ocp.CheckpointManager(pathlib.Path(workdir).resolve() / "checkpoints",
                               options=options)


def restore_latest(manager, state, where: str):
  """The latest checkpoint of `manager`, restored with `state`'s shapes and shardings."""
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {where}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def place_state(state, device_mesh, tx):
  """TrainState on `device_mesh`: parameters (and their optimiser state) sharded by
  the logical rules (sharding.RULES), everything else replicated."""
  replicated = sharding.replicated(device_mesh)
  params = sharding.shard_state(state.params, device_mesh)
  mesh_devices = set(device_mesh.devices.flat)
  # Moments follow their parameters' shardings; step counters land on one device
  # and are replicated here.
  opt_state = jax.tree.map(
      lambda x: x if x.sharding.device_set == mesh_devices else jax.device_put(x, replicated),
      jax.jit(tx.init)(params))
  return state.replace(params=params, rest=jax.device_put(state.rest, replicated),
                       opt_state=opt_state,
                       **{name: jax.device_put(getattr(state, name), replicated)
                          for name in ("step", "nonfinite_steps", "nonfinite_streak")})


def next_global_batch(batches, data_sharding):
  """The next batch of the host's iterator `batches` (its `num_skipped` counted and
  dropped) as one global array per field, split over `data_sharding`.
  -> (batch, subjects skipped while reading it)."""
  local = next(batches)
  skipped = int(np.sum(local.num_skipped))
  batch = jax.tree.map(lambda v: jax.make_array_from_process_local_data(data_sharding, v),
                       local.replace(num_skipped=None))
  return batch, skipped


def check_nonfinite_streak(metrics, step: int, limit: int):
  """Raises FloatingPointError once `limit` steps in a row (metrics["nonfinite_streak"],
  up to `step`) had a non-finite loss or gradients."""
  streak = int(metrics["nonfinite_streak"])
  if streak >= limit:
    raise FloatingPointError(
        f"{streak} training steps in a row (up to step {step}) had a non-finite loss or "
        f"gradients; their updates were skipped, {int(metrics['nonfinite_steps'])} in all "
        f"(config.max_nonfinite_streak={limit}). The parameters are those before the "
        f"first of them. Lower config.optim.lr or check the data.")


def save_final(manager, state):
  """Checkpoints `state` at its step unless that step is saved already (a run always
  leaves a checkpoint of where it stopped), and waits for the writes."""
  final = int(state.step)
  if final not in manager.all_steps():
    manager.save(final, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  return final


def generate_once(done: pathlib.Path, generate, what: str):
  """Runs `generate()` (which writes the marker file `done` last) unless `done` is
  there. Multi-host: process 0 writes while the others wait; a host whose work
  directory is not shared with process 0's then writes its own copy (the same, by the
  seed). `what` names the barrier."""
  if jax.process_index() == 0 and not done.is_file():
    generate()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(what)
    if not done.is_file():
      generate()


def progress_bar(start: int, total_steps: int):
  """The steps start .. total_steps - 1 under a progress bar (shown by process 0)."""
  return tqdm(range(start, total_steps), initial=start, total=total_steps, desc="training",
              unit="step", disable=jax.process_index() != 0)


def stops_at(step: int, stop_at_step: int) -> bool:
  """True (and logged) when config.stop_at_step asks the run to end before `step`."""
  if step == stop_at_step:
    logging.info("stopping at step %d as config.stop_at_step says", step)
    return True
  return False
