"""The converter CLI and the Orbax checkpoints it writes (kaojax.models.loading)."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from kaojax.models.loading import load_model, save_model
from kaojax.convert.openlrm import kaolrm_from_state, main, openlrm_from_state
from kaojax.convert.torch_state import read_state_dict
from kaojax.flame import load_flame_from_kaolrm_state
from kaojax.flame.synthetic import write_synthetic_flame
from tests.convert.key_lists import fake_flame_buffers, read_key_list
from tests.oracle_cases import load_case, oracle_cases


def params_of(model):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def openlrm_folder(case_folder, tmp_path):
  """An OpenLRM release-style folder for an oracle case: its model.safetensors and a
  config.json holding the model kwargs (as the Hugging Face repos do)."""
  meta = json.loads((case_folder / "case.json").read_text())
  folder = tmp_path / "openlrm"
  folder.mkdir()
  (folder / "model.safetensors").symlink_to(case_folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps(meta["model_kwargs"]))
  return folder


def head_args(case_folder):
  """CLI options with the case's head counts (the reduced-width oracle encoders do
  not have the released head dim 64)."""
  meta = json.loads((case_folder / "case.json").read_text())
  return ["--encoder-heads", str(meta["encoder"]["num_heads"]),
          "--heads", str(meta["transformer"]["heads"])]


def heads_kwargs(case_folder):
  meta = json.loads((case_folder / "case.json").read_text())
  return dict(encoder_heads=meta["encoder"]["num_heads"], heads=meta["transformer"]["heads"])


@pytest.mark.parametrize("case_folder", oracle_cases("openlrm"))
def test_cli_openlrm_checkpoint_reproduces_the_oracle(case_folder, tmp_path):
  _, inputs, outputs = load_case(case_folder)
  src = openlrm_folder(case_folder, tmp_path)
  size = inputs["image"].shape[-1]
  main(["--in", str(src), "--out", str(tmp_path / "ckpt"), "--image-size", str(size)]
       + head_args(case_folder))
  model = load_model(tmp_path / "ckpt")
  direct = openlrm_from_state(read_state_dict(src / "model.safetensors"),
                              json.loads((src / "config.json").read_text()), size,
                              **heads_kwargs(case_folder))
  assert model.cfg == direct.cfg
  want = params_of(direct)
  got = params_of(model)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  images = np.transpose(inputs["image"], (0, 2, 3, 1))
  with jax.default_matmul_precision("highest"):
    planes = nnx.jit(lambda m, x, c: m(x, c))(model, images, inputs["source_camera"])
  np.testing.assert_allclose(np.transpose(np.asarray(planes), (0, 1, 4, 2, 3)),
                             outputs["planes"], atol=1e-4, rtol=1e-4)


def test_cli_kaolrm_init_from_openlrm(tmp_path):
  """KaoLRM's training start: backbone = converted OpenLRM, FLAME / Gaussian decoders
  with PyTorch's default nn.Linear init, zero Gaussian-decoder biases."""
  case_folder = oracle_cases("openlrm")[0].values[0]
  if case_folder is None:
    pytest.skip("no openlrm oracle case")
  src = openlrm_folder(case_folder, tmp_path)
  flame_dir = write_synthetic_flame(tmp_path / "flame")
  main(["--in", str(src), "--out", str(tmp_path / "ckpt"), "--kind", "kaolrm-init",
        "--flame", str(flame_dir), "--seed", "3"] + head_args(case_folder))
  model = load_model(tmp_path / "ckpt")
  cfg = model.cfg
  assert cfg.lrm.encoder.image_size == 224 and cfg.lrm.freeze_encoder and cfg.lrm.freeze_upsampler
  assert cfg.flame_hidden == (2048, 1024, 512) and cfg.gating_hidden == 128
  backbone = params_of(openlrm_from_state(read_state_dict(src / "model.safetensors"),
                                          json.loads((src / "config.json").read_text()), 224,
                                          **heads_kwargs(case_folder)))
  got = params_of(model)
  for k, v in backbone.items():
    if not k.startswith("synthesizer/"):
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  decoders = {k for k in got if k.split("/")[0] in ("flame_decoder", "gaussian_decoder")}
  assert decoders == set(got) - set(backbone)
  for k in sorted(k for k in decoders if k.endswith("kernel")):
    kernel = got[k]
    bound = 1 / math.sqrt(kernel.shape[0])       # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(kernel).max() <= bound, k
    if kernel.size >= 4096:
      assert abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.05, k
      assert abs(kernel.mean()) < 0.05 * bound, k
    bias = got[k[:-len("kernel")] + "bias"]
    if k.startswith("gaussian_decoder"):
      np.testing.assert_array_equal(bias, 0.0, err_msg=k)
    else:
      assert np.abs(bias).max() <= bound and np.any(bias != 0), k


