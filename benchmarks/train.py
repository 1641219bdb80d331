"""KaoLRM training-step speed on this machine: step time and examples/s for stage I
and stage II, and the share of a step spent outside the network (renderers, losses),
measured against the network's own forward+backward in the same run; the model's
FLOPs per step (XLA's count) and the rate achieved, with model FLOP utilisation on a
GPU of known peak.

    python benchmarks/train.py [--quick] [--presets tiny,base] [--remat] [--batch N]
                               [--attention-chunk N] [--dtype bfloat16]

--quick: the tiny preset only. --remat: rematerialise the transformer and encoder
blocks (config.model.remat) to trade compute for memory. --attention-chunk: the
transformer's attention query block (config.model.attention_chunk, default 512; 0:
one block, whose logits alone need > 20 GiB for the base preset). Batches are random
(same shapes as the data pipeline's). The last line is one JSON object, with the
peak memory (the GPU's peak bytes in use; on the CPU the process's peak resident
memory, compilation included).
"""

import argparse
import dataclasses
import json

import jax
import numpy as np
from flax import nnx

from timing import best_time, lowered_flops, peak_flops, peak_memory_gib
from configs import stage2
from data_pipeline.batch import random_batch
from kaojax import losses
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM
from kaojax.models.lrm import with_runtime_options
from kaojax.nn.params import TRAINABLE
from kaojax.train.loop import model_config, render_tiling
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import create_state, make_train_step


def run_config(preset):
  """The run config of `configs/stage2.py` at `preset` ("tiny": its tiny preset; a
  model size: the paper's settings with that backbone, batch 1 for the CPU)."""
  if preset == "tiny":
    return stage2.get_config("tiny")
  config = stage2.get_config()
  config.model.preset = preset
  config.batch_size = 1
  return config


def model_flops(cfg, flame, tx, weights, tiling, state, batch, key):
  """XLA's FLOP count of one training step of the model as written (attention in one
  block, no rematerialisation), counted on the lowered program: no compile, no memory.
  The model's FLOPs, not those of the blocked attention's recomputation."""
  plain = dataclasses.replace(cfg, lrm=with_runtime_options(cfg.lrm, remat=False,
                                                            attention_chunk=0))
  graphdef = nnx.split(KaoLRM.abstract(plain, flame), TRAINABLE, ...)[0]
  return lowered_flops(jax.jit(make_train_step(graphdef, tx, weights, 0.75, tiling)),
                       state, batch, key)


def measure(preset, repeats, remat=False, attention_chunk=512, batch_size=None, dtype=None,
            stages=(1, 2), network=True):
  """Step times of `stages` (stage 2: with XLA's FLOP count and, on a GPU of known
  peak, MFU against the peak of the compute dtype), and with `network` the network's
  own forward+backward. dtype: config.model.dtype (None: the run config's, float32)."""
  config = run_config(preset)
  config.model.remat = remat
  config.model.attention_chunk = attention_chunk
  if dtype:
    config.model.dtype = dtype
  batch_size = batch_size or config.batch_size
  views, source, render = (config.data.num_views, config.data.source_size,
                           config.data.render_size)
  samples, tiling = config.model.num_samples, render_tiling(config)
  cfg = model_config(config)
  flame = make_synthetic_flame()
  model = KaoLRM(cfg, flame, nnx.Rngs(0))
  tx = make_optimizer(1e-4, 10, 1000)
  graphdef, state = create_state(model, tx)
  batch = random_batch(batch_size, views, source, render)
  key = jax.random.key(0)
  result = {"batch": batch_size, "dtype": config.model.dtype}
  for stage in stages:
    weights = losses.stage_weights(stage, overrides={"lpips": 0})
    step = jax.jit(make_train_step(graphdef, tx, weights, 0.75, tiling))
    seconds = best_time(lambda: jax.block_until_ready(step(state, batch, key)[1]["loss"]),
                        repeats)
    result[f"stage{stage}_step_s"] = seconds
    result[f"stage{stage}_examples_per_s"] = batch_size / seconds
  flops = (model_flops(cfg, flame, tx, weights, tiling, state, batch, key)
           if "stage2_step_s" in result else None)
  if flops:
    result["stage2_model_gflop_per_step"] = flops / 1e9
    result["stage2_gflops_achieved"] = flops / result["stage2_step_s"] / 1e9
    peak = peak_flops("bfloat16" if config.model.dtype == "bfloat16" else "float32")
    if peak:
      result["peak_tflops"] = peak / 1e12
      result["stage2_mfu"] = flops / result["stage2_step_s"] / peak
  if network:
    _measure_network(result, graphdef, state, batch, key, repeats)
  _report(preset, result, views, render, samples)
  return result


