"""GS-LRM converter errors, post-filter, export and (when available) rendering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kaojax.convert.gslrm import load_gslrm, read_gslrm_state
from kaojax.convert.torch_state import CheckpointError
from kaojax.export.ply import read_gaussian_ply, write_gslrm_ply
from kaojax.geometry.cameras import facelift_cameras
from kaojax.models.gslrm import GSLRMConfig, PostFilter, gslrm_config, post_filter_mask


def _tiny_state(cfg: GSLRMConfig, seed=0):
  """A random torch-layout GS-LRM state dict with the reference key names."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(size=s).astype(np.float32) / np.sqrt(s[-1])
  d, inner = cfg.dim, cfg.heads * cfg.head_dim
  state = {"patch_embedder.1.weight": r(d, cfg.in_channels * cfg.patch ** 2),
           "gaussian_position_embeddings": r(cfg.num_global, d),
           "input_layer_norm.weight": 1 + r(d),
           "gaussian_upsampler.layernorm.weight": 1 + r(d),
           "gaussian_upsampler.linear.weight": r(14, d),
           "pixel_gaussian_decoder.0.weight": 1 + r(d),
           "pixel_gaussian_decoder.1.weight": r(cfg.patch ** 2 * 14, d)}
  for i in range(cfg.layers):
    t = f"transformer_layers.{i}."
    state.update({t + "norm1.weight": 1 + r(d), t + "norm2.weight": 1 + r(d),
                  t + "attn.to_qkv.weight": r(3 * inner, d), t + "attn.fc.weight": r(d, inner),
                  t + "mlp.mlp.0.weight": r(cfg.mlp_ratio * d, d),
                  t + "mlp.mlp.2.weight": r(d, cfg.mlp_ratio * d)})
  return state


CFG = gslrm_config("tiny")


def test_torch_save_checkpoint_drops_loss_calculator(tmp_path):
  state = _tiny_state(CFG)
  blob = {"model": {k: torch.from_numpy(v) for k, v in state.items()},
          "optimizer": {"state": {}}, "fwdbwd_pass_step": 3}
  blob["model"]["loss_calculator.perceptual_loss_module.vgg.0.weight"] = torch.zeros(4, 3, 3, 3)
  torch.save(blob, tmp_path / "ckpt.pt")
  loaded = read_gslrm_state(tmp_path / "ckpt.pt")
  model = load_gslrm(tmp_path / "ckpt.pt", head_dim=32)
  assert model.cfg == CFG
  np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.to_qkv.kernel[...]),
                                loaded["transformer_layers.0.attn.to_qkv.weight"].T)


def test_converter_lists_every_problem():
  state = _tiny_state(CFG)
  state["transformer_layers.0.attn.extra.weight"] = np.zeros(3, np.float32)
  del state["transformer_layers.0.norm2.weight"]
  state["gaussian_upsampler.linear.weight"] = np.zeros((13, 64), np.float32)
  with pytest.raises(CheckpointError) as err:
    load_gslrm(state, CFG)
  msg = str(err.value)
  assert "transformer_layers.0.attn.extra.weight" in msg and "unexpected" in msg
  assert "transformer_layers.0.norm2.weight" in msg and "missing" in msg
  assert "gaussian_upsampler.linear.weight" in msg and "mis-shaped" in msg and "(64, 14)" in msg


def test_attention_chunking_matches_one_block():
  import dataclasses
  from kaojax.models.gslrm import SelfAttention
  x = jax.random.normal(jax.random.key(1), (1, 10, CFG.dim))
  one = SelfAttention(dataclasses.replace(CFG, attention_chunk=None), nnx.Rngs(0))
  chunked = SelfAttention(dataclasses.replace(CFG, attention_chunk=3), nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(chunked(x)), np.asarray(one(x)), atol=1e-5, rtol=1e-5)


def test_post_filter_rules():
  xyz = jnp.array([[0.0, 0.0, 0.0],    # kept
                   [0.0, 0.0, -0.5],   # big scale below z=0: dropped
                   [0.0, 0.0, 0.5],    # big scale above z=0: kept
                   [0.7, -0.7, -0.7],  # floater: dropped
                   [0.7, -0.7, 0.7],   # corner but high: kept
                   [0.95, 0.0, 0.0],   # outside the crop: dropped
                   [0.0, 0.0, -1.05],  # outside the crop: dropped
                   [0.1, 0.1, 0.1]])   # transparent: dropped
  scales = jnp.full((8, 3), 0.01).at[1:3, 2].set(0.2)
  opac = jnp.full((8,), 0.5).at[7].set(0.03)
  keep = post_filter_mask(xyz, scales, opac)
  assert keep.tolist() == [True, False, True, False, True, False, False, False]
  assert post_filter_mask(xyz, scales, opac, PostFilter(crop_xy=1.0))[5]


def test_forward_at_facelift_cameras_and_ply_export(tmp_path):
  model = load_gslrm(_tiny_state(CFG), CFG)
  c2w, K = facelift_cameras(size=32)
  images = jax.random.uniform(jax.random.key(0), (1, 6, 32, 32, 3))
  out = nnx.jit(lambda m, *a: m(*a))(model, images, c2w[None], K[None])
  n = 2 + 6 * 32 * 32
  assert out.xyz.shape == (1, n, 3) and out.opacities.shape == (1, n)
  assert np.all(np.isfinite(np.asarray(out.xyz)))
  # pixel-aligned Gaussians lie on their pixel's ray: (xyz - o) parallel to d
  from kaojax.geometry.rays import pixel_rays
  o, d = pixel_rays(c2w, K, 32, 32)
  xyz_view2 = np.asarray(out.xyz[0, 2 + 2 * 1024:2 + 3 * 1024])   # view 2, first patch first
  first_patch = (o[2, :8, :8].reshape(-1, 3), d[2, :8, :8].reshape(-1, 3))
  rel = xyz_view2[:64] - np.asarray(first_patch[0])
  np.testing.assert_allclose(np.cross(rel, np.asarray(first_patch[1])), 0.0, atol=1e-5)
  mask = np.asarray(post_filter_mask(out.xyz[0], out.scales[0], out.opacities[0]))
  path = write_gslrm_ply(tmp_path / "g.ply", out, mask=mask)
  back = read_gaussian_ply(path)
  assert back.means.shape == (mask.sum(), 3)
  np.testing.assert_allclose(back.colors, np.asarray(out.colors[0])[mask], atol=1e-5)

