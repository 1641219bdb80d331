"""Differentiable renderers: 2D Gaussian surfels, 3D Gaussians, triangle meshes."""

from kaojax.render.gaussian3d import rasterize_gaussians
from kaojax.render.gaussians import Gaussians
from kaojax.render.mesh import (interpolate_face_attributes, interpolate_vertex_attributes,
                                rasterize_mesh, render_texture, sample_texture)
from kaojax.render.surfel import rasterize_surfels
