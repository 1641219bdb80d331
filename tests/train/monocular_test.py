"""Monocular KaoLRM training: the Gaussian selection nearest the camera inside the
training forward, and `configs/finetune_mono.py:tiny` end to end (a few steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune_mono
from data_pipeline.batch import random_batch
from kaojax import geometry
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import MONOCULAR_KEEP_DIVISOR, KaoLRM, kaolrm_config
from kaojax.train.loop import train_and_evaluate
from kaojax.train.metrics import read_metrics


def test_camera_centers_invert_the_view_matrix():
  c2w = np.eye(4, dtype=np.float32)
  c2w[:3, :3] = np.asarray(jax.random.orthogonal(jax.random.key(0), 3))
  c2w[:3, 3] = [0.3, -0.2, 2.0]
  got = geometry.camera_centers(jnp.asarray(np.linalg.inv(c2w)))
  np.testing.assert_allclose(got, c2w[:3, 3], atol=1e-5)


def _forward_and_render(model, batch, key):
  return model.forward_and_render(batch.source, batch.source_camera, batch.viewmats,
                                  batch.Ks, batch.render_size, key, synth_focal=4.0,
                                  background=batch.background, mesh=False)


def test_monocular_forward_renders_only_the_gaussians_nearest_the_camera():
  n = 200
  model = KaoLRM(kaolrm_config("tiny", num_samples=n, monocular=True),
                 make_synthetic_flame(), nnx.Rngs(0))
  batch = random_batch(2, 1, 56, 32, seed=1)
  key = jax.random.key(5)
  # jitted: running a model op by op compiles every op on its own, 5x slower
  out, renders = nnx.jit(_forward_and_render)(model, batch, key)
  everything = nnx.jit(lambda m, x, c, k: m(x, c, k, synth_focal=4.0))(
      model, batch.source, batch.source_camera, key)
  keep = int(n / MONOCULAR_KEEP_DIVISOR)
  assert keep == int(n / 1.8)   # the reference's divisor
  assert out.gaussians.means.shape == (2, keep, 3)
  # The kept Gaussians are those of smallest depth along the camera's viewing axis
  # (for the canonical camera: the reference's largest world z).
  viewmats = np.asarray(batch.viewmats[:, 0])
  camera_z = np.linalg.inv(viewmats)[:, :3, 2]   # the camera's viewing axis in the world
  depth_all = np.einsum("bj,bnj->bn", camera_z, np.asarray(everything.gaussians.means))
  depth_kept = np.einsum("bj,bnj->bn", camera_z, np.asarray(out.gaussians.means))
  np.testing.assert_allclose(np.sort(depth_kept, 1), np.sort(depth_all, 1)[:, :keep],
                             atol=1e-5)
  # every attribute travels with its centre
  for b in range(2):
    index = [int(np.argmin(np.abs(depth_all[b] - d))) for d in depth_kept[b]]
    np.testing.assert_allclose(out.gaussians.colors[b], everything.gaussians.colors[b, index],
                               atol=1e-6)
  # and the renders are those of the kept Gaussians
  again = model.render(out, batch.viewmats, batch.Ks, 32, 32,
                       batch.background[:, None, :], mesh=False)
  np.testing.assert_array_equal(renders["surfels"]["color"], again["surfels"]["color"])
  full = model.render(everything, batch.viewmats, batch.Ks, 32, 32,
                      batch.background[:, None, :], mesh=False)
  assert not np.allclose(renders["surfels"]["alpha"], full["surfels"]["alpha"])
  # multi-view models render everything (shapes only: no need to compile it)
  multi = KaoLRM.abstract(kaolrm_config("tiny", num_samples=n), make_synthetic_flame())
  out_multi, _ = nnx.eval_shape(lambda m: _forward_and_render(m, batch, key), multi)
  assert out_multi.gaussians.means.shape == (2, n, 3)


def test_canonical_camera_keeps_the_largest_z_as_the_reference():
  """For the canonical camera (the monocular setting) the depth ranking is the
  reference's: the Gaussians of largest world z."""
  from data_pipeline.sources import CANONICAL_C2W
  from kaojax.models.kaolrm import nearest_gaussians
  from kaojax.render.gaussians import Gaussians
  rng = np.random.default_rng(0)
  means = rng.normal(scale=0.3, size=(1, 50, 3)).astype(np.float32)
  g = Gaussians(means=means, quats=np.tile([1.0, 0, 0, 0], (1, 50, 1)),
                scales=np.ones((1, 50, 3)), opacities=np.ones((1, 50)), colors=means)
  kept = nearest_gaussians(g, np.linalg.inv(CANONICAL_C2W)[None].astype(np.float32), 20)
  np.testing.assert_allclose(np.sort(np.asarray(kept.means)[0, :, 2]),
                             np.sort(means[0, :, 2])[-20:], atol=1e-6)


def test_finetune_mono_tiny_trains_end_to_end(tmp_path):
  config = finetune_mono.get_config("tiny")
  config.data.synthetic.num_subjects = 6
  config.data.synthetic.num_views = 2
  config.data.synthetic.image_size = 32
  config.data.render_size = 24
  config.model.num_samples = 128
  config.batch_size = 2
  config.total_steps = 3
  config.log_every = 1
  config.async_checkpoints = False
  train_and_evaluate(config, tmp_path)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(r["stage"] == 2 for r in rows)
  for term in ("pixel", "dssim", "landmark", "depth_binding", "normal_binding", "loss"):
    assert all(np.isfinite(r[term]) for r in rows), term
  assert "lpips" not in rows[0] and "mask" not in rows[0]   # off in the tiny preset / mono
  assert (tmp_path / "synthetic_data_mono" / "lmks.npz").is_file()
  assert (tmp_path / "checkpoints" / "3").is_dir()
  with pytest.raises(ValueError, match="config.loss.lpips_weights"):
    config = finetune_mono.get_config()   # the paper's mono stage II weighs LPIPS 0.1
    train_and_evaluate(config, tmp_path / "no_weights")
