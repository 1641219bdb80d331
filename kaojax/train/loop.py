"""KaoLRM's staged training: `train_and_evaluate(config, workdir)`.

Stage I (landmarks, regularisers, alpha mask) for the first `stage1_epochs` epochs
(or `stage1_steps` steps), then stage II (photometric + binding) (`stages.py`), with
the weights of `kaojax.losses.stage_weights`. The run is sharded over a
("data", "fsdp") device mesh,
checkpointed with Orbax (exact resume from the latest checkpoint in the work
directory: parameters, optimiser state, step; the data order is a pure function of
(seed, step)), and writes metrics.jsonl, TensorBoard logs and picture grids.
"""

import dataclasses
import json
import pathlib
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from data_pipeline import sources, synthetic
from kaojax import losses, sharding
from kaojax.flame.io import load_flame
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models import loading
from kaojax.models.kaolrm import DEFAULT_TILING, KaoLRM, RenderTiling, kaolrm_config
from kaojax.models.lrm import with_runtime_options
from kaojax.render import native as render_native
from kaojax.train import evaluate as evaluation
from kaojax.train import runtime
from kaojax.train.metrics import MetricWriter
from kaojax.train.optimizer import make_optimizer
from kaojax.train.stages import StageSchedule, stages_to_run
from kaojax.train.step import create_state, make_train_step, missing_perceptual_error
from kaojax.train.visualize import save_grid

SYNTHETIC_DONE = "COMPLETE"


def build_flame(config):
  if config.flame_path:
    return load_flame(config.flame_path, n_shape=config.model.n_shape,
                      n_expr=config.model.n_expr)
  return make_synthetic_flame(n_shape=config.model.n_shape, n_expr=config.model.n_expr)


def build_model(config, flame):
  """KaoLRM from `config.model`, or from a converted model directory
  (`config.init.converted_model`: the output of `python -m kaojax.convert.openlrm
  --kind kaolrm-init` (OpenLRM backbone + fresh decoders) or `--kind kaolrm`)."""
  if config.init.converted_model:
    model = loading.load_model(config.init.converted_model, flame=flame,
                               remat=config.model.remat, dtype=config.model.dtype,
                               attention_chunk=config.model.attention_chunk)
    if not isinstance(model, KaoLRM):
      raise ValueError(f"{config.init.converted_model} holds an OpenLRM model; convert the "
                       "OpenLRM checkpoint with --kind kaolrm-init to start KaoLRM training")
    logging.info("model initialised from %s", config.init.converted_model)
    return model
  return KaoLRM(model_config(config), flame, nnx.Rngs(config.seed))


def model_config(config):
  """The KaoLRMConfig a run config asks for: `config.model.preset` with the run's
  FLAME sizes, surface samples, data kind (monocular or not) and execution options."""
  cfg = kaolrm_config(config.model.preset, n_shape=config.model.n_shape,
                      n_expr=config.model.n_expr, num_samples=config.model.num_samples,
                      monocular=config.data.kind == "monocular")
  lrm = dataclasses.replace(cfg.lrm, encoder=dataclasses.replace(
      cfg.lrm.encoder, position_init=config.model.encoder_position_init))
  return dataclasses.replace(cfg, lrm=with_runtime_options(
      lrm, remat=config.model.remat, dtype=config.model.dtype,
      attention_chunk=config.model.attention_chunk))


def render_tiling(config) -> RenderTiling:
  """The renderers' tile settings of `config.render`."""
  return RenderTiling(mesh_tile_size=config.render.mesh_tile_size)