def test_cli_kaolrm_checkpoint_with_flame_buffers(tmp_path):
  """A KaoLRM-format checkpoint (OpenLRM keys + decoders + flame_model.* buffers)
  -> Orbax -> the same model and FLAME arrays."""
  case_folder = oracle_cases("openlrm")[0].values[0]
  if case_folder is None:
    pytest.skip("no openlrm oracle case")
  state = {k: v for k, v in read_state_dict(case_folder / "model.safetensors").items()
           if not k.startswith("synthesizer.")}
  rng = np.random.default_rng(0)
  high = 2 * math.isqrt(state["pos_embed"].shape[1] // 3)
  channels = state["upsampler.weight"].shape[1]
  shapes = {"flame_decoder.decoder.0": (32, 3 * high * high), "flame_decoder.decoder.2": (16, 32),
            "flame_decoder.decoder.4.fc.0": (4, 16), "flame_decoder.decoder.4.fc.2": (16, 4),
            "flame_decoder.decoder.5": (8, 16), "flame_decoder.decoder.7": (160, 8),
            "gaussian_decoder.decoder.net.0": (8, 3 * channels),
            "gaussian_decoder.decoder.net.2": (8, 8), "gaussian_decoder.decoder.net.4": (8, 8),
            "gaussian_decoder.decoder.net.6": (11, 8)}
  for key, shape in shapes.items():
    state[key + ".weight"] = rng.normal(size=shape).astype(np.float32)
    state[key + ".bias"] = rng.normal(size=shape[:1]).astype(np.float32)
  state["synthesizer.decoder.net.0.weight"] = np.zeros((64, 3 * channels), np.float32)  # allowed
  state.update(fake_flame_buffers(read_key_list("kaolrm.txt")))
  src = tmp_path / "kaolrm"
  src.mkdir()
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            str(src / "model.safetensors"))
  meta = json.loads((case_folder / "case.json").read_text())
  (src / "config.json").write_text(json.dumps(meta["model_kwargs"]))

  main(["--in", str(src), "--out", str(tmp_path / "ckpt")]      # --kind auto -> kaolrm
       + head_args(case_folder))
  model = load_model(tmp_path / "ckpt", remat=True, efficient_attention=False, monocular=True,
                     num_samples=100)
  assert model.cfg.lrm.remat and model.cfg.lrm.encoder.remat
  assert model.cfg.monocular and model.cfg.num_samples == 100
  with pytest.raises(TypeError, match="flame_hidden"):
    load_model(tmp_path / "ckpt", flame_hidden=(1, 2, 3))
  assert not model.cfg.lrm.efficient_attention
  assert model.cfg.flame_hidden == (32, 16, 8) and model.cfg.gaussian_hidden == 8
  got = params_of(model)
  np.testing.assert_array_equal(got["flame_decoder/fc1/kernel"],
                                state["flame_decoder.decoder.0.weight"].T)
  np.testing.assert_array_equal(got["gaussian_decoder/decoder/layers/3/bias"],
                                state["gaussian_decoder.decoder.net.6.bias"])
  direct = kaolrm_from_state(state, config=meta["model_kwargs"], **heads_kwargs(case_folder))
  want = params_of(direct)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  flame = load_flame_from_kaolrm_state(state)
  for name in ("v_template", "shapedirs", "exprdirs", "posedirs", "faces", "full_lmk_faces",
               "dynamic_lmk_bary"):
    np.testing.assert_array_equal(getattr(model.flame_model, name), getattr(flame, name),
                                  err_msg=name)
  assert model.flame_model.parents == flame.parents


def test_checkpoint_errors_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="kaojax_model.json"):
    load_model(tmp_path)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(FileExistsError, match="full"):
    save_model(tmp_path / "full", None)
