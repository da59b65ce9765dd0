"""Object presence / removal reward from a YOLOS detector (the VADER paper's object-removal reward).

For each frame, the target's confidence is the largest probability any detection query gives
it, c = max_q softmax(logits_q)[target] (the softmax runs over the classes and the no-object
class). `remove` scores 1 − c, `present` scores c; the video's reward is the mean over frames.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import YolosForObjectDetection

from lifecycle.rewards.base import check_videos
from lifecycle.rewards.frames import BackboneReward, resample_frames, resolve_label
from lifecycle.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize


class ObjectReward(BackboneReward):
    """Rewards the absence (`mode="remove"`) or presence (`mode="present"`) of one COCO-style class.

    Args:
        target: class name (a key of the detector's `config.label2id`, e.g. "dog") or class id.
        mode: "remove" (reward 1 − confidence) or "present" (reward = confidence).
        model: hub id or folder of a `YolosForObjectDetection` checkpoint.
        size: frames are resized so their shorter side is `size` ...
        max_size: ... and their longer side at most `max_size`, keeping the aspect ratio.
        num_frames: score this many frames spread over the clip (None: every frame).
        dtype: the detector's dtype ("float32", "bfloat16", ...); None keeps the checkpoint's.

    The prompt is not used: the target class comes from the config.
    """

    def __init__(
        self,
        target: str | int,
        mode: Literal["remove", "present"] = "remove",
        model: str = "hustvl/yolos-small",
        size: int = 512,
        max_size: int = 1333,
        num_frames: int | None = None,
        dtype: str | None = None,
    ):
        super().__init__(YolosForObjectDetection, model, dtype)
        if mode not in ("remove", "present"):
            raise ValueError(f"mode must be 'remove' or 'present', got {mode!r}")
        self.target = resolve_label(self.model.config, target)
        self.mode = mode
        self.size, self.max_size, self.num_frames = size, max_size, num_frames

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> YOLOS pixel values.

        YolosImageProcessor's geometry in torch (it works on PIL/numpy, which would cut the
        gradient): bilinear resize to shorter side `size`, longer side ≤ `max_size`, both sides
        floored to a multiple of the patch size; then ImageNet normalisation.
        """
        h, w = frames.shape[-2:]
        scale = min(self.size / min(h, w), self.max_size / max(h, w))
        p = self.model.config.patch_size
        new = (max(p, int(h * scale) // p * p), max(p, int(w * scale) // p * p))
        if new != (h, w):
            frames = F.interpolate(frames, size=new, mode="bilinear", antialias=True, align_corners=False)
        return normalize(frames, IMAGENET_MEAN, IMAGENET_STD)

    def confidence(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F') per-frame confidence that the target class is in the frame."""
        self.follow(videos)
        if self.num_frames is not None:
            videos = resample_frames(videos, self.num_frames)
        b, f = videos.shape[:2]
        pixels = self.preprocess(videos.flatten(0, 1)).to(self.model.dtype)
        logits = self.model(pixel_values=pixels).logits  # (B·F, queries, classes + no-object)
        conf = logits.float().softmax(-1)[..., self.target].amax(-1)
        return conf.view(b, f)

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        conf = self.confidence(check_videos(videos, prompts))
        score = 1 - conf if self.mode == "remove" else conf
        return score.mean(1)
