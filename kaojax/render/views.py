"""Batch axes of renderer calls: broadcasting Gaussians/vertices against cameras,
flattening to a list of views and vmapping a single-view renderer over it."""

import functools

import jax
import jax.numpy as jnp


def broadcast_views(gauss_batch, cam_batch):
  """Output batch shape of a renderer call. Batch axes are aligned from the LEFT
  (gsplat layout: Gaussians [..., N, *] with cameras [..., C, 4, 4]) and the
  shorter one is padded with 1s on the right, then numpy-broadcast."""
  n = max(len(gauss_batch), len(cam_batch))
  g = tuple(gauss_batch) + (1,) * (n - len(gauss_batch))
  c = tuple(cam_batch) + (1,) * (n - len(cam_batch))
  try:
    return jnp.broadcast_shapes(g, c)
  except ValueError as e:
    raise ValueError(
        f"kaojax/render: Gaussian/vertex batch shape {tuple(gauss_batch)} and camera batch "
        f"shape {tuple(cam_batch)} do not broadcast (axes are aligned from the left, "
        f"cameras may add trailing view axes)") from e


def expand_left_aligned(x, batch, trailing: int):
  """Broadcast x [b..., *trailing dims] to batch + trailing dims with
  left-aligned batch axes."""
  b = x.ndim - trailing
  shape = x.shape[:b] + (1,) * (len(batch) - b) + x.shape[b:]
  return jnp.broadcast_to(x.reshape(shape), tuple(batch) + x.shape[b:])


def render_gaussian_views(view_fn, gaussians, viewmats, Ks, background, **kwargs):
  """Broadcast the batch axes, flatten them and vmap `view_fn` over views."""
  means = jnp.asarray(gaussians.means)
  dtype = means.dtype if jnp.issubdtype(means.dtype, jnp.floating) else jnp.float32
  if means.ndim < 2 or means.shape[-1] != 3:
    raise ValueError(f"kaojax/render: gaussians.means must be [..., N, 3], got {means.shape}")
  viewmats = jnp.asarray(viewmats, dtype)
  Ks = jnp.asarray(Ks, dtype)
  if viewmats.shape[-2:] != (4, 4):
    raise ValueError(f"kaojax/render: viewmats must be [..., 4, 4], got {viewmats.shape}")
  if Ks.shape[-2:] != (3, 3):
    raise ValueError(f"kaojax/render: Ks must be [..., 3, 3], got {Ks.shape}")
  cam_batch = jnp.broadcast_shapes(viewmats.shape[:-2], Ks.shape[:-2])
  batch = broadcast_views(means.shape[:-2], cam_batch)
  n = means.shape[-2]
  fields = dict(means=(gaussians.means, 3), quats=(gaussians.quats, 4),
                scales=(gaussians.scales, 3), colors=(gaussians.colors, 3))
  flat = {}
  for name, (arr, last) in fields.items():
    arr = jnp.asarray(arr, dtype)
    if arr.shape[-2:] != (n, last):
      raise ValueError(f"kaojax/render: gaussians.{name} must be [..., {n}, {last}], got {arr.shape}")
    flat[name] = expand_left_aligned(arr, batch, 2).reshape((-1, n, last))
  opac = jnp.asarray(gaussians.opacities, dtype)
  if opac.shape[-1:] != (n,):
    raise ValueError(f"kaojax/render: gaussians.opacities must be [..., {n}], got {opac.shape}")
  flat["opacities"] = expand_left_aligned(opac, batch, 1).reshape((-1, n))
  vm = expand_left_aligned(viewmats, batch, 2).reshape((-1, 4, 4))
  K = expand_left_aligned(Ks, batch, 2).reshape((-1, 3, 3))
  if background is None:
    background = jnp.zeros((3,), dtype)
  bg = jnp.broadcast_to(jnp.asarray(background, dtype), tuple(batch) + (3,)).reshape((-1, 3))
  fn = functools.partial(view_fn, **kwargs)
  out = jax.vmap(fn)(flat["means"], flat["quats"], flat["scales"], flat["opacities"],
                     flat["colors"], vm, K, bg)
  return jax.tree_util.tree_map(lambda a: a.reshape(tuple(batch) + a.shape[1:]), out)
