"""Non-finite values in training: a step whose loss or gradients are not finite
leaves the parameters and the optimiser state as they were and is counted; too many
in a row stop the run with an error that says so."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import sources
from data_pipeline.batch import random_batch
from kaojax import losses
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.train.loop import train_and_evaluate
from kaojax.train.metrics import read_metrics
from kaojax.train.optimizer import make_optimizer
from kaojax.train.step import create_state, make_train_step
from tests.train.tiny_run import tiny_config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_nonfinite_step_changes_nothing_and_is_counted():
  model = KaoLRM(kaolrm_config("tiny", num_samples=64), make_synthetic_flame(), nnx.Rngs(0))
  tx = make_optimizer(1e-3, 1, 10)
  graphdef, state = create_state(model, tx)
  step = jax.jit(make_train_step(graphdef, tx, losses.stage_weights(1), 0.75))
  good = jax.tree.map(jnp.asarray, random_batch(2, 2, 56, 16, seed=1))
  bad = good.replace(target_alpha=good.target_alpha.at[0, 0, 0, 0].set(jnp.nan))
  key = jax.random.key(0)

  before = _leaves((state.params, state.opt_state))
  after_bad, metrics = step(state, bad, key)
  assert not np.isfinite(float(metrics["loss"]))
  for a, b in zip(before, _leaves((after_bad.params, after_bad.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert (int(after_bad.step), int(after_bad.nonfinite_steps),
          int(after_bad.nonfinite_streak)) == (1, 1, 1)
  twice, _ = step(after_bad, bad, key)
  assert (int(twice.nonfinite_steps), int(twice.nonfinite_streak)) == (2, 2)

  recovered, metrics = step(twice, good, key)
  assert np.isfinite(float(metrics["loss"]))
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(twice.params),
                                                      _leaves(recovered.params)))
  assert (int(recovered.nonfinite_steps), int(recovered.nonfinite_streak)) == (2, 0)
  assert int(metrics["nonfinite_steps"]) == 2 and int(metrics["nonfinite_streak"]) == 0


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tiny_dataset, tmp_path, monkeypatch):
  make_dataset = sources.make_dataset

  def poisoned(*args, **kwargs):   # every batch's alpha mask (a stage-I target) is NaN
    return make_dataset(*args, **kwargs).map(
        lambda b: b.replace(target_alpha=np.full_like(b.target_alpha, np.nan)))

  monkeypatch.setattr(sources, "make_dataset", poisoned)
  config = tiny_config(tiny_dataset, total_steps=6, stage1_steps=6, eval_every=0)
  config.max_nonfinite_streak = 3
  with pytest.raises(FloatingPointError, match="3 training steps in a row"):
    train_and_evaluate(config, tmp_path)
  rows = read_metrics(tmp_path)
  assert [(r["step"], r["nonfinite_steps"], r["nonfinite_streak"]) for r in rows] == [
      (1, 1, 1), (2, 2, 2), (3, 3, 3)]
