"""Logical axis names for parameters and the rules that map them onto the device mesh.

Every model in kaojax names the dimensions of its parameters with the logical names
below (through the layer constructors of `kaojax.nn.layers`); `RULES` maps them onto
the training device mesh, whose axes are ("data", "fsdp"): the batch is split over
both, and the parameters (with their optimiser state) are split along the model
width over "fsdp" (ZeRO-3 style), gathered by XLA where used. Change the rules here,
nowhere else.

Names:
  embed   - the model width (residual stream)
  mlp     - the hidden width of feed-forward layers
  heads   - the projected attention width (num_heads * head_dim)
  cond    - conditioning widths (camera embedding, image-token width, time embedding)
  None    - replicated (small vectors, position tables, patch kernels)
"""

from typing import Sequence

import jax
from flax import nnx

EMBED = "embed"
MLP_HIDDEN = "mlp"
HEADS = "heads"
COND = "cond"

BATCH_AXES = ("data", "fsdp")
RULES = (
    (EMBED, "fsdp"),
    (MLP_HIDDEN, None),
    (HEADS, None),
    (COND, None),
)


def partition_specs(state, rules: Sequence = RULES):
  """A PartitionSpec per variable of an nnx State, from its logical axis names."""
  with nnx.logical_axis_rules(tuple(rules)):
    return nnx.get_partition_spec(state)


def shard_state(state, device_mesh: jax.sharding.Mesh, rules: Sequence = RULES):
  """Place every array of an nnx State on `device_mesh` following its logical names."""
  specs = partition_specs(state, rules)
  shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(device_mesh, spec), specs)
  return jax.device_put(state, shardings)


def make_device_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp") device mesh over `devices` (default: all); data=-1 takes what
  is left after fsdp."""
  devices = jax.devices() if devices is None else devices
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} groups")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"device mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                     f"there are {len(devices)}")
  return jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(device_mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def replicated(device_mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())
