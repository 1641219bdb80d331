"""FaceLift pipeline end to end with the tiny random-weight presets (every stage runs
and is shaped right; the output itself is meaningless)."""

import jax
import jax.numpy as jnp
import numpy as np
import plyfile
import pytest
import torch

from kaojax.export.ply import read_gaussian_ply
from kaojax.infer import facelift


CFG = facelift.FaceLiftConfig(image_size=32, num_steps=2, turntable_frames=3)


@pytest.fixture(scope="module")
def models():
  return facelift.tiny_models(num_views=6, seed=0)


def test_end_to_end_tiny(tmp_path, models):
  cfg = CFG
  image = jax.random.uniform(jax.random.key(0), (32, 32, 3))
  result = facelift.run(models, image, tmp_path, cfg)
  views = np.asarray(result["views"])
  assert views.shape == (6, 32, 32, 3) and views.min() >= 0 and views.max() <= 1
  n = 2 + 6 * 32 * 32
  assert result["gaussians"].xyz.shape == (1, n, 3)
  ply = plyfile.PlyData.read(str(result["ply"]))
  assert ply["vertex"].count == int(result["keep"].sum())
  assert read_gaussian_ply(result["ply"]).means.shape == (int(result["keep"].sum()), 3)
  for name in ("input.png", "multiview.png", "output.png"):
    assert (tmp_path / name).is_file()
  from PIL import Image
  assert Image.open(tmp_path / "multiview.png").size == (6 * 32, 32)
  renders = np.asarray(result["renders"])        # kaojax.render.rasterize_gaussians
  assert renders.shape == (6, 32, 32, 3) and np.all(np.isfinite(renders))
  assert result["turntable"].is_file()
  assert result["turntable"].suffix in (".mp4", ".gif")
  assert len(list(tmp_path.glob("turntable.*"))) == 1       # no partial leftovers


