"""FaceLift multi-view diffusion: UNet with sparse multi-view attention, VAE, schedulers."""
