"""kaojax: JAX/Flax reimplementation of KaoLRM and FaceLift (single-image 3D faces)."""

__version__ = "0.1.0"
