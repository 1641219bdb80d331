"""The training loop of FaceLift's two networks (GS-LRM: `train/facelift_gslrm.py`,
multi-view diffusion: `train/facelift_mvdiff.py`): `train(config, workdir, task)`.

A `Task` says what is trained (its network, tagged by `nn.params.mark_parameters`),
on which data (a `sources.SkippingLoader` of `ViewBatch` samples), with which loss
(`loss_fn(model, batch, key, frozen)` -> (total, terms); `frozen`: networks used but
never trained, e.g. the VAE and CLIP, passed replicated as an argument so that they
are neither differentiated nor checkpointed), whether EMA weights are kept, and how
it is evaluated (`evaluate(graphdef, state, step)` -> {"eval/...": value}, writing its own
pictures; deterministic, so that a resumed run logs the same rows).

As KaoLRM's loop (and through the same pieces: `train/runtime.py`, `train/step.py`,
`train/metrics.py`): jitted over a ("data", "fsdp") device mesh with the parameters
sharded by their logical axis names, batches split over both axes; Orbax checkpoints
of the whole state with exact resume (the data order is a pure function of (seed,
step)); steps with non-finite loss or gradients skipped and counted;
metrics.jsonl + TensorBoard + progress bar; multi-host through `config.distributed`.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from data_pipeline import heads, sources
from data_pipeline.view_batch import make_view_batch
from kaojax import sharding
from kaojax.render import native as render_native
from kaojax.train import runtime
from kaojax.train.metrics import MetricWriter
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import TrainState, apply_gradients, create_state

SYNTHETIC_DONE = "COMPLETE"


@flax.struct.dataclass
class EMATrainState(TrainState):
  """TrainState with an exponential moving average of the trainable parameters."""
  ema: nnx.State


@dataclasses.dataclass
class Task:
  """What one FaceLift training trains (see module doc)."""
  model: nnx.Module
  loss_fn: Callable
  loader: sources.SkippingLoader
  frozen: Any = None                      # nnx.Module (or None) given to loss_fn
  ema_decay: Optional[float] = None
  evaluate: Optional[Callable] = None     # (graphdef, state, step) -> metrics
  finish: Optional[Callable] = None       # (graphdef, state), after the last step


def ema_decay_at(decay: float, step):
  """diffusers' EMAModel decay at optimisation step `step` (1 for the first update):
  min(decay, (1 + n) / (10 + n)) with n = step - 1."""
  n = jnp.asarray(step, jnp.float32) - 1.0
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def make_train_step(graphdef, tx, loss_fn, frozen_graph=None, ema_decay=None):
  """(state, batch, key, frozen_state) -> (state, metrics): value_and_grad of
  loss_fn over the trainable parameters, the shared update (`apply_gradients`), then
  the EMA when `ema_decay` is set. metrics: the loss terms, `loss`, `grad_norm`,
  `nonfinite_steps`, `nonfinite_streak`."""

  def train_step(state, batch, key, frozen_state=None):
    frozen = (nnx.merge(frozen_graph, jax.lax.stop_gradient(frozen_state))
              if frozen_graph is not None else None)

    def objective(params):
      return loss_fn(nnx.merge(graphdef, params, state.rest), batch, key, frozen)

    (total, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state, grad_norm = apply_gradients(state, tx, total, grads)
    if ema_decay is not None:
      # a skipped (non-finite) step leaves the EMA as it is too
      d = jnp.where(state.nonfinite_streak > 0, 1.0, ema_decay_at(ema_decay, state.step))
      state = state.replace(ema=jax.tree.map(lambda e, p: d * e + (1.0 - d) * p,
                                             state.ema, state.params))
    metrics = dict(terms, loss=total, grad_norm=grad_norm,
                   nonfinite_steps=state.nonfinite_steps,
                   nonfinite_streak=state.nonfinite_streak)
    return state, metrics

  return train_step


def initial_state(model, tx, device_mesh, ema: bool = False):
  """-> (graphdef, TrainState (EMATrainState with `ema`) placed on device_mesh; left
  where it is with device_mesh None, e.g. to trace its shapes alone)."""
  graphdef, state = create_state(model, tx)
  if device_mesh is not None:
    state = runtime.place_state(state, device_mesh, tx)
  if ema:
    copy = jax.tree.map(jnp.copy, state.params)
    state = EMATrainState(**{f.name: getattr(state, f.name)
                             for f in dataclasses.fields(TrainState)}, ema=copy)
  return graphdef, state


def compile_step(graphdef, tx, state, device_mesh, loss_fn, frozen=None, ema_decay=None):
  """The jitted train step (state, batch, key) -> (state, metrics) for `state`'s
  shardings, batches split over the mesh and `frozen` replicated."""
  replicated = sharding.replicated(device_mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  frozen_graph, frozen_state = (nnx.split(frozen) if frozen is not None else (None, None))
  fn = make_train_step(graphdef, tx, loss_fn, frozen_graph, ema_decay)
  jitted = jax.jit(fn, in_shardings=(state_shardings, sharding.batch_sharding(device_mesh),
                                     replicated, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
  if frozen_state is not None:
    frozen_state = jax.device_put(frozen_state, replicated)
  return lambda state, batch, key: jitted(state, batch, key, frozen_state)


def heads_root(config, workdir) -> pathlib.Path:
  """config.data.root, or the synthetic heads of config.data.synthetic generated once
  into WORKDIR/synthetic_heads (again only when a generation did not finish)."""
  if config.data.root:
    return pathlib.Path(config.data.root)
  root = pathlib.Path(workdir) / "synthetic_heads"

  def generate():
    syn = config.data.synthetic
    logging.info("generating %d synthetic heads (6 fixed + %d random views, %d px) in %s",
                 syn.num_subjects, syn.num_random_views, syn.image_size, root)
    heads.generate(root, syn.num_subjects, syn.num_random_views, syn.image_size,
                   seed=syn.seed, flame_path=config.flame_path,
                   val_fraction=syn.val_fraction)
    (root / SYNTHETIC_DONE).write_text(json.dumps(syn.to_dict()))

  runtime.generate_once(root / SYNTHETIC_DONE, generate, "synthetic heads")
  return root


def setup(config, workdir):
  """Start-up shared by both trainings -> (workdir Path, device mesh)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.get_absl_handler().addFilter(runtime.QuietLibraries())
  if config.multihost:
    runtime.initialize_distributed(config.distributed)
  render_native.set_default_backend(config.render.get("backend", "auto"))
  device_mesh = sharding.make_device_mesh(config.device_mesh.data, config.device_mesh.fsdp)
  if config.batch_size % device_mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{device_mesh.devices.size} devices of the device mesh")
  return workdir, device_mesh


