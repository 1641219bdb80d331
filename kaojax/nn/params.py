"""Which parameters train, and which of those AdamW decays: one rule each, written
onto the parameters themselves when a model is built.

`mark_parameters(model, frozen)` tags every nnx.Param with two metadata fields:

  frozen        True under a frozen sub-module (`frozen`: attribute paths such as
                ("backbone", "encoder")). The optimiser updates only the others
                (`TRAINABLE`), so a frozen module gets no update and, since its
                parameters are not differentiated, no backward pass of its own.
  weight_decay  OpenLRM's rule (KaoLRM trains with it): the parameters of LayerNorm
                modules and the bias of every module that has one are not decayed;
                every other parameter is. Decided by module type, not by name (a module
                that keeps a torch layer's bias under another name lists it in BIASES).

A model derives both the tags and its forward pass's `call_frozen` of the same
sub-modules from one config field (e.g. `LRMConfig.frozen_parts`); the training step
splits the model with `TRAINABLE`, and `kaojax.train.optimizer.weight_decay_mask`
reads `weight_decay` off the parameters, so the forward pass, the optimiser and the
decay mask cannot disagree.
"""

from typing import Iterable

import jax
from flax import nnx


def mark_parameters(model: nnx.Module, frozen: Iterable[tuple] = ()) -> nnx.Module:
  """Tags `model`'s parameters (see module doc); returns the model."""
  frozen = [tuple(p) for p in frozen]
  no_decay = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.LayerNorm):
      no_decay.update(id(v) for _, v in nnx.iter_graph(node) if isinstance(v, nnx.Param))
    elif isinstance(node, nnx.Module):
      # A module's `bias`, or the biases it names in BIASES (a module that holds the
      # parameters of a torch layer under other names, e.g. a patch embedding's).
      for name in ("bias",) + tuple(getattr(node, "BIASES", ())):
        if isinstance(getattr(node, name, None), nnx.Param):
          no_decay.add(id(getattr(node, name)))
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      node.set_metadata(weight_decay=id(node) not in no_decay,
                        frozen=any(tuple(path[:len(p)]) == p for p in frozen))
  return model


def is_frozen(variable) -> bool:
  return bool(variable.get_metadata().get("frozen", False))


def _trainable(path, value) -> bool:
  del path
  return isinstance(value, nnx.Param) and not is_frozen(value)


# nnx filter of the parameters the optimiser updates.
TRAINABLE = _trainable


def call_frozen(module: nnx.Module, *args):
  """module(*args) with the gradients of its parameters stopped (a frozen module in
  the forward pass: gradients still flow through it to its inputs)."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.lax.stop_gradient(state))(*args)
