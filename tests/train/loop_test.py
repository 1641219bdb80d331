"""Pieces of the training loop: schedules, model building from converted weights,
initialisation from a stage-I checkpoint."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import stage1, stage2, finetune_mono
from kaojax.models.loading import save_model
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.models.lrm import OpenLRM, openlrm_config
from kaojax.train import loop
from kaojax.train.stages import StageSchedule, stages_to_run
from tests.train.tiny_run import tiny_config


def test_stage_schedule_by_epoch_and_by_step():
  schedule = lambda config: StageSchedule.from_config(config, steps_per_epoch=10)
  config = stage2.get_config()
  assert schedule(config) == StageSchedule(3000, 50)  # 300 / 5 epochs
  config.stage1_steps, config.total_steps = 7, 20
  assert schedule(config) == StageSchedule(20, 7)
  assert schedule(config).restart_step == 7
  assert [schedule(config).stage_at(s) for s in (0, 6, 7, 19)] == [1, 1, 2, 2]
  # Evaluation rows carry the stage of the last step trained (before any: the first).
  assert [schedule(config).stage_after(s) for s in (0, 7, 8)] == [1, 1, 2]
  assert schedule(stage1.get_config()) == StageSchedule(50, 50)
  assert schedule(stage1.get_config()).restart_step is None
  assert schedule(finetune_mono.get_config()) == StageSchedule(2000, 0)
  assert schedule(finetune_mono.get_config()).stage_after(0) == 2
  assert stages_to_run(stage1.get_config()) == (1,)
  assert stages_to_run(finetune_mono.get_config()) == (2,)
  assert stages_to_run(stage2.get_config()) == (1, 2)


def test_paper_values_in_the_default_config():
  config = stage2.get_config()
  assert (config.optim.lr, config.optim.b2, config.optim.weight_decay) == (4e-4, 0.95, 0.05)
  assert (config.optim.warmup_steps, config.optim.clip) == (3000, 1.0)
  assert (config.data.source_size, config.data.render_size, config.data.num_views) == (224, 192, 4)
  assert config.model.num_samples == 8000 and config.model.preset == "base"
  assert config.model.attention_chunk == 512  # the base preset's memory (benchmarks/train.py)
  assert config.model.encoder_position_init == "normal"                # DINOv2's init
  with pytest.raises(ValueError, match="unknown preset"):
    stage2.get_config("huge")


def test_tiny_encoder_positions_from_the_config():
  from kaojax.models.dinov2 import sincos_positions
  config = stage2.get_config("tiny")
  assert config.model.encoder_position_init == "sincos"
  model = loop.build_model(config, make_synthetic_flame())
  encoder = model.backbone.encoder.cfg
  np.testing.assert_array_equal(model.backbone.encoder.pos_embed[...][0],
                                sincos_positions(encoder.grid, encoder.dim))


def test_build_model_from_a_converted_directory(tmp_path):
  flame = make_synthetic_flame()
  saved = KaoLRM(kaolrm_config("tiny"), flame, nnx.Rngs(3))
  save_model(tmp_path / "kaolrm", saved)
  config = stage2.get_config("tiny")
  config.init.converted_model = str(tmp_path / "kaolrm")
  config.model.attention_chunk = 7            # an execution option, applied on loading
  model = loop.build_model(config, flame)
  for a, b in zip(jax.tree.leaves(nnx.state(saved, nnx.Param)),
                  jax.tree.leaves(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  assert saved.backbone.transformer.layers[0].self_attn.query_chunk is None
  assert model.backbone.transformer.layers[0].self_attn.query_chunk == 7
  save_model(tmp_path / "openlrm", OpenLRM(openlrm_config("tiny"), nnx.Rngs(0)))
  config.init.converted_model = str(tmp_path / "openlrm")
  with pytest.raises(ValueError, match="--kind kaolrm-init"):
    loop.build_model(config, flame)


def test_init_from_a_stage1_checkpoint(tiny_dataset, tmp_path):
  """A run started from another run's checkpoints takes its parameters (trainable and
  frozen) and starts at step 0; a missing folder fails before anything is written."""
  earlier = tiny_config(tiny_dataset, total_steps=2, stage1_steps=2, eval_every=0)
  earlier.seed = 5
  earlier.stop_at_step = 0      # saves the initial state at step 0: no step to compile
  loop.train_and_evaluate(earlier, tmp_path / "stage1")
  config = tiny_config(tiny_dataset, total_steps=2, stage1_steps=0, eval_every=0)
  config.init.stage1_checkpoint = str(tmp_path / "stage1" / "checkpoints")
  config.stop_at_step = 0
  loop.train_and_evaluate(config, tmp_path / "stage2")
  restore = lambda run: ocp.StandardCheckpointer().restore(
      tmp_path / run / "checkpoints" / "0" / "default")
  source, started = restore("stage1"), restore("stage2")
  assert int(started["step"]) == 0
  for part in ("params", "rest"):
    for a, b in zip(jax.tree.leaves(source[part]), jax.tree.leaves(started[part])):
      np.testing.assert_array_equal(a, b)
  # and they are not what this run's own seed gives
  fresh = nnx.state(loop.build_model(config, make_synthetic_flame()), nnx.Param)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(fresh), jax.tree.leaves(nnx.state(
          loop.build_model(earlier, make_synthetic_flame()), nnx.Param))))

  config.init.stage1_checkpoint = str(tmp_path / "typo")
  with pytest.raises(FileNotFoundError, match="stage1_checkpoint: .*typo is not a directory"):
    loop.train_and_evaluate(config, tmp_path / "stage2b")
  assert not (tmp_path / "typo").exists() and not (tmp_path / "stage2b" / "checkpoints").exists()
