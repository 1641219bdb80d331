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
from kaojax.models.mvdiffusion.scheduler import SchedulerConfig


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
