"""Linear blend skinning as in FLAME/SMPL (`lbs` of FLAME_PyTorch and DECA)."""

import jax.numpy as jnp

from kaojax.geometry.cameras import pose_from_rt
from kaojax.geometry.rotations import axis_angle_to_matrix


def blend_shapes(coeffs, dirs):
  """coeffs [B, K], dirs [V, 3, K] -> offsets [B, V, 3]."""
  return jnp.einsum("bk,vck->bvc", coeffs, dirs)


def rigid_chain(rotations, joints, parents):
  """Forward kinematics.

  rotations [B, J, 3, 3] local joint rotations; joints [B, J, 3] rest positions;
  parents: tuple of J ints (parents[0] = -1).
  Returns (posed joints [B, J, 3], skinning transforms [B, J, 4, 4]) where each
  transform maps a rest-pose point to its posed position for that joint.
  """
  parent_idx = jnp.asarray(parents[1:])
  rel = jnp.concatenate([joints[:, :1], joints[:, 1:] - joints[:, parent_idx]], 1)
  local = pose_from_rt(rotations, rel)  # [B, J, 4, 4]
  chain = [local[:, 0]]
  for i in range(1, len(parents)):
    chain.append(chain[parents[i]] @ local[:, i])
  world = jnp.stack(chain, 1)
  posed_joints = world[..., :3, 3]
  rest_offset = jnp.einsum("bjik,bjk->bji", world[..., :3, :3], joints)
  skin = world.at[..., :3, 3].set(posed_joints - rest_offset)
  return posed_joints, skin


def lbs(betas, full_pose, v_template, blenddirs, posedirs, j_regressor, weights, parents):
  """FLAME linear blend skinning.

  betas [B, K] (shape then expression coefficients), full_pose [B, J, 3] axis-angle,
  v_template [V, 3], blenddirs [V, 3, K], posedirs [V, 3, 9 (J - 1)],
  j_regressor [J, V], weights [V, J], parents: tuple of J ints.
  Returns (vertices [B, V, 3], posed joints [B, J, 3]).
  """
  batch = betas.shape[0]
  v_shaped = v_template + blend_shapes(betas, blenddirs)
  joints = jnp.einsum("jv,bvc->bjc", j_regressor, v_shaped)
  rotations = axis_angle_to_matrix(full_pose)  # [B, J, 3, 3]
  eye = jnp.eye(3, dtype=rotations.dtype)
  pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
  v_posed = v_shaped + blend_shapes(pose_feature, posedirs)
  posed_joints, skin = rigid_chain(rotations, joints, parents)
  per_vertex = jnp.einsum("vj,bjmn->bvmn", weights, skin)
  vertices = jnp.einsum("bvij,bvj->bvi", per_vertex[..., :3, :3], v_posed) + per_vertex[..., :3, 3]
  return vertices, posed_joints
