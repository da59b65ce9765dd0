"""Sample quality of generated videos: FID and KID against reference videos and CLIP score (torchmetrics), temporal
consistency and motion magnitude.

Image metrics treat every frame as an image. FID/KID and temporal consistency use one feature extractor
(`metrics.features`): a transformers vision model by hub id or folder (CLIP: its image embedding; DINOv2, ViT and
the like: the pooled output), or frame thumbnails on the embedded default, whose synthetic world has no pretrained
image model. Videos are float (B, F, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPConfig, CLIPModel, CLIPProcessor

from ..data.shards import decode_sample, list_shards, resize_clip
from ..data.synthetic import render_clip, sample_metadata
from ..models.preprocess import CLIP_MEAN, CLIP_STD, prepare

log = logging.getLogger(__name__)
KID_SEED = 0  # KID draws its subsets with torch's global generator: fixed, so a score is reproducible


def frames_of(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) -> (B·F, C, H, W)."""
    return videos.flatten(0, 1)


def temporal_consistency(features: torch.Tensor) -> torch.Tensor:
    """Per video, the mean cosine similarity of consecutive frames' features: (B, F, D) -> (B,); 1 for one frame."""
    if features.shape[1] < 2:
        return features.new_ones(features.shape[0])
    return F.cosine_similarity(features[:, 1:], features[:, :-1], dim=-1).mean(1)


def motion_magnitude(videos: torch.Tensor) -> torch.Tensor:
    """Per video, the mean absolute luma change between consecutive frames, in [0, 1] (the data engine's
    motion score, `curation.annotate.frame_difference`): (B, F, 3, H, W) -> (B,); 0 for one frame."""
    if videos.shape[1] < 2:
        return videos.new_zeros(videos.shape[0])
    luma = (videos * torch.tensor([0.299, 0.587, 0.114], dtype=videos.dtype, device=videos.device).view(3, 1, 1)).sum(2)
    return (luma[:, 1:] - luma[:, :-1]).abs().flatten(1).mean(1)


class Thumbnails(nn.Module):
    """Frames area-resized to `size` x `size` and centred on their mean: (N, 3, H, W) in [0, 1] -> (N, 3·size²).

    The embedded default's features; centring makes the cosine similarity of two frames their correlation."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size, self.num_features = size, 3 * size * size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="area").flatten(1)
        return x - x.mean(1, keepdim=True)


class PretrainedFeatures(nn.Module):
    """A transformers vision model's embedding of each image: (N, 3, H, W) in [0, 1] -> (N, D).

    A CLIP checkpoint gives its projected image embedding, any other `AutoModel` its pooled output (or the mean
    of its last hidden states). Images are resized, centre-cropped and normalised as the model's image processor
    says (CLIP's constants when the folder has none)."""

    def __init__(self, model: str, trust_remote_code: bool = False):
        super().__init__()
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.clip = isinstance(config, CLIPConfig)
        self.model = (CLIPModel if self.clip else AutoModel).from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model.eval().requires_grad_(False)
        try:
            processor = AutoImageProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            self.mean, self.std = processor.image_mean, processor.image_std
        except OSError:  # no preprocessor_config.json
            self.mean, self.std = CLIP_MEAN, CLIP_STD
        vision = getattr(config, "vision_config", config)
        self.image_size = vision.image_size
        self.num_features = config.projection_dim if self.clip else vision.hidden_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = prepare(images.float(), self.image_size, self.mean, self.std).to(self.model.dtype)
        if self.clip:
            return self.model.get_image_features(pixel_values=pixels).pooler_output.float()
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state.mean(1)).flatten(1).float()


def build_features(model: str | None, thumbnail: int = 8, trust_remote_code: bool = False) -> nn.Module:
    return PretrainedFeatures(model, trust_remote_code) if model else Thumbnails(thumbnail)


