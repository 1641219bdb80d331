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


# Training mesh: axes ("data", "fsdp"). The batch is split over both axes; with
# these rules the parameters (and their optimiser state) are additionally split
# over "fsdp" along the model width (ZeRO-3 style), gathered by XLA when used.
BATCH_AXES = ("data", "fsdp")
FSDP_RULES = (
    (EMBED, "fsdp"),
    (MLP, None),
    (HEADS, None),
    (COND, None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: all); data=-1 takes what is
  left after fsdp."""
  devices = jax.devices() if devices is None else devices
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} groups")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                     f"there are {len(devices)}")
  return jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