def test_bad_input_pixels_are_refused_before_anything_is_written(tmp_path, models):
  image = np.full((32, 32, 3), 0.5, np.float32)
  image[4, 5, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or infinite"):
    facelift.run(models, image, tmp_path / "nan", CFG)
  with pytest.raises(ValueError, match="0-255"):
    facelift.run(models, np.full((32, 32, 3), 200.0, np.float32), tmp_path / "u8", CFG)
  assert not (tmp_path / "nan").exists() and not (tmp_path / "u8").exists()


def test_nonfinite_outputs_write_nothing(tmp_path, models, monkeypatch):
  """Weights that turn the Gaussians into NaN: an error, and no partial outputs."""
  broken = facelift.reconstruct
  monkeypatch.setattr(facelift, "reconstruct", lambda m, v: jax.tree.map(
      lambda x: x * jnp.nan, broken(m, v)))
  with pytest.raises(ValueError, match="non-finite Gaussians"):
    facelift.run(models, np.full((32, 32, 3), 0.5, np.float32), tmp_path / "out", CFG)
  assert not (tmp_path / "out").exists()


def test_guidance_and_conditioning_paths(models):
  """class labels = noise-augmented CLIP embedding ++ noise-level embedding; the
  unconditional branch is what the UNet gives with zero labels and zero image latents."""
  image = jax.random.uniform(jax.random.key(1), (32, 32, 3))
  labels = facelift.image_class_labels(models, image, 0, jax.random.key(2))
  assert labels.shape == (1, 32)
  clip = models.clip(facelift.preprocess(image[None], 32))
  # at noise level 0 the cosine schedule adds noise of std sqrt(1 - alpha_bar_0) ~ 6e-3
  np.testing.assert_allclose(labels[:, :16], clip, atol=0.05)
  np.testing.assert_allclose(labels[0, 16:], np.r_[np.ones(8), np.zeros(8)], atol=1e-6)
  sched, views, t = CFG.scheduler, 6, 501          # second step of the 2-step schedule
  lat = jax.random.normal(jax.random.key(3), (views, 16, 16, 4))
  cond_lat = jnp.repeat(facelift.image_latent(models, image), views, 0)
  noise = jax.random.normal(jax.random.key(4), lat.shape)
  labels = jnp.repeat(labels, views, 0)
  got = facelift._denoise_step(models.unet, lat, jnp.int32(t), cond_lat, labels,
                               models.text_embeddings, noise, num_steps=CFG.num_steps,
                               eta=CFG.eta, guidance_scale=CFG.guidance_scale, scheduler=sched)
  from flax import nnx
  from kaojax.models.mvdiffusion.scheduler import DDIM
  unet = nnx.jit(lambda m, x, c: m(x, t, models.text_embeddings, c))
  cond = unet(models.unet, jnp.concatenate([lat, cond_lat], -1), labels)
  uncond = unet(models.unet, jnp.concatenate([lat, jnp.zeros_like(cond_lat)], -1),
                jnp.zeros_like(labels))
  guided = uncond + CFG.guidance_scale * (cond - uncond)
  want, _ = DDIM(sched).step(guided, t, lat, CFG.num_steps, eta=CFG.eta, noise=noise)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_text_embeddings_from_torch_file(tmp_path):
  emb = torch.randn(6, 77, 24).half()
  torch.save(emb, tmp_path / "clr_embeds.pt")
  got = facelift.load_text_embeddings(tmp_path / "clr_embeds.pt")
  assert got.dtype == np.float32 and got.shape == (6, 77, 24)
  np.testing.assert_array_equal(got, emb.float().numpy())
  np.save(tmp_path / "bad.npy", np.zeros((6, 77)))
  with pytest.raises(ValueError, match="bad.npy"):
    facelift.load_text_embeddings(tmp_path / "bad.npy")


def test_load_models_from_folders(tmp_path):
  """A FaceLift-layout folder written with diffusers/transformers is read back."""
  from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
  from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
      StableUnCLIPImageNormalizer)
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  from tests.facelift.gslrm_model_test import CFG as GSLRM_CFG, _tiny_state

  root = tmp_path / "mvdiffusion"
  UNet2DConditionModel(
      sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
      cross_attention_dim=8, norm_num_groups=8, use_linear_projection=True,
      class_embed_type="projection", projection_class_embeddings_input_dim=16,
  ).save_pretrained(root / "unet")
  AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
                layers_per_block=1).save_pretrained(root / "vae")
  CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8, projection_dim=8, hidden_act="gelu")
  ).save_pretrained(root / "image_encoder")
  norm = StableUnCLIPImageNormalizer(embedding_dim=8)
  with torch.no_grad():
    norm.mean.copy_(torch.arange(8.0)[None])
  norm.save_pretrained(root / "image_normalizer")
  DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="v_prediction", set_alpha_to_one=False,
                steps_offset=1).save_pretrained(root / "scheduler")
  DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(root / "image_noising_scheduler")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in _tiny_state(GSLRM_CFG).items()}},
             tmp_path / "gslrm.pt")
  torch.save(torch.zeros(6, 77, 8).half(), tmp_path / "clr_embeds.pt")

  models, scheduler = facelift.load_models(root, tmp_path / "gslrm.pt", tmp_path / "clr_embeds.pt",
                                           dtype="bfloat16")
  assert models.unet.cfg.dtype == models.vae.cfg.dtype == models.clip.cfg.dtype == "bfloat16"
  assert models.gslrm.cfg.dtype == "float32"
  assert models.unet.cfg.attention_chunk == models.gslrm.cfg.attention_chunk == 1024
  assert scheduler.prediction_type == "v_prediction" and scheduler.steps_offset == 1
  assert models.noising_scheduler.beta_schedule == "squaredcos_cap_v2"
  assert models.unet.cfg.in_channels == 8 and models.unet.cfg.num_views == 6
  np.testing.assert_array_equal(np.asarray(models.normalizer_mean), np.arange(8.0))
  assert models.clip.cfg.projection_dim == 8 and models.gslrm.cfg.dim == GSLRM_CFG.dim
  assert models.text_embeddings.shape == (6, 77, 8)
  with pytest.raises(FileNotFoundError, match="image_normalizer"):
    import shutil
    shutil.rmtree(root / "image_normalizer")
    facelift.load_models(root, tmp_path / "gslrm.pt", tmp_path / "clr_embeds.pt")


def test_bfloat16_unet_tracks_float32(models):
  """Same weights, bf16 compute: the step output stays within bf16 accuracy (8-bit
  mantissa, ~0.4% per op, accumulated over the network) of float32."""
  import dataclasses
  from flax import nnx
  from kaojax.models.mvdiffusion.unet import UNet
  cfg16 = dataclasses.replace(models.unet.cfg, dtype="bfloat16")
  unet16 = nnx.eval_shape(lambda: UNet(cfg16, nnx.Rngs(0)))
  nnx.update(unet16, nnx.state(models.unet, nnx.Param))
  x = jax.random.normal(jax.random.key(0), (6, 16, 16, 8))
  labels = jax.random.normal(jax.random.key(1), (6, 32))
  f = nnx.jit(lambda m, a: m(a, 500, models.text_embeddings, labels))
  ref, low = f(models.unet, x), f(unet16, x)
  assert low.dtype == jnp.bfloat16
  err = float(jnp.abs(low.astype(jnp.float32) - ref).max())
  assert err < 0.1 * float(ref.std())
