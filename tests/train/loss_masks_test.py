"""Where the pixel and binding losses are taken, as in the reference: the rendered
FLAME facial region (its `flame_mask`), or the dataset's facial mask when the batch
carries one (monocular data) - not the whole mesh silhouette."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline.batch import random_batch
from kaojax import losses
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.train.step import loss_terms

TERMS = ("pixel", "depth_binding", "normal_binding")


def test_pixel_and_binding_losses_use_the_facial_mask():
  model = KaoLRM(kaolrm_config("tiny", num_samples=256), make_synthetic_flame(), nnx.Rngs(0))
  # A close camera (normalised focal 6): the random network's small head covers pixels.
  batch = jax.tree.map(jnp.asarray, random_batch(1, 2, 56, 32, seed=2, focal=6.0))

  @nnx.jit
  def run(model, batch):
    out, renders = model.forward_and_render(
        batch.source, batch.source_camera, batch.viewmats, batch.Ks, batch.render_size,
        jax.random.key(0), background=batch.background)
    return renders, loss_terms(model, out, renders, batch, TERMS)

  renders, terms = run(model, batch)
  surfels, mesh = renders["surfels"], renders["mesh"]
  face = np.asarray(model.flame_model.face_mask)[np.asarray(mesh["face_id"])]
  facial = face & np.asarray(mesh["mask"])
  # A facial region strictly inside the silhouette, so the two choices differ.
  assert 0 < facial.sum() < np.asarray(mesh["mask"]).sum()
  np.testing.assert_allclose(terms["depth_binding"], losses.depth_binding(
      surfels["depth"], mesh["depth"], facial), rtol=1e-5)
  np.testing.assert_allclose(terms["normal_binding"], losses.normal_binding(
      surfels["normal"], mesh["normal"], facial), rtol=1e-5)
  np.testing.assert_allclose(terms["pixel"], losses.masked_pixel_mse(
      surfels["color"], batch.target_rgb, facial), rtol=1e-5)
  assert abs(float(terms["depth_binding"]) - float(losses.depth_binding(
      surfels["depth"], mesh["depth"], mesh["mask"]))) > 1e-6

  # A batch with its own facial mask (monocular datasets) uses that one.
  own = np.zeros(batch.target_alpha.shape, bool)
  own[..., 4:12, 6:18] = True
  _, terms_own = run(model, batch.replace(face_mask=jnp.asarray(own)))
  np.testing.assert_allclose(terms_own["depth_binding"], losses.depth_binding(
      surfels["depth"], mesh["depth"], own), rtol=1e-5)