def _measure_network(result, graphdef, state, batch, key, repeats):
  """The network's own forward+backward (no renderers, no losses) in the same run."""

  def network_only(params, rest):
    m = nnx.merge(graphdef, params, rest)
    out = m(batch.source, batch.source_camera, key)
    return (out.gaussians.colors.sum() + out.flame.raw.sum()).astype(np.float32)

  net = jax.jit(jax.grad(network_only))
  result["network_fwd_bwd_s"] = best_time(
      lambda: jax.block_until_ready(net(state.params, state.rest)), repeats)
  if "stage2_step_s" in result:
    result["stage2_over_network"] = result["stage2_step_s"] / result["network_fwd_bwd_s"]


def _report(preset, result, views, render, samples):
  parts = [f"{preset:>5}: batch {result['batch']} x {views} views, render {render}px, "
           f"{samples} surfels, {result['dtype']}"]
  for stage, name in ((1, "I"), (2, "II")):
    if f"stage{stage}_step_s" in result:
      parts.append(f"stage {name} {result[f'stage{stage}_step_s']:.3f} s/step "
                   f"({result[f'stage{stage}_examples_per_s']:.2f} examples/s)")
  if "network_fwd_bwd_s" in result:
    parts.append(f"network alone {result['network_fwd_bwd_s']:.3f} s"
                 + (f" -> step / network x{result['stage2_over_network']:.1f}"
                    if "stage2_over_network" in result else ""))
  if "stage2_gflops_achieved" in result:
    parts.append(f"{result['stage2_gflops_achieved']:.3g} GFLOP/s achieved"
                 + (f", MFU {result['stage2_mfu']:.1%}" if "stage2_mfu" in result else ""))
  print(" | ".join(parts), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="tiny preset only")
  parser.add_argument("--presets", default="tiny,base")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--remat", action="store_true", help="config.model.remat=True")
  parser.add_argument("--batch", type=int, default=None,
                      help="examples per step (default: 4 tiny; small/base 1 on the CPU, 16 "
                      "on a GPU)")
  parser.add_argument("--attention-chunk", type=int, default=512,
                      help="config.model.attention_chunk (0: one block)")
  parser.add_argument("--dtype", default=None,
                      help="config.model.dtype, e.g. bfloat16 (default: the config's, float32)")
  args = parser.parse_args()
  presets = ["tiny"] if args.quick else args.presets.split(",")
  on_cpu = jax.default_backend() == "cpu"
  results = {p: measure(p, args.repeats if p == "tiny" or not on_cpu else 1, args.remat,
                        args.attention_chunk, args.batch or (None if p == "tiny" or on_cpu
                                                             else 16), args.dtype)
             for p in presets}
  print(json.dumps({"benchmark": "kaolrm_train_step", "device": jax.devices()[0].platform,
                    "remat": args.remat, "attention_chunk": args.attention_chunk,
                    "peak_memory_gib": round(peak_memory_gib(), 2),
                    **{f"{p}_{k}": round(v, 4) if isinstance(v, float) else v
                       for p, r in results.items() for k, v in r.items()}}))


if __name__ == "__main__":
  main()
