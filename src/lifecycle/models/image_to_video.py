"""Image-to-video (Stable Video Diffusion) side of the bundle.

Follows diffusers' StableVideoDiffusionPipeline: the conditioning image enters the UNet three
ways (CLIP image embedding as cross-attention context, its VAE latent concatenated to the noisy
latents along channels, and micro-conditioning time ids), and classifier-free guidance uses
zeros for the embedding and the latent. Unlike the pipeline, everything here is plain torch on
(B, C, H, W) tensors in [0, 1], so a reward can backpropagate through sampling.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion.sampling import sample
from .preprocess import CLIP_MEAN, CLIP_STD, normalize


@dataclass
class ImageConditioning:
    """SVD's micro-conditioning values (StableVideoDiffusionPipeline's defaults)."""

    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02


class ImageCondition(NamedTuple):
    """What `ModelBundle.denoise` takes for an image-to-video UNet, batch-first tensors."""

    embeds: torch.Tensor  # (B, 1, D) CLIP image embeddings
    latents: torch.Tensor  # (B, C, h, w) VAE latent of the (noise-augmented) image, unscaled
    time_ids: torch.Tensor  # (B, 3) fps - 1, motion_bucket_id, noise_aug_strength

    def unconditional(self) -> "ImageCondition":
        """The guidance branch: zero embedding and zero image latent, same time ids (as SVD)."""
        return ImageCondition(torch.zeros_like(self.embeds), torch.zeros_like(self.latents), self.time_ids)


def denoise_spatio_temporal(unet: UNetSpatioTemporalConditionModel, x_t: torch.Tensor, timestep: torch.Tensor,
                            embeds: torch.Tensor, latents: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """One SVD UNet call on bundle-layout latents (B, C, F, h, w); the output has the same layout."""
    x = x_t.permute(0, 2, 1, 3, 4)  # the UNet takes (B, F, C, h, w)
    image = latents.unsqueeze(1).expand(-1, x.shape[1], -1, -1, -1)
    out = unet(torch.cat([x, image], dim=2), timestep, encoder_hidden_states=embeds, added_time_ids=time_ids)
    return out.sample.permute(0, 2, 1, 3, 4)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # in float32 (cheap): CPUs have no half-precision antialiased bicubic kernel (frozen_dtype=bf16 runs there too)
    return F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False).to(images.dtype)


class ImageToVideoMixin:
    """ModelBundle methods for image-conditioned video denoisers (needs `image_encoder` and `vae`)."""

    def encode_image(self, images: torch.Tensor, generator=None) -> ImageCondition:
        """Conditioning images (B, C, H, W) in [0, 1] -> ImageCondition; differentiable in `images`.

        `generator` (one, or one per image) draws the noise augmentation of the VAE input.
        """
        enc, cfg = self.image_encoder, self.conditioning
        # SVD squashes the whole frame to the encoder's square input (no centre crop).
        size = enc.config.image_size
        pixels = normalize(_resize(images, (size, size)), CLIP_MEAN, CLIP_STD)
        embeds = enc(pixel_values=pixels.to(enc.dtype)).image_embeds.unsqueeze(1)
        x = images * 2 - 1
        x = x + cfg.noise_aug_strength * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode().to(embeds.dtype)
        # SVD was micro-conditioned on fps - 1, which is what its pipeline passes.
        ids = torch.tensor([cfg.fps - 1, cfg.motion_bucket_id, cfg.noise_aug_strength], dtype=embeds.dtype,
                           device=embeds.device)
        return ImageCondition(embeds, latents, ids.expand(len(images), -1))

    def sample_clip(self, images: torch.Tensor, noise: torch.Tensor, num_steps: int = 25, guidance_scale: float = 3.0,
                    generator=None, **sample_kwargs) -> torch.Tensor:
        """One clip from conditioning images (B, C, H, W) and noise (B, C, F, h, w) -> (B, F, C, H, W) in [0, 1].

        Plain torch end to end: with gradients enabled the video is differentiable in the
        denoiser's parameters (and in `images`). `generator` goes to `encode_image`;
        `sample_kwargs` go to `diffusion.sampling.sample`.
        """
        cond = self.encode_image(images, generator)
        latents = sample(self.denoise, self.inference_scheduler(), noise, cond, cond.unconditional(), guidance_scale,
                         num_steps, **sample_kwargs)
        return self.decode_latents(latents)

    def generate_from_images(self, images: torch.Tensor, frames: int, resolution: int | tuple[int, int] | None = None,
                             num_steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
                             **sample_kwargs) -> torch.Tensor:
        """Image-to-video sampling -> (B, F, C, H, W) in [0, 1].

        `resolution` (square int or (H, W)) resizes the images first; None keeps their size.
        Image i draws its latent noise, then its augmentation noise, from seed `seed + i`.
        """
        if resolution is not None:
            images = _resize(images, (resolution, resolution) if isinstance(resolution, int) else resolution)
        device = next(self.denoiser.parameters()).device
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
        shape = self.latent_shape(frames, tuple(images.shape[-2:]))
        noise = randn_tensor((len(images), *shape), generator=generators, device=device)
        return self.sample_clip(images.to(device), noise, num_steps, guidance_scale, generators, **sample_kwargs)

    def generate_long(self, images: torch.Tensor, clips: int, frames: int,
                      resolution: int | tuple[int, int] | None = None, num_steps: int = 25,
                      guidance_scale: float = 3.0, seed: int = 0, **sample_kwargs) -> torch.Tensor:
        """Autoregressive long-horizon video -> (B, clips·F, C, H, W) in [0, 1].

        Clip k+1 is `generate_from_images` of clip k's last frame with seed `seed + (k+1)·B`;
        the first clip is conditioned on `images`.
        """
        out = []
        for k in range(clips):
            video = self.generate_from_images(images, frames, resolution, num_steps, guidance_scale,
                                              seed + k * len(images), **sample_kwargs)
            out.append(video)
            images = video[:, -1]
        return torch.cat(out, dim=1)
