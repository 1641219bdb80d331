"""FaceLift component speed on the CPU, kaojax (jitted JAX) vs PyTorch peers measured
in the same run:

- UNet step: kaojax UNet vs diffusers.UNet2DConditionModel with the same random
  weights (loaded through kaojax.convert.diffusers), at the `small` preset
  (SD2.1-unCLIP layout at a fifth of the width) or the `tiny` preset (--quick); the
  peer runs stock per-image attention, so the like-for-like kaojax figure is
  num_views=1; the sparse multi-view figure (num_views=6, 2x the attention keys) is
  reported beside it.
- GS-LRM forward: kaojax GSLRM vs a PyTorch transcription of the same network (same
  weights; outputs checked equal first), at the `small` preset (6 layers of width
  512) or the `tiny` preset (--quick). The kaojax figure covers the whole forward (ray
  encoding, transformer, heads, activations); the peer times the patch tokens ->
  raw Gaussians part only, so the comparison favours the peer.

    python benchmarks/facelift.py [--quick]

No GPU timing here (the full 512 px / 50-step pipeline against the paper's ~8 s needs
a lent accelerator). The last line is a JSON object with the headline figures.
"""

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from timing import best_time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_unet(quick: bool, repeats: int):
  import torch
  from diffusers import UNet2DConditionModel
  from flax import nnx
  from kaojax.convert.diffusers import load_unet
  from kaojax.models.mvdiffusion.unet import unet_config

  config = unet_config("tiny" if quick else "small").to_diffusers()
  latent, tokens = (16 if quick else 32), 77
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**config).eval()
  folder = tempfile.mkdtemp()
  ref.save_pretrained(folder)
  batch = 12                                    # 6 views x (uncond, cond)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, latent, latent, 8)).astype(np.float32)
  ctx = rng.normal(size=(batch, tokens, config["cross_attention_dim"])).astype(np.float32)
  lab = rng.normal(size=(batch, config["projection_class_embeddings_input_dim"])).astype(np.float32)
  t = np.full((batch,), 981)
  results = {}
  for views in (1, 6):
    model = load_unet(folder, num_views=views)
    step = nnx.jit(lambda m, a, b, c, d: m(a, b, c, d))
    results[f"kaojax_views{views}_s"] = best_time(
        lambda: jax.block_until_ready(step(model, x, t, ctx, lab)), repeats)
  tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  with torch.no_grad():
    results["diffusers_s"] = best_time(
        lambda: ref(tx, torch.from_numpy(t), torch.from_numpy(ctx),
                    class_labels=torch.from_numpy(lab)).sample, repeats)
  results["speedup_vs_diffusers"] = results["diffusers_s"] / results["kaojax_views1_s"]
  results["config"] = dict(block_out_channels=config["block_out_channels"], latent=latent,
                           batch=batch)
  return results


def _torch_gslrm(state, cfg):
  """A PyTorch transcription of GS-LRM's transformer and heads (timing peer)."""
  import torch
  import torch.nn.functional as F
  w = {k: torch.from_numpy(v) for k, v in state.items()}

  def forward(posed_tokens):
    b = posed_tokens.shape[0]
    x = posed_tokens @ w["patch_embedder.1.weight"].T
    g = w["gaussian_position_embeddings"][None].expand(b, -1, -1)
    x = torch.cat([g, x], 1)
    ln = lambda x, k: F.layer_norm(x, (cfg.dim,), w[k], None, 1e-5)
    x = ln(x, "input_layer_norm.weight")
    for i in range(cfg.layers):
      p = f"transformer_layers.{i}."
      h = ln(x, p + "norm1.weight") @ w[p + "attn.to_qkv.weight"].T
      q, k, v = (t.reshape(b, -1, cfg.heads, cfg.head_dim).transpose(1, 2) for t in h.chunk(3, -1))
      a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, cfg.heads * cfg.head_dim)
      x = x + a @ w[p + "attn.fc.weight"].T
      h = F.gelu(ln(x, p + "norm2.weight") @ w[p + "mlp.mlp.0.weight"].T)
      x = x + h @ w[p + "mlp.mlp.2.weight"].T
    n = cfg.num_global
    glob = ln(x[:, :n], "gaussian_upsampler.layernorm.weight") @ w["gaussian_upsampler.linear.weight"].T
    pix = ln(x[:, n:], "pixel_gaussian_decoder.0.weight") @ w["pixel_gaussian_decoder.1.weight"].T
    return torch.cat([glob, pix.reshape(b, -1, 14)], 1)
  return forward


