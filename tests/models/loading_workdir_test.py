"""A training run's work directory as a model (kaojax.models.loading): the run writes
its network's spec into WORKDIR/model_spec/ when it starts, and `load_model(WORKDIR)`
rebuilds the network with the parameters of the latest complete checkpoint."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import skimage.data
from flax import nnx
from PIL import Image

from configs import infer_kaolrm as infer_config
from kaojax.infer import kaolrm as infer
from kaojax.models import loading
from kaojax.models.kaolrm import KaoLRM
from kaojax.nn.params import TRAINABLE
from kaojax.train.loop import model_config, train_and_evaluate
from tests.train.tiny_run import tiny_config


def _config():
  # the synthetic data set generated into the work directory; 2 steps, both kept
  config = tiny_config(None, total_steps=2, stage1_steps=2, eval_every=0)
  config.checkpoint_every = 1
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny training run of 2 steps, a checkpoint after each."""
  path = tmp_path_factory.mktemp("run")
  train_and_evaluate(_config(), path)
  return path


def _checkpoint(workdir, step):
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")


def _split(model):
  """(trainable, frozen) parameters as flat {path: array}, as the TrainState holds them."""
  _, trainable, frozen, _ = nnx.split(model, TRAINABLE, nnx.Param, ...)
  flat = lambda state: {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
  return flat(trainable), flat(frozen)


def _assert_equal_leaves(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdir_loads_the_latest_checkpoint(workdir):
  assert sorted(p.name for p in (workdir / "model_spec").iterdir()) == [
      "flame.npz", "kaojax_model.json"]
  assert loading.is_training_workdir(workdir)
  assert not loading.is_model_directory(workdir)
  assert loading.checkpoint_steps(workdir / "checkpoints") == [1, 2]
  meta = loading.read_meta(workdir)
  assert meta["kind"] == "kaolrm"

  model = loading.load_model(workdir)
  assert isinstance(model, KaoLRM)
  assert model.cfg == model_config(_config())
  trainable, frozen = _split(model)
  state = _checkpoint(workdir, 2)
  assert int(state["step"]) == 2
  _assert_equal_leaves(trainable, state["params"])
  _assert_equal_leaves(frozen, {k: v for k, v in state["rest"].items() if k != "flame"})
  # the FLAME model the run trained with
  saved_flame = state["rest"]["flame"]["value"]
  assert len(saved_flame) > 10
  for name, array in saved_flame.items():
    np.testing.assert_array_equal(getattr(model.flame_model, name), array, err_msg=name)

  # An earlier step, and the execution options of load_model.
  earlier = loading.load_training_model(workdir, step=1, attention_chunk=7, num_samples=64)
  assert earlier.cfg.num_samples == 64
  assert earlier.backbone.transformer.layers[0].self_attn.query_chunk == 7
  first, _ = _split(earlier)
  _assert_equal_leaves(first, _checkpoint(workdir, 1)["params"])
  assert any(not np.array_equal(first[k], trainable[k]) for k in trainable)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 .*\[1, 2\]"):
    loading.load_training_model(workdir, step=5)


def test_workdir_errors(workdir, tmp_path):
  # started, no checkpoint yet
  fresh = tmp_path / "fresh"
  shutil.copytree(workdir / "model_spec", fresh / "model_spec")
  assert loading.is_training_workdir(fresh)
  with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
    loading.load_model(fresh)
  # a checkpoint being written (Orbax's temporary name) is not complete
  (fresh / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
    loading.load_model(fresh)

  # checkpoints but no model spec (a run started before the spec was written)
  old = tmp_path / "old"
  shutil.copytree(workdir / "checkpoints", old / "checkpoints")
  with pytest.raises(FileNotFoundError, match="without model_spec/kaojax_model.json"):
    loading.load_model(old)
  # the spec folder alone holds no parameters
  with pytest.raises(FileNotFoundError, match="holds no parameters"):
    loading.load_model(workdir / "model_spec")

  # the latest checkpoint damaged: its arrays truncated
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken, ignore=shutil.ignore_patterns("synthetic_data*"))
  step_dir = broken / "checkpoints" / "2" / "default"
  for path in step_dir.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:16])
  with pytest.raises(ValueError, match=r"checkpoints/2/default: the checkpoint of step 2 "
                                       r"could not be read.*earlier checkpoints: \[1\]"):
    loading.load_model(broken)
  # the earlier one still loads
  assert isinstance(loading.load_training_model(broken, step=1), KaoLRM)


def test_inference_job_on_a_training_workdir(workdir, tmp_path):
  """--config.model=WORKDIR: the inference job reconstructs a photo with the run's
  latest parameters."""
  photo = tmp_path / "astronaut.jpg"
  Image.fromarray(skimage.data.astronaut()).save(photo, quality=92)
  config = infer_config.get_config("tiny")
  config.preset = ""
  config.model = str(workdir)
  config.input = str(photo)
  config.outputs = "params"     # params.npz only
  summary = infer.run(config, tmp_path / "out")
  assert summary["ok"] == 1, (tmp_path / "out" / "results.jsonl").read_text()
  (row,) = [json.loads(line) for line in
            (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
  assert row["status"] == "ok" and row["settings"]["model"] == str(workdir)
  params = np.load(tmp_path / "out" / "astronaut" / "params.npz")
  cfg = model_config(_config())
  assert params["shape"].shape == (cfg.n_shape,)
  assert params["expression"].shape == (cfg.n_expr,)
  for key in ("shape", "expression", "pose", "scale", "translation", "landmarks3d"):
    assert np.all(np.isfinite(params[key])), key
