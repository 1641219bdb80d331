"""Which parameters train and which AdamW decays, against the reference's rules.

Weight decay: OpenLRM's `_build_optimizer` (KaoLRM trains with it) exempts the
parameters of nn.LayerNorm modules and the `bias` of every module that has one, and
decays every other parameter that trains. Checked over the released KaoLRM parameter
tree (../shared/spec/checkpoint_keys/kaolrm.txt), key by key.

Freezing: one config field decides both what the optimiser updates and where the
forward pass stops gradients; a frozen part gets no update, an unfrozen one does.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline.batch import random_batch
from kaojax import losses
from kaojax.convert.openlrm import kaolrm_from_state
from kaojax.flame.synthetic import make_synthetic_flame
from kaojax.models.kaolrm import KaoLRM, kaolrm_config
from kaojax.nn.params import TRAINABLE, is_frozen
from kaojax.train.optimizer import make_optimizer, weight_decay_mask
from kaojax.train.step import create_state, make_train_step
from tests.convert.key_lists import constant_state, fake_flame_buffers, read_key_list

# The reference KaoLRM's nn.LayerNorm modules outside the frozen encoder: the three
# norms of each transformer block (inside ModLN) and the final norm.
REFERENCE_LAYER_NORM = re.compile(r"transformer\.(layers\.\d+\.norm[123]\.norm|norm)\.(weight|bias)")
REFERENCE_FROZEN = ("encoder.", "upsampler.")
NOT_PARAMETERS = ("flame_model.",)          # FLAME buffers


def reference_decays(key: str) -> bool:
  return not (REFERENCE_LAYER_NORM.fullmatch(key) or key.endswith(".bias"))


@pytest.fixture(scope="module")
def released():
  """The base KaoLRM built from the released key list, every tensor its own constant;
  -> (model, {constant: torch key})."""
  rows = read_key_list("kaolrm.txt")
  state, fills = constant_state([r for r in rows if not r[0].startswith(NOT_PARAMETERS)])
  state.update(fake_flame_buffers(rows))
  model = kaolrm_from_state(state)
  return model, {value: key for key, value in fills.items()}


def _flat(tree):
  return dict(nnx.to_flat_state(tree))


def test_weight_decay_follows_openlrm_rule_over_the_released_kaolrm(released):
  model, key_of = released
  params = _flat(nnx.state(model, nnx.Param))
  masks = [_flat(weight_decay_mask(model)), _flat(weight_decay_mask(nnx.state(model, nnx.Param)))]
  checked = {"decay": 0, "no decay": 0, "frozen": 0}
  for path, variable in params.items():
    key = key_of[float(np.asarray(variable.get_value()).flat[0])]
    trains = not key.startswith(REFERENCE_FROZEN)
    assert trains == (not is_frozen(variable)), (path, key)
    want = trains and reference_decays(key)
    for mask in masks:
      assert bool(mask[path].get_value()) == want, (path, key)
    checked["frozen" if not trains else "decay" if want else "no decay"] += 1
  # Every trained tensor of the key list was checked (packed q/k/v count once per part).
  trained_keys = {key_of[float(np.asarray(v.get_value()).flat[0])]
                  for v in params.values() if not is_frozen(v)}
  listed = {k for k, _, _ in read_key_list("kaolrm.txt")
            if not k.startswith(REFERENCE_FROZEN + NOT_PARAMETERS + ("synthesizer.",))}
  assert trained_keys == listed
  assert checked["decay"] > 0 and checked["no decay"] > 0 and checked["frozen"] > 0
  # The adaLN modulation kernels decay (a path-name rule exempting "norm" missed them).
  for layer in (0, 11):
    for norm in ("norm1", "norm2", "norm3"):
      path = ("backbone", "transformer", "layers", layer, norm, "modulation", "kernel")
      assert bool(masks[0][path].get_value()), path
      assert not bool(masks[0][path[:-1] + ("bias",)].get_value())
      assert not bool(masks[0][path[:-2] + ("norm", "scale")].get_value())
  assert bool(masks[0][("backbone", "transformer", "pos_embed")].get_value())


def test_weight_decay_mask_refuses_untagged_trees():
  with pytest.raises(ValueError, match="mark_parameters"):
    weight_decay_mask({"dense": {"kernel": jnp.ones((2, 2))}})


def _one_step(cfg):
  """(parameters before, after one stage-II step) as {path: array}, and the split."""
  model = KaoLRM(cfg, make_synthetic_flame(), nnx.Rngs(0))
  before = {p: np.asarray(v.get_value()) for p, v in _flat(nnx.state(model, nnx.Param)).items()}
  tx = make_optimizer(1e-3, 1, 10)
  graphdef, state = create_state(model, tx)
  step = jax.jit(make_train_step(graphdef, tx, losses.stage_weights(2, overrides={"lpips": 0}),
                                 0.75))
  batch = jax.tree.map(jnp.asarray, random_batch(2, 2, 56, 32, seed=4))
  state, _ = step(state, batch, jax.random.key(0))
  after = {p: np.asarray(v.get_value())
           for p, v in _flat(nnx.merge_state(state.params, state.rest)).items()
           if isinstance(v, nnx.Param)}
  trained = {p for p, _ in nnx.to_flat_state(state.params)}
  return before, after, trained


def _changed(before, after, part):
  paths = [p for p in before if p[:2] == ("backbone", part)]
  assert paths
  return [p for p in paths if not np.array_equal(before[p], after[p])], paths


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_parts_get_no_update_and_unfrozen_ones_train(frozen):
  cfg = kaolrm_config("tiny", num_samples=128)
  cfg = dataclasses.replace(cfg, lrm=dataclasses.replace(
      cfg.lrm, freeze_encoder=frozen, freeze_upsampler=frozen))
  before, after, trained = _one_step(cfg)
  for part in ("encoder", "upsampler"):
    changed, paths = _changed(before, after, part)
    if frozen:
      assert not changed, f"frozen {part} was updated: {changed}"
      assert not set(paths) & trained
    else:
      assert set(paths) <= trained
      assert changed, f"unfrozen {part} was not updated"
  changed, _ = _changed(before, after, "transformer")
  assert changed


def test_the_forward_stops_gradients_of_frozen_parts_only():
  cfg = kaolrm_config("tiny", num_samples=64)
  unfrozen = dataclasses.replace(cfg, lrm=dataclasses.replace(cfg.lrm, freeze_encoder=False))
  batch = random_batch(1, 1, 56, 16, seed=1)

  def encoder_grad_norm(cfg):
    model = KaoLRM(cfg, make_synthetic_flame(), nnx.Rngs(0))
    loss = lambda m: jnp.sum(m(batch.source, batch.source_camera, jax.random.key(0)).flame.raw)
    grads = nnx.jit(nnx.grad(loss))(model)
    return sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads.backbone.encoder))

  assert encoder_grad_norm(cfg) == 0.0
  assert encoder_grad_norm(unfrozen) > 0.0
  # The optimiser's split follows the same field.
  model = KaoLRM.abstract(unfrozen, make_synthetic_flame())
  assert any(p[:2] == ("backbone", "encoder")
             for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE)))
