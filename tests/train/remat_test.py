"""config.model.remat=True inside the jitted training step (nnx.merge under jax.grad):
the same loss, gradient and update as without rematerialisation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaojax import losses
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.models.lrm import with_runtime_options
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import create_state, make_train_step
from tests.train.sharded_steps import make_batch


def _step(remat: bool):
  cfg = kaolrm_config("tiny", num_samples=128)
  cfg = dataclasses.replace(cfg, lrm=with_runtime_options(cfg.lrm, remat=remat))
  model = KaoLRM(cfg, make_synthetic_flame(), nnx.Rngs(0))
  tx = make_optimizer(1e-3, 1, 10)
  graphdef, state = create_state(model, tx)
  batch = {k: jnp.asarray(v[:2]) for k, v in make_batch(2).items()}
  step = jax.jit(make_train_step(graphdef, tx, losses.stage_weights(1), 0.75))
  return step(state, batch, jax.random.key(0))


def test_remat_train_step_matches_the_plain_one():
  with jax.default_matmul_precision("highest"):
    plain_state, plain = _step(False)
    remat_state, remat = _step(True)
  for term in ("loss", "landmark", "grad_norm"):
    assert float(remat[term]) == pytest.approx(float(plain[term]), rel=1e-5), term
  for a, b in zip(jax.tree.leaves(plain_state.params), jax.tree.leaves(remat_state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