def dataset_root(config, workdir) -> pathlib.Path:
  """The dataset folder: config.data.root, or the synthetic set generated once into
  the work directory (regenerated only if a previous generation did not finish);
  monocular runs use its monocular copy (most frontal view of each subject)."""
  if config.data.root:
    return pathlib.Path(config.data.root)
  root = pathlib.Path(workdir) / "synthetic_data"
  monocular = config.data.kind == "monocular"
  target = pathlib.Path(workdir) / "synthetic_data_mono" if monocular else root
  def generate():
    syn = config.data.synthetic
    logging.info("generating the synthetic dataset (%d subjects x %d views) in %s",
                 syn.num_subjects, syn.num_views, root)
    synthetic.generate(root, syn.num_subjects, syn.num_views, syn.image_size,
                       seed=syn.seed, flame_path=config.flame_path,
                       val_fraction=syn.val_fraction,
                       monocular_out=target if monocular else None)
    (target / SYNTHETIC_DONE).write_text(json.dumps(syn.to_dict()))

  runtime.generate_once(target / SYNTHETIC_DONE, generate, "synthetic dataset")
  return target


def make_loader(config, root, split, cfg):
  if config.data.kind == "multiview":
    return sources.multiview_loader(root, split, cfg, config.data.cache_views)
  if config.data.kind == "monocular":
    return sources.monocular_loader(root, split, config.synth_focal, cfg)
  raise ValueError(f"config.data.kind must be 'multiview' or 'monocular', "
                   f"got {config.data.kind!r}")


