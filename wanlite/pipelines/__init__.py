"""The generation path: task specs, conditioning, the denoising loop, samplers and video output."""
