"""The LPIPS term inside the training step, with a tiny random VGG; the start-up
refusal when the term has a weight but no LPIPS weights are configured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import stage1, stage2
from kaojax import losses, sharding
from data_pipeline.batch import random_batch
from kaojax.models.loading import save_lpips
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.losses.perceptual import LPIPS
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.train import loop
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import create_state, make_train_step

TINY_VGG = ((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8))


def _setup():
  model = KaoLRM(kaolrm_config("tiny", num_samples=256), make_synthetic_flame(), nnx.Rngs(0))
  tx = make_optimizer(1e-3, 1, 10)
  graphdef, state = create_state(model, tx)
  batch = jax.tree.map(jnp.asarray, random_batch(2, 2, 56, 32, seed=3))
  return graphdef, state, tx, batch


def test_lpips_term_is_computed_on_the_surfel_renders_and_trains():
  graphdef, state, tx, batch = _setup()
  net = LPIPS(nnx.Rngs(1), TINY_VGG)
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(net))]
  weights = losses.stage_weights(2, overrides={"lpips": 0.5})
  device_mesh = sharding.make_device_mesh(1, 1, jax.devices()[:1])
  step = loop.compile_step(graphdef, tx, jax.device_put(state), device_mesh, weights, 0.75,
                           perceptual=net)
  key = jax.random.key(4)

  @jax.jit
  def lpips_of_the_renders(params, rest):
    model = nnx.merge(graphdef, params, rest)
    _, renders = model.forward_and_render(
        batch.source, batch.source_camera, batch.viewmats, batch.Ks, batch.render_size, key,
        background=batch.background, mesh=False)
    return losses.lpips_loss(net, renders["surfels"]["color"], batch.target_rgb)

  want = float(lpips_of_the_renders(state.params, state.rest))

  start = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  new_state, metrics = step(jax.tree.map(jnp.copy, state), batch, key)   # donates it
  assert float(metrics["lpips"]) == pytest.approx(want, rel=1e-4)
  assert want > 0
  # the other terms are there too and the total weighs lpips at 0.5
  terms = {t: float(metrics[t]) for t in weights if weights[t]}
  assert float(metrics["loss"]) == pytest.approx(
      sum(weights[t] * v for t, v in terms.items()), rel=1e-5)
  assert np.isfinite(float(metrics["grad_norm"]))
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(start, jax.tree.leaves(new_state.params)))
  assert moved > 0
  # the LPIPS network is not trained
  for a, b in zip(before, jax.tree.leaves(nnx.state(net))):
    np.testing.assert_array_equal(a, np.asarray(b))

  # lpips' gradient reaches the model: the step with only the lpips term moves it
  only = make_train_step(graphdef, tx, {"lpips": 1.0}, 0.75, perceptual=net)
  _, only_metrics = jax.jit(only)(state, batch, key, nnx.state(net))
  assert float(only_metrics["grad_norm"]) > 0
  assert float(only_metrics["lpips"]) == pytest.approx(want, rel=1e-4)


def test_train_step_refuses_a_weighted_lpips_term_without_the_network():
  graphdef, _, tx, _ = _setup()
  with pytest.raises(ValueError, match="config.loss.lpips_weights"):
    make_train_step(graphdef, tx, losses.stage_weights(2, overrides={"lpips": 0.5}), 0.75)
  make_train_step(graphdef, tx, losses.stage_weights(2, overrides={"lpips": 0}), 0.75)


def test_training_refuses_to_start_without_lpips_weights(tmp_path):
  config = stage2.get_config("tiny")
  config.loss.weights_override.lpips = 0.5
  with pytest.raises(ValueError, match="config.loss.lpips_weights"):
    loop.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "synthetic_data").exists()   # failed before generating data
  # the paper-scale configs leave the weight to the table (0.5 in stage II): they
  # need the weights too, unless the run never reaches stage II
  weights = {s: losses.stage_weights(s, True, stage2.get_config().loss.weights_override)
             for s in (1, 2)}
  assert weights[2]["lpips"] == 0.5
  with pytest.raises(ValueError, match="config.loss.lpips_weights"):
    loop.build_perceptual(stage2.get_config(), weights)
  assert loop.build_perceptual(stage1.get_config(), weights) is None
  assert loop.build_perceptual(stage2.get_config("tiny"), {
      s: losses.stage_weights(s, True, stage2.get_config("tiny").loss.weights_override)
      for s in (1, 2)}) is None


def test_training_loads_the_configured_lpips_weights(tmp_path):
  net = LPIPS(nnx.Rngs(2), TINY_VGG)
  save_lpips(tmp_path / "lpips", net)
  config = stage2.get_config("tiny")
  config.loss.weights_override.lpips = 0.5
  config.loss.lpips_weights = str(tmp_path / "lpips")
  weights = {s: losses.stage_weights(s, True, config.loss.weights_override) for s in (1, 2)}
  loaded = loop.build_perceptual(config, weights)
  for a, b in zip(jax.tree.leaves(nnx.state(net)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
