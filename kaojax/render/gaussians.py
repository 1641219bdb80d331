"""The Gaussian set shared by the surfel (2DGS) and 3D Gaussian renderers."""

import flax.struct
import jax


@flax.struct.dataclass
class Gaussians:
  """A set of Gaussians, a pytree (jit/vmap/grad friendly).

  means:     [..., N, 3] world positions
  quats:     [..., N, 4] rotations (w, x, y, z); need not be normalised
  scales:    [..., N, 3] standard deviations along the local axes (2DGS uses the
             first two; the third is ignored)
  opacities: [..., N]    in [0, 1]
  colors:    [..., N, 3] RGB (SH degree 0 already evaluated)
  """
  means: jax.Array
  quats: jax.Array
  scales: jax.Array
  opacities: jax.Array
  colors: jax.Array

  @property
  def num(self) -> int:
    return self.means.shape[-2]
