"""Logical axis names for parameters and the rules mapping them onto a device mesh.

Every model in kaojax annotates its parameters with the logical names below (via
`param_init`), and `shard_state` / `partition_specs` turn them into shardings for a
`jax.sharding.Mesh` with axes ("data", "model"). Change the rules here, nowhere else.

Names:
  embed   - the model width (residual stream)
  mlp     - the hidden width of feed-forward layers
  heads   - the projected attention width (num_heads * head_dim)
  cond    - conditioning widths (camera embedding, image-token width)
  None    - replicated (small vectors, position tables, patch kernels)
"""

from typing import Sequence

import jax
from flax import nnx

EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
COND = "cond"

# Tensor-parallel over the "model" mesh axis on the wide dimensions; the model
# width itself stays replicated.
DEFAULT_RULES = (
    (EMBED, None),
    (MLP, "model"),
    (HEADS, "model"),
    (COND, None),
)


def param_init(initializer, *axes):
  """`initializer` annotated with one logical axis name (or None) per dimension."""
  return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)


def partition_specs(state, rules: Sequence = DEFAULT_RULES):
  """A PartitionSpec per variable of an nnx State, from its logical axis names."""
  with nnx.logical_axis_rules(tuple(rules)):
    return nnx.get_partition_spec(state)


def shard_state(state, mesh: jax.sharding.Mesh, rules: Sequence = DEFAULT_RULES):
  """Place every array of an nnx State on `mesh` following its logical names."""
  specs = partition_specs(state, rules)
  shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs)
  return jax.device_put(state, shardings)
