"""The diffusion training step's options: remat changes no gradient."""

import jax
import numpy as np
from flax import nnx

from configs import facelift_mvdiff
from data_pipeline.view_batch import random_view_batch
from kaojax.train import facelift_mvdiff as training


def test_remat_changes_no_gradient():
  batch = random_view_batch(1, training.NUM_VIEWS, 16)
  grads = []
  for remat in (False, True):
    config = facelift_mvdiff.get_config("tiny")
    config.model.remat = remat
    unet, conditioners = training.build_networks(config)
    graphdef, params = nnx.split(unet)
    loss_fn = training.make_loss(config)
    objective = lambda p: loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0),
                                  conditioners)[0]
    grads.append(jax.tree.leaves(jax.jit(jax.grad(objective))(params)))
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