def bench_gslrm(quick: bool, repeats: int):
  import torch
  from flax import nnx
  from kaojax.convert.gslrm import load_gslrm
  from kaojax.geometry.cameras import facelift_cameras
  from kaojax.models.gslrm import gslrm_config, patchify
  from kaojax.geometry.rays import facelift_ray_encoding

  cfg = gslrm_config("tiny" if quick else "small")
  size, views = (64, 2) if quick else (256, 6)
  rng = np.random.default_rng(0)
  r = lambda *s: (rng.normal(size=s) / np.sqrt(s[-1])).astype(np.float32)
  d = cfg.dim
  state = {"patch_embedder.1.weight": r(d, 9 * 64), "gaussian_position_embeddings": r(2, d),
           "input_layer_norm.weight": 1 + 0.1 * r(d), "gaussian_upsampler.layernorm.weight": 1 + 0.1 * r(d),
           "gaussian_upsampler.linear.weight": r(14, d), "pixel_gaussian_decoder.0.weight": 1 + 0.1 * r(d),
           "pixel_gaussian_decoder.1.weight": r(64 * 14, d)}
  for i in range(cfg.layers):
    p = f"transformer_layers.{i}."
    state.update({p + "norm1.weight": 1 + 0.1 * r(d), p + "norm2.weight": 1 + 0.1 * r(d),
                  p + "attn.to_qkv.weight": r(3 * d, d), p + "attn.fc.weight": r(d, d),
                  p + "mlp.mlp.0.weight": r(4 * d, d), p + "mlp.mlp.2.weight": r(d, 4 * d)})
  model = load_gslrm(state, cfg)
  c2w, K = facelift_cameras(size=size)
  c2w, K = c2w[None, :views], K[None, :views]
  images = jnp.asarray(rng.uniform(size=(1, views, size, size, 3)).astype(np.float32))
  fwd = nnx.jit(lambda m, a, b, c: m(a, b, c))
  out = fwd(model, images, c2w, K)
  t_jax = best_time(lambda: jax.block_until_ready(fwd(model, images, c2w, K).xyz), repeats)
  tokens = torch.from_numpy(np.array(patchify(facelift_ray_encoding(images, c2w, K), cfg.patch)))
  peer = _torch_gslrm(state, cfg)
  with torch.no_grad():
    raw = peer(tokens).numpy()
    err = float(np.abs(raw - np.asarray(out.raw)).max())
    t_torch = best_time(lambda: peer(tokens), repeats)
  return dict(kaojax_s=t_jax, torch_s=t_torch, speedup_vs_torch=t_torch / t_jax,
              max_abs_diff_raw=err, gaussians=int(out.xyz.shape[1]),
              config=dict(dim=cfg.dim, layers=cfg.layers, size=size, views=views))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="tiny sizes, fewer repeats")
  args = parser.parse_args()
  repeats = 2 if args.quick else 5
  import torch
  torch.set_num_threads(os.cpu_count())
  with jax.default_matmul_precision("highest"):
    results = {"device": jax.devices()[0].platform, "unet_step": bench_unet(args.quick, repeats),
               "gslrm_forward": bench_gslrm(args.quick, repeats)}
  u, g = results["unet_step"], results["gslrm_forward"]
  print(f"UNet step ({u['config']}): kaojax {u['kaojax_views1_s']:.3f}s (sparse 6-view "
        f"{u['kaojax_views6_s']:.3f}s), diffusers {u['diffusers_s']:.3f}s")
  print(f"GS-LRM forward ({g['config']}): kaojax {g['kaojax_s']:.3f}s, torch {g['torch_s']:.3f}s "
        f"(max |diff| {g['max_abs_diff_raw']:.2e})")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
