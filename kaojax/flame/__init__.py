"""The FLAME layer: safe loaders, LBS, landmarks, masks, a synthetic stand-in model."""

from kaojax.flame.assets import FlameAssetError
from kaojax.flame.io import (
    facial_region_face_mask, load_flame, load_flame_from_kaolrm_state, read_flame_arrays,
    read_landmark_embedding, read_masks, save_flame_npz)
from kaojax.flame.model import FLAME_PARENTS, FlameModel, FlameOutput, build_flame_model
