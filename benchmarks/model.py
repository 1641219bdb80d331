"""KaoLRM forward speed per image: the DINOv2 encoder against the same encoder in
Hugging Face transformers (Dinov2WithRegistersModel, PyTorch, same weights, same
run), and the whole KaoLRM forward (image + camera -> planes -> FLAME mesh ->
Gaussians, no rendering).

    python benchmarks/model.py [--quick] [--sizes small,base] [--batch 1]

--quick: the 'small' preset only, with 2 encoder blocks and 2 transformer layers and
one timed repeat (a smoke run). On a GPU it also reports images per second and model
FLOP utilisation (XLA's FLOP count of the compiled forward / time / peak FLOP/s of the
device for the compute dtype). The last line is a JSON object.
"""

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from timing import best_time, compiled_flops, peak_flops

def _random_params(model, seed):
  """Fill an abstract (eval_shape) nnx model with N(0, 0.02) weights, unit norm
  scales: timing does not depend on the values, and this skips the slow per-shape
  random init."""
  from flax import nnx
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)

  def fill(path, v):
    if path[-1] in ("scale", "gamma"):
      return np.ones(v.shape, v.dtype)
    return (0.02 * rng.standard_normal(v.shape)).astype(v.dtype)

  for path, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(fill(path, var.get_value())))
  nnx.update(model, state)
  return model


def bench_size(name, args, flame):
  import torch
  from flax import nnx
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  from kaojax.convert.dinov2 import dinov2_config_from_transformers, load_dinov2_from_transformers
  from kaojax.geometry.cameras import default_openlrm_source_camera
  from kaojax.models.kaolrm import KaoLRM, kaolrm_config
  from kaojax.models.lrm import with_runtime_options

  cfg = kaolrm_config(name)
  lrm = with_runtime_options(cfg.lrm, dtype=args.dtype)
  if args.quick:
    lrm = dataclasses.replace(lrm, layers=2, encoder=dataclasses.replace(lrm.encoder, depth=2))
  cfg = dataclasses.replace(cfg, lrm=lrm)
  enc = lrm.encoder
  size, batch = enc.image_size, args.batch

  # The same encoder in transformers, its weights converted into ours.
  torch.manual_seed(0)
  ref = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
      hidden_size=enc.dim, num_hidden_layers=enc.depth, num_attention_heads=enc.heads,
      intermediate_size=int(enc.dim * enc.mlp_ratio), num_register_tokens=enc.num_registers,
      image_size=518, patch_size=enc.patch)).eval()
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  encoder = load_dinov2_from_transformers(
      state, dinov2_config_from_transformers(state, size, enc.heads, dtype=args.dtype))

  rng = np.random.default_rng(0)
  images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
  cameras = np.stack([np.asarray(default_openlrm_source_camera())] * batch).astype(np.float32)
  pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

  def run_torch():
    with torch.no_grad():
      ref(pixel_values=pixel_values)

  encode = nnx.jit(lambda m, x: m(x))
  t_ours = best_time(lambda: jax.block_until_ready(encode(encoder, images)), args.repeats)
  on_cpu = jax.default_backend() == "cpu"
  t_torch = best_time(run_torch, args.repeats) if on_cpu else None

  model = _random_params(KaoLRM.abstract(cfg, flame), 1)
  key = jax.random.key(0)
  forward = nnx.jit(lambda m, x, c, k: m(x, c, k))
  t_model = best_time(lambda: jax.block_until_ready(forward(model, images, cameras, key)),
                  args.repeats)

  result = {
      "size": name, "image_size": size, "batch": batch, "dtype": args.dtype,
      "encoder_ms_per_image": 1e3 * t_ours / batch,
      "kaolrm_forward_ms_per_image": 1e3 * t_model / batch,
  }
  if t_torch is not None:
    result["transformers_encoder_ms_per_image"] = 1e3 * t_torch / batch
    result["encoder_speedup_vs_transformers"] = t_torch / t_ours
  if not on_cpu or args.throughput:
    graphdef, params = nnx.split(model)

    @jax.jit
    def pure_forward(params, x, c, k):
      return nnx.merge(graphdef, params)(x, c, k)

    flops = compiled_flops(pure_forward, params, images, cameras, key)
    peak = None if on_cpu else peak_flops(args.dtype)
    result["images_per_second"] = batch / t_model
    if flops:
      result["gflops_per_image"] = flops / batch / 1e9
      if peak:
        result["mfu"] = flops / t_model / peak
  line = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in result.items())
  print(line, flush=True)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true",
                      help="small preset only, 2 blocks/layers, one repeat")
  parser.add_argument("--sizes", default="small,base")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--throughput", action="store_true",
                      help="also report images/s and XLA's FLOP count on the CPU (always "
                           "reported on a GPU, with model FLOP utilisation)")
  parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on "
                      "CPU, bfloat16 on GPU)")
  args = parser.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  sizes = ["small"] if args.quick else args.sizes.split(",")
  args.batch = args.batch or (1 if on_cpu else 16)
  args.repeats = args.repeats or (1 if args.quick else 3)
  args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")

  import torch
  from kaojax.flame.synthetic import make_synthetic_flame
  torch.set_num_threads(os.cpu_count())
  flame = make_synthetic_flame(seed=0)
  results = [bench_size(name, args, flame) for name in sizes]
  print(json.dumps({"benchmark": "kaolrm_model_forward", "backend": jax.default_backend(),
                    "device": jax.devices()[0].device_kind, "quick": args.quick,
                    "results": [{k: (round(v, 4) if isinstance(v, float) else v)
                                 for k, v in r.items()} for r in results]}))


if __name__ == "__main__":
  main()