def compile_step(graphdef, tx, state, device_mesh, weights: dict, synth_focal: float,
                 tiling: RenderTiling = DEFAULT_TILING, perceptual=None):
  """The jitted train step (state, batch, key) -> (state, metrics) for `state`'s
  shardings and batches split over `device_mesh`. perceptual: the LPIPS network when
  the "lpips" weight is not 0 (its parameters are replicated and passed as an
  argument)."""
  replicated = sharding.replicated(device_mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  fn = make_train_step(graphdef, tx, weights, synth_focal, tiling, perceptual)
  batch_sharding = sharding.batch_sharding(device_mesh)
  if not weights.get("lpips"):
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
  perceptual_state = jax.device_put(nnx.state(perceptual), replicated)
  jitted = jax.jit(fn, in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
  return lambda state, batch, key: jitted(state, batch, key, perceptual_state)


def build_perceptual(config, weights: dict):
  """The LPIPS network of `config.loss.lpips_weights` when a stage that runs gives the
  perceptual term a weight, else None. Fails (before anything slow starts) when the
  weight is set but the weights are not."""
  weight = max(weights[s].get("lpips", 0.0) for s in stages_to_run(config))
  path = config.loss.lpips_weights
  if not weight:
    if path:
      logging.warning("%s is set but the lpips loss weight is 0 in every stage that runs "
                      "(config.loss.weights_override.lpips): the term is off", path)
    return None
  if not path:
    raise missing_perceptual_error(weight)
  logging.info("perceptual loss: LPIPS-VGG from %s", path)
  return loading.load_lpips(path)


def train_and_evaluate(config, workdir) -> dict:
  """Trains KaoLRM as `config` says, writing everything into `workdir`.
  Returns the last evaluation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.get_absl_handler().addFilter(runtime.QuietLibraries())
  if config.multihost:
    runtime.initialize_distributed(config.distributed)
  render_native.set_default_backend(config.render.get("backend", "auto"))
  logging.info("renderers: %s", render_native.resolve())
  device_mesh = sharding.make_device_mesh(config.device_mesh.data, config.device_mesh.fsdp)
  num_devices = device_mesh.devices.size
  if config.batch_size % num_devices:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{num_devices} devices of the device mesh")
  host_batch = config.batch_size // jax.process_count()
  multiview = config.data.kind == "multiview"
  weights = {stage: losses.stage_weights(stage, multiview, config.loss.weights_override)
             for stage in (1, 2)}
  perceptual = build_perceptual(config, weights)
  if config.init.stage1_checkpoint and not pathlib.Path(config.init.stage1_checkpoint).is_dir():
    raise FileNotFoundError(f"config.init.stage1_checkpoint: {config.init.stage1_checkpoint} "
                            "is not a directory (give a stage-I run's checkpoints/ folder)")

  flame = build_flame(config)
  model = build_model(config, flame)
  if jax.process_index() == 0:  # the network of loading.load_model(workdir)
    loading.write_model_spec(workdir, model)
  root = dataset_root(config, workdir)
  pipe = sources.PipelineConfig(num_views=config.data.num_views,
                                source_size=config.data.source_size,
                                render_size=config.data.render_size)
  loader = make_loader(config, root, "train", pipe)
  steps_per_epoch = max(loader.num_subjects // config.batch_size, 1)
  schedule = StageSchedule.from_config(config, steps_per_epoch)
  total_steps = schedule.total_steps
  logging.info("%d training subjects, %d steps per epoch, %d steps (%d in stage I), "
               "device mesh %s", loader.num_subjects, steps_per_epoch, total_steps,
               schedule.stage1_steps, dict(device_mesh.shape))

  tx = make_optimizer(config.optim.lr, min(config.optim.warmup_steps, total_steps - 1),
                      total_steps, b1=config.optim.b1, b2=config.optim.b2,
                      weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip,
                      restart_step=schedule.restart_step, restart_lr=config.optim.stage2_lr)
  graphdef, state = create_state(model, tx)
  del model
  state = runtime.place_state(state, device_mesh, tx)

  manager = runtime.checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    state = runtime.restore_latest(manager, state, str(workdir))
    logging.info("resumed from step %d", int(state.step))
  elif config.init.stage1_checkpoint:
    source = ocp.CheckpointManager(pathlib.Path(config.init.stage1_checkpoint).resolve())
    restored = runtime.restore_latest(source, state, config.init.stage1_checkpoint)
    state = state.replace(params=restored.params, rest=restored.rest)
    logging.info("parameters initialised from %s", config.init.stage1_checkpoint)
  start = int(state.step)

  data_sharding = sharding.batch_sharding(device_mesh)
  tiling = render_tiling(config)
  steps = {stage: compile_step(graphdef, tx, state, device_mesh, weights[stage],
                               config.synth_focal, tiling, perceptual)
           for stage in (1, 2)}
  eval_step = jax.jit(evaluation.make_eval_step(graphdef, config.synth_focal, tiling))
  eval_set = None
  if config.eval_every > 0 and multiview:
    eval_set = evaluation.load_eval_set(root, "val", pipe, config.eval.max_subjects,
                                        config.eval.num_source_views, seed=config.seed)

  dataset = sources.make_dataset(loader, host_batch, config.seed,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  batches = sources.iterate(dataset, start, config.data.num_workers)
  # A resumed run drops the rows that an interrupted run logged past its checkpoint.
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
  skipped = int(writer.last_value("skipped_subjects", 0))
  key = jax.random.key(config.seed)
  eval_key = jax.random.key(config.seed + 1)
  last_eval, tick = {}, time.perf_counter()

  def run_eval(step):
    metrics, outputs = evaluation.evaluate(eval_step, state.params, state.rest,
                                           eval_set, eval_key)
    writer.write(step, metrics, stage=schedule.stage_after(step))
    if jax.process_index() == 0:
      save_grid(workdir / "images" / f"step_{step:06d}.png", eval_set.batches[0], outputs)
    return metrics

  if eval_set is not None and start == 0:
    last_eval = run_eval(0)
  progress = runtime.progress_bar(start, total_steps)
  for step in progress:
    if runtime.stops_at(step, config.stop_at_step):
      break
    batch, newly_skipped = runtime.next_global_batch(batches, data_sharding)
    skipped += newly_skipped
    stage = schedule.stage_at(step)
    state, metrics = steps[stage](state, batch, jax.random.fold_in(key, step))
    done = step + 1
    if done % config.log_every == 0 or done == total_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tick
      tick = time.perf_counter()
      writer.write(done, metrics, stage=stage, skipped_subjects=skipped)
      progress.set_postfix(stage=stage, loss=f"{float(metrics['loss']):.4g}",
                           skipped=skipped)
      logging.info("%.2f s/step, %d unreadable subjects skipped so far",
                   elapsed / config.log_every, skipped)
      runtime.check_nonfinite_streak(metrics, done, config.max_nonfinite_streak)
    manager.save(done, args=ocp.args.StandardSave(state))
    if eval_set is not None and (done % config.eval_every == 0 or done == total_steps):
      last_eval = run_eval(done)
  runtime.save_final(manager, state)
  writer.close()
  return last_eval
