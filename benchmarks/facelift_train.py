"""FaceLift training-step speed on this machine: step time and examples/s of the
GS-LRM step (4 input views -> Gaussians -> 8 renders, MSE) and the multi-view
diffusion step (VAE + CLIP conditions, UNet v-prediction loss over 6 views, EMA),
the steps of `kaojax/train/facelift_loop.py` on a one-device mesh; XLA's FLOP count
of each step and, on a GPU of known peak, the model FLOP utilisation.

    python benchmarks/facelift_train.py [--presets tiny,small] [--batch N]
                                        [--size S] [--dtype bfloat16]

Presets are the model presets of configs/facelift_gslrm.py and facelift_mvdiff.py
("tiny": the :tiny configs; "small" / "facelift": those networks at --size pixels,
default 256 for small, 512 for facelift). Batches are random (the data pipeline's
shapes). The last line is one JSON object, with the peak memory (the GPU's peak bytes
in use; on the CPU the process's peak resident memory, compilation included).
"""

import argparse
import json
import os
import resource
import sys

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from timing import best_time, device_peak_bytes, lowered_flops, peak_flops
from configs import facelift_gslrm, facelift_mvdiff
from data_pipeline.view_batch import random_view_batch
from kaojax import sharding
from kaojax.losses.perceptual import LPIPS
from kaojax.train import facelift_gslrm as gslrm_training
from kaojax.train import facelift_loop
from kaojax.train import facelift_mvdiff as mvdiff_training


def run_config(module, preset, size, batch, dtype):
  config = module.get_config("tiny" if preset == "tiny" else "")
  if preset != "tiny":
    config.model.preset = preset
    if module is facelift_mvdiff:
      config.model.vae_preset = config.model.clip_preset = "facelift"
    config.data.image_size = size or (256 if preset == "small" else 512)
  config.batch_size = batch or (config.batch_size if preset == "tiny" else 1)
  if dtype:
    config.model.dtype = dtype
  return config


def parts(module, config):
  """(trainable network, loss_fn, frozen networks, views per subject)."""
  if module is facelift_gslrm:
    # The perceptual term at its weight, through a random-weight LPIPS-VGG16 (speed
    # does not depend on the weights; the real ones are not bundled).
    perceptual = LPIPS(nnx.Rngs(0)) if config.loss.lpips_weight else None
    return (gslrm_training.build_model(config), gslrm_training.make_loss(config), perceptual,
            config.data.num_views)
  unet, conditioners = mvdiff_training.build_networks(config)
  return unet, mvdiff_training.make_loss(config), conditioners, mvdiff_training.NUM_VIEWS


def measure(module, preset, repeats, size=None, batch=None, dtype=None):
  config = run_config(module, preset, size, batch, dtype)
  model, loss_fn, frozen, views = parts(module, config)
  device_mesh = sharding.make_device_mesh(1, 1, jax.devices()[:1])
  tx = facelift_loop.make_tx(config)
  ema = config.get("ema_decay")
  graphdef, state = facelift_loop.initial_state(model, tx, device_mesh, ema=ema is not None)
  del model
  step = facelift_loop.compile_step(graphdef, tx, state, device_mesh, loss_fn, frozen, ema)
  data = random_view_batch(config.batch_size, views, config.data.image_size)
  key = jax.random.key(0)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], data, key)
    jax.block_until_ready(metrics["loss"])

  seconds = best_time(one_step, repeats)
  frozen_state = nnx.split(frozen)[1] if frozen is not None else None
  frozen_graph = nnx.split(frozen)[0] if frozen is not None else None
  plain = jax.jit(facelift_loop.make_train_step(graphdef, tx, loss_fn, frozen_graph, ema))
  flops = lowered_flops(plain, holder["state"], data, key, frozen_state)
  result = {"batch": config.batch_size, "size": config.data.image_size,
            "dtype": config.model.dtype, "step_s": seconds,
            "examples_per_s": config.batch_size / seconds}
  if flops:
    result["gflop_per_step"] = flops / 1e9
    result["gflops_achieved"] = flops / seconds / 1e9
    peak = peak_flops("bfloat16" if config.model.dtype == "bfloat16" else "float32")
    if peak:
      result["mfu"] = flops / seconds / peak
  name = "gslrm" if module is facelift_gslrm else "mvdiff"
  print(f"{name:>6} {preset:>8}: batch {result['batch']} at {result['size']} px, "
        f"{result['dtype']}: {seconds:.3f} s/step, {result['examples_per_s']:.2f} examples/s"
        + (f", {result['gflops_achieved']:.3g} GFLOP/s" if flops else "")
        + (f", MFU {result['mfu']:.1%}" if "mfu" in result else ""), flush=True)
  return result


def peak_memory_gib():
  peak = device_peak_bytes() if jax.default_backend() != "cpu" else None
  if peak is not None:
    return peak / 2 ** 30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--presets", default="tiny")
  parser.add_argument("--networks", default="gslrm,mvdiff")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--size", type=int, default=None)
  parser.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
  args = parser.parse_args()
  modules = {"gslrm": facelift_gslrm, "mvdiff": facelift_mvdiff}
  results = {f"{n}_{p}": measure(modules[n], p, args.repeats, args.size, args.batch,
                                 args.dtype)
             for n in args.networks.split(",") for p in args.presets.split(",")}
  print(json.dumps({"benchmark": "facelift_train_step", "device": jax.devices()[0].platform,
                    "peak_memory_gib": round(peak_memory_gib(), 2),
                    **{f"{name}_{k}": round(v, 4) if isinstance(v, float) else v
                       for name, r in results.items() for k, v in r.items()}}))


if __name__ == "__main__":
  main()
