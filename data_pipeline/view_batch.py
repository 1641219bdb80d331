"""The FaceLift training batch: posed views of B subjects, one dataclass pytree."""

from typing import Optional, Sequence

import flax.struct
import jax
import numpy as np

from kaojax import geometry


@flax.struct.dataclass
class ViewBatch:
  """B subjects of V views at S x S pixels (FaceLift's world and OpenCV cameras).

  images       [B, V, S, S, 3]  views composited on `background`, in [0, 1]
  c2w          [B, V, 4, 4]     camera-to-world
  Ks           [B, V, 3, 3]     pixel intrinsics at S x S
  background   [B, 3]
  num_skipped  [B]              unreadable subjects replaced to build each sample
  """
  images: jax.Array
  c2w: jax.Array
  Ks: jax.Array
  background: jax.Array
  num_skipped: Optional[jax.Array] = None

  @property
  def num_views(self) -> int:
    return self.images.shape[1]

  def views(self, start: int, stop: int) -> "ViewBatch":
    """The views [start, stop) of every subject."""
    take = lambda a: a[:, start:stop]
    return self.replace(images=take(self.images), c2w=take(self.c2w), Ks=take(self.Ks))


def make_view_batch(samples: Sequence[dict]) -> ViewBatch:
  """Per-sample dicts (ViewBatch's fields without the batch axis) -> a ViewBatch of
  numpy arrays stacked along a new leading axis."""
  if not samples:
    raise ValueError("make_view_batch: no samples")
  return ViewBatch(**{name: np.stack([np.asarray(s[name]) for s in samples])
                      for name in samples[0]})


def random_view_batch(batch_size: int, num_views: int, size: int, seed: int = 0) -> ViewBatch:
  """Random images seen by cameras on FaceLift's orbit (radius 2.7, 50 degrees field
  of view, random azimuth and elevation): the pipeline's shapes, for tests and
  benchmarks."""
  rng = np.random.default_rng(seed)
  c2w = np.asarray(geometry.orbit_cameras(rng.uniform(0, 360, (batch_size, num_views)),
                                          rng.uniform(-20, 40, (batch_size, num_views)),
                                          2.7), np.float32)
  K = np.asarray(geometry.intrinsics_from_fov(50.0, size, size), np.float32)
  return ViewBatch(
      images=rng.uniform(size=(batch_size, num_views, size, size, 3)).astype(np.float32),
      c2w=c2w, Ks=np.broadcast_to(K, (batch_size, num_views, 3, 3)).copy(),
      background=np.ones((batch_size, 3), np.float32))
