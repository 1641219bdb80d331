"""Unreadable checkpoint files give a CheckpointError naming the file."""

import pathlib
import pickle

import numpy as np
import pytest

from kaojax.convert.torch_state import CheckpointError, read_state_dict

torch = pytest.importorskip("torch")


def _tensors():
  return {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}


def test_truncated_or_garbage_safetensors(tmp_path):
  from safetensors.torch import save_file
  save_file(_tensors(), str(tmp_path / "model.safetensors"))
  blob = (tmp_path / "model.safetensors").read_bytes()
  for name, data in (("truncated", blob[:-10]), ("header_only", blob[:40]), ("empty", b""),
                     ("garbage", b"\xff" * 64)):
    path = tmp_path / name / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{name}/model\.safetensors: unreadable"):
      read_state_dict(path)
    with pytest.raises(CheckpointError, match=rf"{name}/model\.safetensors"):
      read_state_dict(path.parent)  # the folder form too


class _Evil:
  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(_Evil.marker),))


def test_malicious_or_broken_torch_bin(tmp_path):
  _Evil.marker = str(tmp_path / "pwned")
  torch.save({"w": torch.zeros(2), "x": _Evil()}, tmp_path / "evil.bin")
  with pytest.raises(CheckpointError, match=r"evil\.bin: unreadable checkpoint \(Unpickling"):
    read_state_dict(tmp_path / "evil.bin")
  assert not (tmp_path / "pwned").exists()

  (tmp_path / "plain_pickle.bin").write_bytes(pickle.dumps({"w": np.zeros(2)}))
  torch.save(_tensors(), tmp_path / "good.bin")
  (tmp_path / "truncated.bin").write_bytes((tmp_path / "good.bin").read_bytes()[:300])
  for name in ("plain_pickle", "truncated"):
    with pytest.raises(CheckpointError, match=rf"{name}\.bin: unreadable checkpoint"):
      read_state_dict(tmp_path / f"{name}.bin")


def test_torch_bin_without_a_dict_of_tensors(tmp_path):
  torch.save([torch.zeros(2)], tmp_path / "list.bin")
  with pytest.raises(CheckpointError, match=r"list\.bin: expected a dictionary of tensors"):
    read_state_dict(tmp_path / "list.bin")
  torch.save({"w": torch.zeros(2), "step": 7}, tmp_path / "mixed.bin")
  with pytest.raises(CheckpointError, match=r"mixed\.bin: entry 'step' is a int, not a tensor"):
    read_state_dict(tmp_path / "mixed.bin")
  torch.save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "fp8.bin")
  with pytest.raises(CheckpointError, match=r"fp8\.bin: tensor 'w' cannot be read"):
    read_state_dict(tmp_path / "fp8.bin")
