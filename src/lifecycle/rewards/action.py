"""Action reward: a VideoMAE classifier's probability that the video shows the target action."""

from collections.abc import Sequence

import torch
from transformers import VideoMAEForVideoClassification

from lifecycle.rewards.base import check_videos
from lifecycle.rewards.frames import BackboneReward, resample_frames, resolve_label
from lifecycle.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare


class ActionReward(BackboneReward):
    """reward = softmax(VideoMAE logits)[target], in [0, 1].

    Args:
        target: action name (a key of the classifier's `config.label2id`, e.g. Kinetics-400's
            "playing guitar") or class id.
        model: hub id or folder of a `VideoMAEForVideoClassification` checkpoint.
        dtype: the classifier's dtype ("float32", "bfloat16", ...); None keeps the checkpoint's.

    The clip is resampled to the model's `config.num_frames` (frames spread uniformly, repeated
    when the clip is shorter), resized (shorter side) and centre-cropped to `config.image_size`
    and normalised with ImageNet mean/std: the Kinetics checkpoints' processor steps, in torch
    (`preprocess.prepare`, bicubic where the processor resizes bilinearly).
    The prompt is ignored: the target action comes from the config.
    """

    def __init__(
        self, target: str | int, model: str = "MCG-NJU/videomae-base-finetuned-kinetics", dtype: str | None = None
    ):
        super().__init__(VideoMAEForVideoClassification, model, dtype)
        self.target = resolve_label(self.model.config, target)

    def preprocess(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> VideoMAE pixel values (B, num_frames, 3, S, S)."""
        cfg = self.model.config
        videos = resample_frames(videos, cfg.num_frames)
        b, f = videos.shape[:2]
        frames = prepare(videos.flatten(0, 1), cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return frames.view(b, f, *frames.shape[1:]).to(self.model.dtype)

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        videos = self.follow(check_videos(videos, prompts))
        logits = self.model(pixel_values=self.preprocess(videos)).logits
        return logits.float().softmax(-1)[:, self.target]
