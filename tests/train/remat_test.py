"""The model's execution options inside the jitted training step (nnx.merge under
jax.grad): config.model.remat=True gives the same loss, gradient and update as
without rematerialisation; config.model.dtype="bfloat16" computes in bf16 and
tracks the float32 step, its parameters and update kept in float32."""

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
from data_pipeline.batch import random_batch


def _step(**options):
  """(initial params, params after one step, metrics) with `options` of the LRM."""
  cfg = kaolrm_config("tiny", num_samples=128)
  cfg = dataclasses.replace(cfg, lrm=with_runtime_options(cfg.lrm, **options))
  model = KaoLRM(cfg, make_synthetic_flame(), nnx.Rngs(0))
  tx = make_optimizer(1e-3, 1, 10)
  graphdef, state = create_state(model, tx)
  batch = jax.tree.map(jnp.asarray, random_batch(2, 2, 56, 32, seed=2))
  step = jax.jit(make_train_step(graphdef, tx, losses.stage_weights(1), 0.75))
  start = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  with jax.default_matmul_precision("highest"):
    new_state, metrics = step(state, batch, jax.random.key(0))
  return start, [np.asarray(x) for x in jax.tree.leaves(new_state.params)], metrics


@pytest.fixture(scope="module")
def plain():
  return _step(remat=False, dtype="float32")


def test_remat_train_step_matches_the_plain_one(plain):
  _, plain_params, plain_metrics = plain
  _, remat_params, remat_metrics = _step(remat=True)
  for term in ("loss", "landmark", "grad_norm"):
    assert float(remat_metrics[term]) == pytest.approx(float(plain_metrics[term]),
                                                       rel=1e-5), term
  for a, b in zip(plain_params, remat_params):
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_bfloat16_train_step_tracks_the_float32_one(plain):
  start, plain_params, plain_metrics = plain
  _, params, metrics = _step(dtype="bfloat16")
  assert {x.dtype for x in params} == {np.dtype(np.float32)}
  for term in ("loss", "landmark", "mask", "shape_reg", "expression_reg"):
    assert float(metrics[term]) == pytest.approx(float(plain_metrics[term]), rel=1e-2), term
  assert float(metrics["grad_norm"]) == pytest.approx(float(plain_metrics["grad_norm"]),
                                                      rel=2e-2)
  assert float(metrics["loss"]) != float(plain_metrics["loss"])   # bf16 was used
  # AdamW's first update is about lr * sign(gradient): the signs agree (99.7% here)
  plain_update = np.concatenate([(b - a).ravel() for a, b in zip(start, plain_params)])
  update = np.concatenate([(b - a).ravel() for a, b in zip(start, params)])
  assert np.mean(np.sign(update) == np.sign(plain_update)) > 0.99
