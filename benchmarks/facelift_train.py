"""FaceLift training-step speed and memory on this machine: step time and examples/s
of the GS-LRM step (4 input views -> Gaussians -> 8 renders, MSE + perceptual) and the
multi-view diffusion step (VAE + CLIP conditions, UNet v-prediction loss over 6 views,
EMA), the steps of `kaojax/train/facelift_loop.py` on one device; XLA's FLOP count of
each step and, on a GPU of known peak, the model FLOP utilisation. The peer, measured
in the same process: the loss's forward and backward alone, without the optimiser
update and EMA (`step_over_gradient`).

    python benchmarks/facelift_train.py [--presets tiny,small,facelift] [--batch N]
        [--size S] [--dtype bfloat16] [--remat] [--networks gslrm,mvdiff]

Presets are the model presets of configs/facelift_gslrm.py and facelift_mvdiff.py
("tiny": the :tiny configs; "small" / "facelift": those networks at --size pixels,
default 256 for small, 512 for facelift). Batches are random (the data pipeline's
shapes). Each configuration runs in its own process, so that its peak memory is its
own: the GPU's peak bytes in use, on the CPU the process's peak resident memory
(compilation included). Beside it, `xla_plan_gib` is what XLA's buffer plan of the
compiled step needs at once (arguments + outputs + temporaries - donated), read
from a compilation of the step's shapes before anything is allocated; a step whose
plan exceeds the device's memory is not run, and says so. The last line is one
JSON object.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from timing import (best_time, lowered_flops, peak_flops, peak_memory_gib,
                    xla_buffer_bytes)
from configs import facelift_gslrm, facelift_mvdiff
from data_pipeline.view_batch import random_view_batch
from kaojax.losses.perceptual import LPIPS
from kaojax.train import facelift_gslrm as gslrm_training
from kaojax.train import facelift_loop
from kaojax.train import facelift_mvdiff as mvdiff_training

MODULES = {"gslrm": facelift_gslrm, "mvdiff": facelift_mvdiff}


def run_config(module, preset, size=None, batch=None, dtype=None, remat=False):
  config = module.get_config("tiny" if preset == "tiny" else "")
  if preset != "tiny":
    config.model.preset = preset
    if module is facelift_mvdiff:
      config.model.vae_preset = config.model.clip_preset = "facelift"
    config.data.image_size = size or (256 if preset == "small" else 512)
  config.batch_size = batch or (config.batch_size if preset == "tiny" else 1)
  if dtype:
    config.model.dtype = dtype
  config.model.remat = remat
  return config


def networks(module, config):
  """(trainable network, frozen networks or None, views per subject)."""
  if module is facelift_gslrm:
    # The perceptual term at its weight, through a random-weight LPIPS-VGG16 (speed
    # does not depend on the weights; the real ones are not bundled).
    perceptual = LPIPS(nnx.Rngs(0)) if config.loss.lpips_weight else None
    return gslrm_training.build_model(config), perceptual, config.data.num_views
  unet, conditioners = mvdiff_training.build_networks(config)
  return unet, conditioners, mvdiff_training.NUM_VIEWS


def make_loss(module, config):
  return (gslrm_training if module is facelift_gslrm else mvdiff_training).make_loss(config)


def memory_limit_bytes():
  """The first device's memory (the GPU's limit; on the CPU, the machine's RAM)."""
  stats = jax.devices()[0].memory_stats()
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"]
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build(module, config, tx):
  """-> (graphdef, train state, frozen graph, frozen state, views): the step's
  networks on the default device (one device: nothing to place on a mesh)."""
  model, frozen, views = networks(module, config)
  graphdef, state = facelift_loop.initial_state(model, tx, None,
                                                ema=config.get("ema_decay") is not None)
  frozen_graph, frozen_state = nnx.split(frozen) if frozen is not None else (None, None)
  return graphdef, state, frozen_graph, frozen_state, views


def abstract_step(module, config):
  """-> (jitted train step, jitted loss gradient (the peer), (state, frozen state) as
  shapes, views per subject), traced from the shapes alone: nothing is allocated."""
  tx = facelift_loop.make_tx(config)
  static = {}

  def arrays():
    graphdef, state, frozen_graph, frozen_state, views = build(module, config, tx)
    static.update(graphdef=graphdef, frozen_graph=frozen_graph, views=views)
    return state, frozen_state

  shapes = jax.eval_shape(arrays)
  graphdef, frozen_graph = static["graphdef"], static["frozen_graph"]
  # the loss is made outside the trace: arrays it closes over must be constants
  loss_fn = make_loss(module, config)
  step = jax.jit(facelift_loop.make_train_step(graphdef, tx, loss_fn, frozen_graph,
                                               config.get("ema_decay")), donate_argnums=0)

  @jax.jit
  def gradient(state, batch, key, frozen_state):
    """The peer: the loss's forward and backward alone (no optimiser, no EMA)."""
    frozen = nnx.merge(frozen_graph, frozen_state) if frozen_graph is not None else None

    def objective(params):
      return loss_fn(nnx.merge(graphdef, params, state.rest), batch, key, frozen)[0]

    return jax.grad(objective)(state.params)

  return step, gradient, shapes, static["views"]


