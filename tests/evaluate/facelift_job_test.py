"""The eval_facelift job: held-out views scored with FaceLift's metric definitions."""

import dataclasses
import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from data_pipeline import facelift_layout
from data_pipeline.heads import subject_cameras
from data_pipeline.layout import write_split
from kaojax import jobs
from kaojax.evaluate import facelift_job
from kaojax.render import rasterize_gaussians
from kaojax.render.gaussians import Gaussians

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location("eval_facelift",
                                                ROOT / "configs" / "eval_facelift.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _blobs(seed=0, count=300):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(count, 3)) * 0.3
  return Gaussians(means=jnp.asarray(means, jnp.float32),
                   quats=jnp.tile(jnp.asarray([1.0, 0, 0, 0]), (count, 1)),
                   scales=jnp.full((count, 3), 0.06), opacities=jnp.full(count, 0.9),
                   colors=jnp.asarray(rng.uniform(0.1, 0.9, (count, 3)), jnp.float32))


def test_the_true_gaussians_score_near_perfect_at_the_held_out_cameras(tmp_path,
                                                                       monkeypatch):
  """A subject rendered from known Gaussians; the 'reconstruction' returns them: the
  held-out cameras must be read and used as the dataset means them."""
  size, truth = 32, _blobs()
  c2w, K, views = subject_cameras(np.random.default_rng(0), size, 3)
  out = rasterize_gaussians(truth, jnp.asarray(np.linalg.inv(c2w)), jnp.asarray(K), size,
                            size)
  alpha = np.asarray(out["alpha"])[..., None]
  rgb = np.asarray(out["color"]) / np.maximum(alpha, 1e-6)     # straight (not premultiplied)
  rgba = np.concatenate([np.clip(rgb, 0, 1), alpha], -1)
  data = tmp_path / "data"
  facelift_layout.write_subject(data, "blob", rgba, c2w, K, views)
  write_split(data, "test", ["blob"])
  monkeypatch.setattr(facelift_job, "reconstruct", lambda task, image: truth)
  results = jobs.run(tiny_config(data_root=str(data), lpips_weights=""), tmp_path / "out")
  assert results["images"] == 3 and "lpips" not in results
  assert results["psnr"] > 40 and results["ssim"] > 0.99
  assert results["masked_psnr"] > 40 and results["masked_ssim"] > 0.99
  # The same Gaussians moved: clearly worse (the score sees the geometry).
  shifted = dataclasses.replace(truth, means=truth.means + 0.15)
  monkeypatch.setattr(facelift_job, "reconstruct", lambda task, image: shifted)
  worse = jobs.run(tiny_config(data_root=str(data), lpips_weights=""), tmp_path / "out2")
  assert worse["psnr"] < results["psnr"] - 10


def test_tiny_end_to_end(tmp_path):
  config = tiny_config(max_subjects=1, max_views=2)
  results = jobs.run(config, tmp_path)
  saved = json.loads((tmp_path / "facelift_results.json").read_text())
  assert saved["images"] == 2 and saved["psnr"] == results["psnr"]
  for name in ("psnr", "ssim", "lpips", "masked_psnr", "masked_ssim", "masked_lpips"):
    assert np.isfinite(saved[name])
  assert "RANDOM" in saved["lpips_weights"]
  table = (tmp_path / "facelift_results.md").read_text()
  assert "| FaceLift (paper) | 16.61 | 0.7968 | 0.2694 |" in table
  assert (tmp_path / "renders" / "head_00000.png").is_file()
