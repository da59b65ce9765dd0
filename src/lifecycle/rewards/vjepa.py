"""Self-supervised temporal-consistency reward: V-JEPA 2's masked prediction loss, negated.

Following the VADER paper ("the reward is the negative of the masked autoencoding loss in the
V-JEPA feature space"): hide some tokens of the clip, encode the visible (context) tokens,
let V-JEPA's predictor predict the features of the hidden ones, and compare with the features
the encoder gives the full clip, layer-normalised as in V-JEPA's training loss:

    reward = − mean_{hidden tokens i, channels} | predictor(context)_i − LN(encoder(clip))_i |

A clip whose hidden parts follow from the visible ones (coherent motion, stable objects) is
predictable and scores higher. Gradients reach the pixels through both the prediction and the
targets (V-JEPA's training stops the target gradient, but here the clip itself is optimised).
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import VJEPA2Model

from lifecycle.rewards.base import check_videos
from lifecycle.rewards.frames import BackboneReward, resample_frames
from lifecycle.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, center_crop, normalize, resize_shorter


class VJEPAReward(BackboneReward):
    """reward = −L1(predicted, layer-normed target features) over the masked tokens; ≤ 0, higher is better.

    Args:
        model: hub id or folder of a `VJEPA2Model` checkpoint (encoder + predictor).
        num_frames: frames fed to the model, a multiple of the tubelet size; the clip is
            resampled uniformly (None: the clip's frame count rounded up to that multiple).
        mask: which tokens are hidden and predicted. "block": V-JEPA's multi-block mask
            (`num_blocks` random rectangles of `block_scale` of the frame area, each through
            all frames); "tail": the tokens of the last `tail_fraction` of the tubelet steps,
            predicted from the earlier ones.
        seed: seed of the block draw; the mask is the same on every call, so the reward is
            deterministic.
        dtype: the model's dtype ("float32", "bfloat16", ...); None keeps the checkpoint's.

    Frames are resized (shorter side crop_size·256/224), centre-cropped to the model's
    `crop_size` and normalised with ImageNet mean/std: VJEPA2VideoProcessor's steps, in torch
    (`preprocess`, bicubic where the processor resizes bilinearly).
    The prompt is ignored.
    """

    def __init__(
        self,
        model: str = "facebook/vjepa2-vitl-fpc64-256",
        num_frames: int | None = None,
        mask: Literal["block", "tail"] = "block",
        num_blocks: int = 8,
        block_scale: float = 0.15,
        tail_fraction: float = 0.5,
        seed: int = 0,
        dtype: str | None = None,
    ):
        super().__init__(VJEPA2Model, model, dtype)
        if mask not in ("block", "tail"):
            raise ValueError(f"mask must be 'block' or 'tail', got {mask!r}")
        tubelet = self.model.config.tubelet_size
        if num_frames is not None and (num_frames < tubelet or num_frames % tubelet):
            raise ValueError(f"num_frames must be a positive multiple of the tubelet size {tubelet}, got {num_frames}")
        self.num_frames, self.mask = num_frames, mask
        self.num_blocks, self.block_scale, self.tail_fraction, self.seed = num_blocks, block_scale, tail_fraction, seed

    def pixels(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> V-JEPA pixel values (B, F', 3, crop, crop)."""
        cfg = self.model.config
        tubelet = cfg.tubelet_size
        videos = resample_frames(videos, self.num_frames or math.ceil(videos.shape[1] / tubelet) * tubelet)
        b, f = videos.shape[:2]
        frames = resize_shorter(videos.flatten(0, 1), int(cfg.crop_size * 256 / 224))
        frames = normalize(center_crop(frames, cfg.crop_size), IMAGENET_MEAN, IMAGENET_STD)
        return frames.view(b, f, *frames.shape[1:]).to(self.model.dtype)

    def _block_mask(self, grid: int) -> torch.Tensor:
        """(grid, grid) bool, True where hidden: the union of `num_blocks` rectangles (aspect ratio in
        [0.75, 1.5], area `block_scale` of the frame), drawn as V-JEPA's multi-block mask collator
        does; transformers ships the model but not the collator."""
        gen = torch.Generator().manual_seed(self.seed)
        area = max(1.0, self.block_scale * grid * grid)
        hidden = torch.zeros(grid, grid, dtype=torch.bool)
        for _ in range(self.num_blocks):
            aspect = 0.75 + 0.75 * torch.rand((), generator=gen).item()
            h = min(grid, max(1, round(math.sqrt(area * aspect))))
            w = min(grid, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(grid - h + 1, (), generator=gen))
            left = int(torch.randint(grid - w + 1, (), generator=gen))
            hidden[top : top + h, left : left + w] = True
        return hidden

    def token_masks(self, steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (context, target) of a clip with `steps` tubelet steps (tokens are ordered step, row, column)."""
        grid = self.model.config.crop_size // self.model.config.patch_size
        if self.mask == "tail":
            if steps < 2:
                raise ValueError(f"the tail mask needs at least 2 tubelet steps, got {steps}")
            hidden = torch.zeros(steps, grid, grid, dtype=torch.bool)
            hidden[steps - min(steps - 1, max(1, round(steps * self.tail_fraction))) :] = True
        else:
            hidden = self._block_mask(grid).expand(steps, grid, grid)
            if hidden.all():
                raise ValueError("the block mask hides every token: lower num_blocks or block_scale")
        ids = torch.arange(hidden.numel(), device=device)
        hidden = hidden.flatten().to(device)
        return ids[~hidden], ids[hidden]

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (B, F', 3, crop, crop) from `pixels` -> (predicted, target) features of the
        hidden tokens, each (B, M, D) in float32; the targets layer-normed."""
        b = x.shape[0]
        context, target = self.token_masks(x.shape[1] // self.model.config.tubelet_size, x.device)
        full = self.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        targets = F.layer_norm(full[:, target].float(), full.shape[-1:])

        # Context encoding: V-JEPA encodes only the visible tokens (RoPE positions from their ids),
        # so nothing of the hidden part leaks into the context. VJEPA2Model.forward encodes the
        # whole clip before selecting the context, hence the encoder's own layers run here.
        encoder, positions = self.model.encoder, context.expand(b, -1)
        h = encoder.embeddings(x)[:, context]
        for layer in encoder.layer:
            h = layer(h, positions)[0]
        h = encoder.layernorm(h)
        # The predictor gathers the context rows from a full-length sequence itself; other rows are unread.
        sequence = h.new_zeros(full.shape).index_copy(1, context, h)
        pred = self.model.predictor(sequence, context_mask=[positions], target_mask=[target.expand(b, -1)])
        return pred.last_hidden_state.float(), targets

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pred, targets = self.predict(self.pixels(self.follow(check_videos(videos, prompts))))
        return -(pred - targets).abs().mean(dim=(1, 2))
