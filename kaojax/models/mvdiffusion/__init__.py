"""FaceLift multi-view diffusion: UNet with sparse multi-view attention, VAE, CLIP
image encoder, schedulers and the training objective."""

from kaojax.models.mvdiffusion.clip import CLIPVisionConfig, CLIPVisionEncoder, clip_vision_config
from kaojax.models.mvdiffusion.scheduler import DDIM, SchedulerConfig
from kaojax.models.mvdiffusion.unet import UNet, UNetConfig, unet_config
from kaojax.models.mvdiffusion.vae import VAE, VAEConfig, vae_config