def measure(name, preset, repeats, size=None, batch=None, dtype=None, remat=False):
  """One configuration's train step: compiled from the shapes alone and its buffer
  plan read, then (when the plan fits the device) built for real and timed, best of
  `repeats` after a warm-up. The FLOP count is the model's (without recomputation)."""
  module = MODULES[name]
  config = run_config(module, preset, size, batch, dtype, remat)
  step, gradient, shapes, views = abstract_step(module, config)
  data = random_view_batch(config.batch_size, views, config.data.image_size)
  key = jax.random.key(0)
  # Counted without remat: XLA counts a scan's body once, and MFU counts model FLOPs.
  counted = step if not remat else abstract_step(
      module, run_config(module, preset, size, batch, dtype, False))[0]
  flops = lowered_flops(counted, shapes[0], data, key, shapes[1])
  params = sum(x.size for x in jax.tree.leaves(shapes[0].params))
  result = {"device": jax.devices()[0].platform, "batch": config.batch_size,
            "size": config.data.image_size, "dtype": config.model.dtype, "remat": remat,
            "trainable_params_m": params / 1e6}
  compiled = step.lower(shapes[0], data, key, shapes[1]).compile()
  plan = xla_buffer_bytes(compiled)
  result["xla_plan_gib"] = plan / 2 ** 30 if plan else None
  if flops:
    result["gflop_per_step"] = flops / 1e9
  limit = memory_limit_bytes()
  label = (f"{name:>6} {preset:>8}: batch {config.batch_size} at {config.data.image_size} px, "
           f"{config.model.dtype}{', remat' if remat else ''}")
  if plan and plan > limit:
    result["not_run"] = (f"XLA's plan needs {plan / 2 ** 30:.1f} GiB, the device has "
                         f"{limit / 2 ** 30:.1f} GiB")
    print(f"{label}: not run ({result['not_run']})", flush=True)
    return result
  _, state, _, frozen_state, _ = build(module, config, facelift_loop.make_tx(config))
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], data, key, frozen_state)
    jax.block_until_ready(metrics["loss"])

  seconds = best_time(one_step, repeats)
  result.update(step_s=seconds, examples_per_s=config.batch_size / seconds)
  result["gradient_s"] = best_time(lambda: jax.block_until_ready(
      gradient(holder["state"], data, key, frozen_state)), repeats)
  result["step_over_gradient"] = seconds / result["gradient_s"]
  if flops:
    result["gflops_achieved"] = flops / seconds / 1e9
    peak = peak_flops("bfloat16" if config.model.dtype == "bfloat16" else "float32")
    if peak:
      result["mfu"] = flops / seconds / peak
  result["peak_memory_gib"] = peak_memory_gib()
  print(f"{label}: {seconds:.3f} s/step, {result['examples_per_s']:.2f} examples/s, "
        f"step / loss gradient alone x{result['step_over_gradient']:.2f}"
        + (f", {result['gflops_achieved']:.3g} GFLOP/s" if flops else "")
        + (f", MFU {result['mfu']:.1%}" if "mfu" in result else "")
        + f", peak memory {result['peak_memory_gib']:.2f} GiB", flush=True)
  return result


def measure_in_child(*args, **kwargs):
  """`measure` in a fresh process (its own peak memory; a killed child is a result)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    try:
      return pool.submit(measure, *args, **kwargs).result()
    except concurrent.futures.process.BrokenProcessPool:
      name, preset = args[:2]
      print(f"{name:>6} {preset:>8}: the process died (out of memory?)", flush=True)
      return {"error": "the measuring process died (killed: out of memory?)"}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--presets", default="tiny")
  parser.add_argument("--networks", default="gslrm,mvdiff")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--size", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
  parser.add_argument("--remat", action="store_true",
                      help="recompute transformer / UNet blocks in the backward pass")
  args = parser.parse_args()
  # No JAX backend in this process: on a GPU it would hold the children's memory.
  results = {f"{n}_{p}": measure_in_child(n, p, args.repeats, args.size, args.batch,
                                          args.dtype, args.remat)
             for n in args.networks.split(",") for p in args.presets.split(",")}
  print(json.dumps({"benchmark": "facelift_train_step",
                    **{f"{name}_{k}": round(v, 4) if isinstance(v, float) else v
                       for name, r in results.items() for k, v in r.items()}}))


if __name__ == "__main__":
  main()
