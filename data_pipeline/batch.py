"""The KaoLRM training batch: one dataclass pytree, built by `make_batch`.

The data pipeline (`data_pipeline.sources`), the evaluation set, the tests and the
benchmarks all build batches through `make_batch` (from per-sample dicts) or
`random_batch` (random content with the pipeline's shapes and cameras).
"""

from typing import Optional, Sequence

import flax.struct
import jax
import numpy as np

from kaojax import geometry


@flax.struct.dataclass
class Batch:
  """B samples of V views; S = source size, R = render size.

  source              [B, S, S, 3]     source view composited on white, in [0, 1]
  source_camera       [B, 16]          OpenLRM camera vector of the canonical source camera
  target_rgb          [B, V, R, R, 3]  the V views (first = source) on `background`
  target_alpha        [B, V, R, R]
  viewmats            [B, V, 4, 4]     world-to-camera (OpenCV, FLAME world), normalised
                                       so view 0 is the canonical camera
  Ks                  [B, V, 3, 3]     pixel intrinsics at R x R
  landmarks           [B, V, 68, 2]    pixels at R x R (<= 0: missing)
  background          [B, 3]
  world_to_canonical  [B, 4, 4]        (multi-view data) the rigid motion taking the
                                       dataset's world into that normalised world
  face_mask           [B, V, R, R]     (monocular data) the dataset's facial mask, where
                                       the pixel and binding losses are taken
  num_skipped         [B]              unreadable subjects replaced to build each sample
  """
  source: jax.Array
  source_camera: jax.Array
  target_rgb: jax.Array
  target_alpha: jax.Array
  viewmats: jax.Array
  Ks: jax.Array
  landmarks: jax.Array
  background: jax.Array
  world_to_canonical: Optional[jax.Array] = None
  face_mask: Optional[jax.Array] = None
  num_skipped: Optional[jax.Array] = None

  @property
  def render_size(self) -> int:
    return self.target_rgb.shape[-2]

  @property
  def num_views(self) -> int:
    return self.target_rgb.shape[1]

  def views(self, count: int) -> "Batch":
    """The same samples with only their first `count` target views."""
    return self.replace(**{name: getattr(self, name)[:, :count] for name in PER_VIEW
                           if getattr(self, name) is not None})


PER_VIEW = ("target_rgb", "target_alpha", "viewmats", "Ks", "landmarks", "face_mask")


def make_batch(samples: Sequence[dict]) -> Batch:
  """Per-sample dicts (Batch's fields without the batch axis; the optional ones may be
  absent) -> a Batch of numpy arrays stacked along a new leading axis."""
  if not samples:
    raise ValueError("make_batch: no samples")
  names = samples[0].keys()
  return Batch(**{name: np.stack([np.asarray(s[name]) for s in samples]) for name in names})


def random_batch(batch_size: int, num_views: int, source_size: int, render_size: int,
                 seed: int = 0, focal: float = 0.75) -> Batch:
  """Random images, alpha and landmarks seen by cameras on an orbit 2 units from the
  FLAME head (the pipeline's shapes and camera conventions), for tests and benchmarks."""
  rng = np.random.default_rng(seed)
  b, v, r = batch_size, num_views, render_size
  c2w = np.asarray(geometry.orbit_cameras(rng.uniform(240, 300, (b, v)),
                                          rng.uniform(-20, 20, (b, v)), 2.0, up="y"))
  K = np.array([[focal * r, 0, r / 2], [0, focal * r, r / 2], [0, 0, 1]], np.float32)
  arrays = {
      "source": rng.uniform(size=(b, source_size, source_size, 3)).astype(np.float32),
      "source_camera": np.broadcast_to(geometry.default_openlrm_source_camera(), (b, 16)),
      "target_rgb": rng.uniform(size=(b, v, r, r, 3)).astype(np.float32),
      "target_alpha": (rng.uniform(size=(b, v, r, r)) > 0.5).astype(np.float32),
      "viewmats": np.linalg.inv(c2w).astype(np.float32),
      "Ks": np.broadcast_to(K, (b, v, 3, 3)),
      "landmarks": rng.uniform(1, r - 1, (b, v, 68, 2)).astype(np.float32),
      "background": np.ones((b, 3), np.float32),
  }
  return make_batch([{k: a[i] for k, a in arrays.items()} for i in range(b)])
