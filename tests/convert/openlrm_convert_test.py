"""Converters on state dicts with exactly the released key lists and shapes."""

import re

import numpy as np
import pytest
from flax import nnx

from kaojax.convert.openlrm import kaolrm_from_state, openlrm_from_state
from kaojax.convert.torch_state import CheckpointError, read_state_dict
from tests.convert.key_lists import constant_state, fake_flame_buffers, read_key_list


def assert_loaded_exactly(model, fills, unused_prefixes):
  """Every parameter is one constant, every used key's constant appears."""
  seen = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(var.get_value())
    lo, hi = float(value.min()), float(value.max())
    assert lo == hi, f"{path}: not one checkpoint tensor ({lo} .. {hi})"
    seen.add(lo)
  used = {v for k, v in fills.items() if not k.startswith(unused_prefixes)}
  assert used - seen == set(), "checkpoint tensors that reached no parameter"
  assert seen - used == set(), "parameters not coming from the checkpoint"


def test_openlrm_base_key_list_loads_without_leftovers():
  rows = read_key_list("openlrm_base.txt")
  state, fills = constant_state(rows)
  model = openlrm_from_state(state, {"encoder_model_name": "dinov2_vitb14_reg",
                                     "transformer_heads": 12, "transformer_dim": 768})
  cfg = model.cfg
  assert (cfg.dim, cfg.layers, cfg.heads, cfg.triplane_dim) == (768, 12, 12, 48)
  assert (cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.image_size) == (768, 12, 336)
  assert model.backbone.encoder.pos_embed.shape == (1, 1 + 24 * 24, 768)
  assert_loaded_exactly(model, fills, ())


def test_kaolrm_key_list_loads_without_leftovers():
  rows = read_key_list("kaolrm.txt")
  state, fills = constant_state([r for r in rows if not r[0].startswith("flame_model.")])
  state.update(fake_flame_buffers(rows))
  model = kaolrm_from_state(state)
  cfg = model.cfg
  assert cfg.flame_hidden == (2048, 1024, 512) and cfg.gating_hidden == 128
  assert cfg.lrm.encoder.image_size == 224 and cfg.lrm.dim == 768
  assert model.flame_model.num_vertices == 5023
  np.testing.assert_array_equal(np.asarray(model.flame_model.faces),
                                state["flame_model.faces_tensor"])
  assert_loaded_exactly(model, fills, ("flame_model.",))


def small_openlrm_state():
  """The openlrm_small key list cut to one encoder block and one transformer layer
  (sizes are read from the state, so this is a valid smaller checkpoint)."""
  rows = [r for r in read_key_list("openlrm_small.txt")
          if not re.match(r"(encoder\.model\.blocks|transformer\.layers)\.([1-9]|1\d)\.", r[0])]
  return constant_state(rows)[0]


def test_small_separate_qkv_checkpoint_loads():
  state = small_openlrm_state()
  model = openlrm_from_state(state)
  assert model.backbone.transformer.layers[0].cross_attn.k.kernel.shape == (384, 512)
  assert model.cfg.encoder.image_size == 224 and model.cfg.heads == 8


def test_errors_list_every_missing_unexpected_and_misshaped_key():
  state = dict(small_openlrm_state())
  del state["transformer.layers.0.cross_attn.v_proj_weight"]
  del state["encoder.model.blocks.0.ls1.gamma"]
  state["transformer.layers.0.extra.weight"] = np.zeros((3,), np.float32)
  state["camera_embedder.mlp.2.weight"] = np.zeros((1024, 1000), np.float32)
  with pytest.raises(CheckpointError) as err:
    openlrm_from_state(state)
  text = str(err.value)
  for key in ("transformer.layers.0.cross_attn.v_proj_weight", "encoder.model.blocks.0.ls1.gamma",
              "transformer.layers.0.extra.weight", "camera_embedder.mlp.2.weight"):
    assert key in text
  assert "missing keys" in text and "unexpected keys" in text and "mis-shaped keys" in text


def test_damaged_tensors_are_named_with_their_file_and_shapes(tmp_path):
  """A packed q|k|v weight whose rows do not split in three, and a damaged first MLP
  weight: the error names the file, those keys and their shapes, and blames nothing
  else (the MLP width is what most of its tensors agree on)."""
  from safetensors.numpy import save_file
  from kaojax.convert.openlrm import convert
  state = {k: np.ascontiguousarray(v) for k, v in small_openlrm_state().items()}
  packed = "transformer.layers.0.self_attn.in_proj_weight"
  rows, width = state[packed].shape
  state[packed] = state[packed][:rows - 1]
  mlp = "transformer.layers.0.mlp.0.weight"
  hidden = state[mlp].shape[0]
  state[mlp] = state[mlp][:hidden - 1]
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError) as err:
    convert(tmp_path / "model.safetensors", tmp_path / "out", kind="openlrm")
  text = str(err.value)
  assert str(tmp_path / "model.safetensors") in text
  assert f"{packed}: shape ({rows - 1}, {width})" in text
  assert f"{mlp}: converted shape ({width}, {hidden - 1})" in text
  assert f"expects ({width}, {hidden})" in text
  for innocent in ("mlp.0.bias", "mlp.3.weight", "cross_attn"):
    assert innocent not in text, innocent


def test_synthesizer_is_only_allowed_for_kaolrm():
  state = dict(small_openlrm_state())
  state["flame_decoder.decoder.0.weight"] = np.zeros((16, 3 * 64 * 64), np.float32)
  with pytest.raises(CheckpointError, match="flame_decoder.decoder.0.weight"):
    openlrm_from_state(state)
  del state["synthesizer.decoder.net.0.weight"]
  with pytest.raises(CheckpointError, match="missing keys:\n  synthesizer.decoder.net.0.weight"):
    openlrm_from_state({k: v for k, v in state.items() if not k.startswith("flame_decoder")})


def test_pytorch_bin_and_safetensors_read_the_same(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half()}
  torch.save(tensors, tmp_path / "pytorch_model.bin")
  save_file(tensors, str(tmp_path / "model.safetensors"))
  from_bin = read_state_dict(tmp_path / "pytorch_model.bin")
  from_st = read_state_dict(tmp_path)   # the folder: model.safetensors first
  for k, v in tensors.items():
    np.testing.assert_array_equal(from_bin[k], v.float().numpy() if k == "c" else v.numpy())
    np.testing.assert_array_equal(from_st[k], from_bin[k])
  with pytest.raises(FileNotFoundError):
    read_state_dict(tmp_path / "missing.safetensors")


def test_config_json_must_agree_with_the_weights():
  state = small_openlrm_state()
  config = {"encoder_model_name": "dinov2_vits14_reg", "transformer_heads": 8,
            "transformer_dim": 512, "transformer_layers": 12, "triplane_dim": 32}
  with pytest.raises(CheckpointError, match="transformer_layers: config.json says 12, the "
                                            "weights have 1"):
    openlrm_from_state(state, config)
  config["transformer_layers"] = 1
  assert openlrm_from_state(state, config).cfg.layers == 1
