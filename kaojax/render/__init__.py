"""Differentiable renderers: 2D Gaussian surfels, 3D Gaussians, triangle meshes."""

from kaojax.render.gaussian3d import rasterize_gaussians
from kaojax.render.gaussians import Gaussians
from kaojax.render.surfel import rasterize_surfels