class _TensorCLIP(nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics' CLIPScore expects; transformers 5 returns
    a BaseModelOutputWithPooling (torchmetrics issue #3407, open in 1.9)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def clip_score_metric(model: str) -> CLIPScore:
    """torchmetrics' CLIPScore (100 · max(cos, 0) of image and text embeddings) on a CLIP hub id or folder."""
    return CLIPScore(model_name_or_path=lambda: (_TensorCLIP(CLIPModel.from_pretrained(model)),
                                                 CLIPProcessor.from_pretrained(model)))


def reference_videos(shards: str | None, n: int, frames: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """The first `n` decodable videos of webdataset `shards` (in shard order, resized to `frames` x
    `resolution`²), or, with `shards` null, `n` clips drawn from the synthetic world (seeded). (n, F, 3, H, W)."""
    if shards is None:
        rng = np.random.default_rng(seed)
        clips = [render_clip(sample_metadata(rng), frames, resolution) for _ in range(n)]
        return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255
    import webdataset as wds

    videos, skipped = [], 0
    for sample in wds.WebDataset(list_shards(shards, "metrics.reference.shards"), shardshuffle=False, empty_check=False):
        try:
            video, _, _ = decode_sample(sample)
        except ValueError as e:
            skipped += 1
            log.warning("reference set: skipped %s", e)
            continue
        videos.append(resize_clip(video, frames, resolution))
        if len(videos) == n:
            break
    if skipped:
        log.warning("reference set: %d corrupt sample(s) skipped", skipped)
    if len(videos) < 2:
        raise ValueError(f"metrics.reference.shards: {shards!r} holds {len(videos)} decodable video(s); FID needs 2+")
    return torch.stack(videos)


class VideoQuality:
    """Every configured metric of a batch of generated videos against one reference set.

    `features`: per-frame feature extractor (FID, KID, temporal consistency); `reference`: real videos
    (B, F, 3, H, W); `kid`: {subset_size, subsets} or None; `clip_score`: a CLIP hub id or folder, or None.
    """

    def __init__(self, features: nn.Module, reference: torch.Tensor, fid: bool = True, kid: dict | None = None,
                 clip_score: str | None = None, batch_size: int = 256):
        self.features, self.batch_size = features, batch_size
        self.fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False) if fid else None
        self.kid = (KernelInceptionDistance(feature=features, normalize=True, reset_real_features=False,
                                            subsets=kid["subsets"], subset_size=kid["subset_size"]) if kid else None)
        self.kid_subset_size = kid["subset_size"] if kid else 0
        self.clip = clip_score_metric(clip_score) if clip_score else None
        self.reference_frames, self.device = reference.shape[0] * reference.shape[1], torch.device("cpu")
        for images in self._batches(frames_of(reference.float().cpu())):
            for metric in (self.fid, self.kid):
                if metric is not None:
                    metric.update(images, real=True)

    def _follow(self, device: torch.device) -> None:
        """Move the metrics (with the reference features) and the feature extractor to where the videos are."""
        if device != self.device:
            for part in (self.fid, self.kid, self.clip, self.features):
                if part is not None:
                    part.to(device)
            self.device = device

    def _batches(self, images: torch.Tensor):
        for start in range(0, len(images), self.batch_size):
            yield images[start : start + self.batch_size]

    def _fid(self, frames: torch.Tensor) -> float:
        self.fid.reset()  # the generated side only: the reference features stay
        for images in self._batches(frames):
            self.fid.update(images, real=False)
        return self.fid.compute().item()

    def _kid(self, frames: torch.Tensor) -> tuple[float, float]:
        self.kid.reset()
        self.kid.subset_size = min(self.kid_subset_size, len(frames), self.reference_frames)
        for images in self._batches(frames):
            self.kid.update(images, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(KID_SEED)
            mean, std = self.kid.compute()
        return mean.item(), std.item()

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """{fid, kid, kid_std, clip_score, temporal_consistency, motion} of `videos` (one per prompt)."""
        videos = videos.float()
        self._follow(videos.device)
        b, f = videos.shape[:2]
        frames = frames_of(videos)
        features = torch.cat([self.features(x) for x in self._batches(frames)]).view(b, f, -1)
        row = {"temporal_consistency": temporal_consistency(features).mean().item(),
               "motion": motion_magnitude(videos).mean().item()}
        # FID's matrix square root on non-finite features (samples of diverged weights) can crash LAPACK and with
        # it the process: such a batch is reported as NaN instead.
        finite = bool(torch.isfinite(features).all() and torch.isfinite(videos).all())
        measurable = len(frames) >= 2 and finite
        if not finite:
            log.warning("sample quality: the videos or their features hold NaN/Inf (diverged weights?); FID, KID "
                        "and CLIP score reported as NaN")
        elif not measurable and (self.fid is not None or self.kid is not None):
            log.warning("FID/KID: need 2 or more generated frames, got %d; reported as NaN", len(frames))
        if self.fid is not None:
            row["fid"] = self._fid(frames) if measurable else math.nan
        if self.kid is not None:
            row["kid"], row["kid_std"] = self._kid(frames) if measurable else (math.nan, math.nan)
        if self.clip is not None and not finite:
            row["clip_score"] = math.nan
        elif self.clip is not None:
            self.clip.reset()
            pixels = (frames * 255).round().to(torch.uint8)
            texts = [p for p in prompts for _ in range(f)]
            for start in range(0, len(pixels), self.batch_size):
                self.clip.update(pixels[start : start + self.batch_size], texts[start : start + self.batch_size])
            row["clip_score"] = self.clip.compute().item()
        return row


def build_quality(cfg, frames: int, resolution: int) -> VideoQuality:
    """`VideoQuality` from the `metrics` config group, its reference videos at `frames` x `resolution`²."""
    features = build_features(cfg.features.model, cfg.features.thumbnail, cfg.features.trust_remote_code)
    reference = reference_videos(cfg.reference.shards, cfg.reference.n, frames, resolution, cfg.reference.seed)
    kid = dict(cfg.kid) if cfg.kid else None
    return VideoQuality(features, reference, fid=cfg.fid, kid=kid, clip_score=cfg.clip_score, batch_size=cfg.batch_size)
