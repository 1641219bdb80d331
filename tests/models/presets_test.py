"""Presets agree with the released checkpoints' key lists and the spec's sizes; logical
axis names cover every parameter."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from kaojax.convert.openlrm import kaolrm_config_from_state, lrm_config_from_json
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.models.lrm import OpenLRM, openlrm_config
from kaojax.sharding import RULES, make_device_mesh, partition_specs, shard_state
from tests.convert.key_lists import read_key_list

# Parameter counts of the released OpenLRM checkpoints (spec section 1).
RELEASED_PARAMS = {"small": 111_390_948, "base": 260_201_972, "large": 452_138_004}
ENCODER_NAME = {"small": "dinov2_vits14_reg", "base": "dinov2_vitb14_reg",
                "large": "dinov2_vitb14_reg"}


def shape_state(rows):
  return {k: np.broadcast_to(np.float32(0), s) for k, s, _ in rows}


def count(model):
  return sum(math.prod(v.get_value().shape)
             for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["small", "base", "large"])
def test_openlrm_presets_match_the_released_checkpoints(name):
  rows = read_key_list(f"openlrm_{name}.txt")
  assert sum(math.prod(s) for _, s, _ in rows) == RELEASED_PARAMS[name]
  state = shape_state(rows)
  heads = state["pos_embed"].shape[-1] // 64
  from_keys = lrm_config_from_json({"encoder_model_name": ENCODER_NAME[name],
                                    "transformer_heads": heads}, state)
  cfg = openlrm_config(name)
  assert cfg == from_keys
  # The stored 37x37 position table is resized to the input grid by the converter.
  table = state["encoder.model.pos_embed"].shape
  resized = (table[1] - 1 - cfg.encoder.grid ** 2) * table[2]
  assert openlrm_param_count(cfg) == RELEASED_PARAMS[name] - resized


def openlrm_param_count(cfg):
  """Parameters of OpenLRM(cfg), from abstract builds with 1-2 blocks (cheap to
  trace): count = c(1, 1) + (layers - 1) * per transformer layer + (depth - 1) * per
  encoder block."""
  def built(layers, depth):
    shallow = dataclasses.replace(cfg, layers=layers,
                                  encoder=dataclasses.replace(cfg.encoder, depth=depth))
    return count(nnx.eval_shape(lambda: OpenLRM(shallow, nnx.Rngs(0))))
  base = built(1, 1)
  return (base + (cfg.layers - 1) * (built(2, 1) - base)
          + (cfg.encoder.depth - 1) * (built(1, 2) - base))


def test_kaolrm_base_preset_matches_the_released_checkpoint():
  rows = [r for r in read_key_list("kaolrm.txt") if not r[0].startswith("flame_model.")]
  assert kaolrm_config("base") == kaolrm_config_from_state(shape_state(rows))


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_kaolrm_presets_build(name):
  cfg = kaolrm_config(name)
  assert cfg.lrm.encoder.image_size == (56 if name == "tiny" else 224)
  assert cfg.lrm.freeze_encoder and cfg.lrm.freeze_upsampler
  if name != "tiny":
    assert cfg.lrm == openlrm_config(name, image_size=224, freeze_encoder=True,
                                     freeze_upsampler=True)
    assert cfg.flame_hidden == (2048, 1024, 512) and cfg.num_samples == 8000


def test_every_parameter_has_logical_axis_names(flame):
  model = KaoLRM.abstract(kaolrm_config("tiny"), flame)
  known = {name for name, _ in RULES} | {None}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.get_value().shape), path
    assert set(names) <= known, (path, names)
  specs = dict(nnx.to_flat_state(partition_specs(nnx.state(model, nnx.Param))))
  # The model width is split over "fsdp"; feed-forward widths stay whole.
  assert tuple(specs[("backbone", "transformer", "layers", 0, "fc1", "kernel")].get_value()) == (
      "fsdp", None)
  assert tuple(specs[("backbone", "transformer", "pos_embed")].get_value()) == (None, None, "fsdp")


def test_shard_state_places_parameters_on_a_mesh(flame):
  model = KaoLRM.abstract(kaolrm_config("tiny"), flame)
  state = jax.tree.map(lambda v: np.arange(math.prod(v.shape), dtype=v.dtype).reshape(v.shape),
                       nnx.state(model, nnx.Param))
  mesh = make_device_mesh(1, 1, jax.devices()[:1])
  sharded = shard_state(state, mesh)
  for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(sharded)):
    assert b.get_value().sharding.mesh.shape == mesh.shape, path
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