def make_tx(config):
  optim = config.optim
  total = config.total_steps
  return make_optimizer(optim.lr, min(optim.warmup_steps, total - 1), total, b1=optim.b1,
                        b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        clip_norm=optim.clip,
                        schedule=optim.schedule)


def train(config, workdir, device_mesh, task: Task) -> dict:
  """Runs `task` for config.total_steps steps in `workdir`; returns the last
  evaluation's metrics."""
  workdir = pathlib.Path(workdir)
  tx = make_tx(config)
  graphdef, state = initial_state(task.model, tx, device_mesh, ema=task.ema_decay is not None)
  task.model = None                           # the state holds the parameters now
  manager = runtime.checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    state = runtime.restore_latest(manager, state, str(workdir))
    logging.info("resumed from step %d", int(state.step))
  start, total_steps = int(state.step), config.total_steps
  step_fn = compile_step(graphdef, tx, state, device_mesh, task.loss_fn, task.frozen,
                         task.ema_decay)
  data_sharding = sharding.batch_sharding(device_mesh)
  dataset = sources.make_dataset(task.loader, config.batch_size // jax.process_count(),
                                 config.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count(),
                                 batch_fn=make_view_batch)
  batches = sources.iterate(dataset, start, config.data.num_workers)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
  skipped = int(writer.last_value("skipped_subjects", 0))
  key = jax.random.key(config.seed)
  last_eval, tick = {}, time.perf_counter()

  def run_eval(step):
    metrics = task.evaluate(graphdef, state, step)
    writer.write(step, metrics)
    return metrics

  evaluating = task.evaluate is not None and config.eval_every > 0
  if evaluating and start == 0:
    last_eval = run_eval(0)
  progress = runtime.progress_bar(start, total_steps)
  for step in progress:
    if runtime.stops_at(step, config.stop_at_step):
      break
    batch, newly_skipped = runtime.next_global_batch(batches, data_sharding)
    skipped += newly_skipped
    state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
    done = step + 1
    if done % config.log_every == 0 or done == total_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tick
      tick = time.perf_counter()
      writer.write(done, metrics, skipped_subjects=skipped)
      progress.set_postfix(loss=f"{float(metrics['loss']):.4g}", skipped=skipped)
      logging.info("%.3f s/step", elapsed / config.log_every)
      runtime.check_nonfinite_streak(metrics, done, config.max_nonfinite_streak)
    manager.save(done, args=ocp.args.StandardSave(state))
    if evaluating and (done % config.eval_every == 0 or done == total_steps):
      last_eval = run_eval(done)
  final = runtime.save_final(manager, state)
  if task.finish is not None and final == total_steps:
    task.finish(graphdef, state)
  writer.close()
  return last_eval
