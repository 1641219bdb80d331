"""Geometry conventions: cameras, rays, rotations, mesh sampling, alignment.

See `cameras.py` for the single statement of every camera/world convention.
"""

from kaojax.geometry.alignment import apply_similarity, umeyama
from kaojax.geometry.cameras import (
    FACELIFT_AZIMUTHS, FACELIFT_FOV_DEG, FACELIFT_RADIUS, FACELIFT_VIEWS,
    FLAME_TO_TRIPLANE, OPENCV_TO_OPENGL, SOURCE_FOCAL, camera_centers,
    default_openlrm_source_camera,
    denormalize_intrinsics, facelift_cameras, flame_pose_to_triplane,
    flame_to_triplane, focal_to_fov, fov_to_focal, from_openlrm_camera,
    intrinsics, intrinsics_from_fov, invert_pose, look_at, normalize_intrinsics,
    orbit_cameras, orbit_positions, pose_from_rt, project_points,
    to_openlrm_camera, triplane_pose_to_flame, triplane_to_flame)
from kaojax.geometry.mesh import (
    face_areas, face_normals, face_vertices, interpolate_barycentric,
    sample_surface, vertex_normals)
from kaojax.geometry.rays import facelift_ray_encoding, pixel_rays
from kaojax.geometry.rotations import (
    axis_angle_to_matrix, axis_angle_to_quat, matrix_to_axis_angle,
    matrix_to_quat, quat_multiply, quat_to_axis_angle, quat_to_matrix, skew)
