"""KaoLRM's training losses: photometric, perceptual, landmarks, regularisers, binding."""

from kaojax.losses.binding import depth_binding, normal_binding
from kaojax.losses.landmarks import landmark_loss
from kaojax.losses.perceptual import LPIPS, lpips_loss
from kaojax.losses.photometric import dssim, mask_l1, masked_pixel_mse, ssim
from kaojax.losses.regularizers import squared_norm
from kaojax.losses.weights import STAGE_WEIGHTS, stage_weights, weighted_total
