"""Learned rewards: a network trained on preference pairs (`stage=reward_model`), used like any Reward.

Both architectures end in one head over video features v and prompt features t,
score = MLP([v', t', v' ⊙ t']) with v', t' linear projections of v, t:

- `conv` (the embedded default, no download): strided convolutions over each frame, with x/y
  coordinate channels so that the spatially pooled features know where things are; v is the
  mean over frames of the pooled features and their mean frame-to-frame change (appearance and
  motion); t is the mean of hashed word embeddings of the prompt.
- `clip`: a frozen transformers CLIP backbone (hub id or folder), optionally with LoRA (peft) on
  its attention projections; v is the unit image embedding averaged over frames, t the unit
  text embedding.

Either is differentiable w.r.t. the pixels, so reward-gradient alignment (VADER) can ascend it.
An export is a folder with `config.json` ({"architecture", "kwargs"}) and `model.safetensors`
holding the weights training changes (all of `conv`; the head and LoRA of `clip`, whose
backbone is referenced by its id).
"""

import json
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from ..models.lora import add_lora
from .base import Reward, check_videos
from ..models.preprocess import prepare

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LINEAGE_FILE = "lineage.json"
CLIP_LORA_TARGETS = ("q_proj", "v_proj")


class FusionHead(nn.Module):
    """MLP([A v, B t, A v ⊙ B t]) -> (B,) score."""

    def __init__(self, video_dim: int, text_dim: int, hidden: int):
        super().__init__()
        self.video = nn.Linear(video_dim, hidden)
        self.text = nn.Linear(text_dim, hidden)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v, t = self.video(v), self.text(t)
        return self.mlp(torch.cat([v, t, v * t], dim=-1)).squeeze(-1)


def hashed_words(prompts: Sequence[str], buckets: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-cased alphanumeric words -> (bucket ids, bag offsets) for nn.EmbeddingBag; crc32 keeps it stable."""
    ids, offsets = [], []
    for prompt in prompts:
        offsets.append(len(ids))
        ids.extend(zlib.crc32(word.encode()) % buckets for word in re.findall(r"[a-z0-9]+", prompt.lower()))
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(offsets, dtype=torch.long, device=device)


class ConvScorer(nn.Module):
    """Small convolutional video scorer with a hashed bag-of-words prompt embedding (see module docstring)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), text_buckets: int = 4096, text_dim: int = 32,
                 hidden: int = 64):
        super().__init__()
        layers, width = [], 3 + 2  # RGB + x/y coordinates
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.SiLU()]
            width = c
        self.convs = nn.Sequential(*layers)
        self.text_buckets = text_buckets
        self.words = nn.EmbeddingBag(text_buckets, text_dim, mode="mean")
        self.head = FusionHead(2 * width, text_dim, hidden)

    def features(self, videos: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b, f, _, h, w = videos.shape
        x = videos.flatten(0, 1) * 2 - 1
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
                                torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
        coords = torch.stack([xs, ys]).expand(x.shape[0], 2, h, w)
        pooled = self.convs(torch.cat([x, coords], dim=1)).mean(dim=(-2, -1)).view(b, f, -1)
        change = (pooled[:, 1:] - pooled[:, :-1]).mean(dim=1) if f > 1 else torch.zeros_like(pooled[:, 0])
        ids, offsets = hashed_words(prompts, self.text_buckets, x.device)
        return torch.cat([pooled.mean(dim=1), change], dim=-1), self.words(ids, offsets)

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(*self.features(videos, prompts))


class ClipScorer(nn.Module):
    """Trainable head (and optional LoRA) on a frozen CLIP backbone (see module docstring).

    lora: {rank, alpha, target_modules (null: q_proj, v_proj), dropout} for peft LoRA on both
    CLIP towers; None trains the head only.
    """

    def __init__(self, backbone: str, tokenizer: str | None = None, hidden: int = 256, lora: dict | None = None):
        super().__init__()
        self.backbone = CLIPModel.from_pretrained(backbone).requires_grad_(False)
        if lora:
            add_lora(self.backbone, rank=lora["rank"], alpha=lora.get("alpha"), dropout=lora.get("dropout", 0.0),
                     target_modules=lora.get("target_modules") or CLIP_LORA_TARGETS)
        # never a repository's own code: an export's config.json is data, not a place to opt in
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or backbone, trust_remote_code=False)
        config = self.backbone.config
        self.image_size = config.vision_config.image_size
        # A tokenizer without a saved model_max_length reports a huge one: cap at the position table.
        self.max_length = min(self.tokenizer.model_max_length, config.text_config.max_position_embeddings)
        self.head = FusionHead(config.projection_dim, config.projection_dim, hidden)

    def features(self, videos: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b, f = videos.shape[:2]
        pixels = prepare(videos.flatten(0, 1), self.image_size)
        image = F.normalize(self.backbone.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(videos.device)
        text = self.backbone.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return image.view(b, f, -1).mean(dim=1), F.normalize(text.pooler_output, dim=-1)

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(*self.features(videos, prompts))


ARCHITECTURES = {"conv": ConvScorer, "clip": ClipScorer}


class LearnedReward(Reward):
    """A reward network of one of the ARCHITECTURES; `kwargs` are its constructor's.

    Trainable as built; `freeze()` (what `from_pretrained` does by default) makes it a fixed
    reward that stays in eval mode even inside a module switched to training.
    """

    differentiable = True

    def __init__(self, architecture: str = "conv", scale: dict | None = None, **kwargs):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: {architecture!r} is not one of {list(ARCHITECTURES)}")
        self.frozen = False
        self.config = {"architecture": architecture, "kwargs": kwargs}
        self.net = ARCHITECTURES[architecture](**kwargs)
        self.set_scale(**(scale or {"mean": 0.0, "std": 1.0}))

    def set_scale(self, mean: float, std: float) -> None:
        """Report scores as (raw − mean) / std; the reward-model stage sets its training videos' statistics,
        so a learned reward is in standard units whatever scale Bradley–Terry training left it at."""
        if not std > 0:
            raise ValueError(f"scale: std must be positive, got {std}")
        self.config["scale"] = {"mean": float(mean), "std": float(std)}

    def raw(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The network's score, before `scale`."""
        check_videos(videos, prompts)
        param = next(self.parameters())
        if param.device != videos.device:  # built on the CPU, used wherever the videos are
            self.to(videos.device)
        return self.net(videos, list(prompts))

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scale = self.config["scale"]
        return (self.raw(videos, prompts) - scale["mean"]) / scale["std"]

    def freeze(self) -> "LearnedReward":
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "LearnedReward":
        return super().train(mode and not self.frozen)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights training changes: everything but a frozen backbone (its LoRA weights included)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("net.backbone.") or "lora_" in k}

    def save_pretrained(self, path: str | os.PathLike, lineage: dict | None = None) -> Path:
        """Write `config.json`, `model.safetensors` (and `lineage.json` when given) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.trained_state_dict().items()}, path / WEIGHTS_FILE)
        if lineage is not None:
            (path / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, trainable: bool = False) -> "LearnedReward":
        """Load an export (frozen unless `trainable`); raises if its weights do not match its architecture."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (expected a reward_model stage's export folder)")
        config = json.loads((path / CONFIG_FILE).read_text())
        reward = cls(config["architecture"], scale=config.get("scale"), **config["kwargs"])
        state = load_file(path / WEIGHTS_FILE)
        expected = set(reward.trained_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"{path / WEIGHTS_FILE}: weights do not match the architecture "
                             f"(missing {missing}, unexpected {unexpected})")
        reward.load_state_dict(state, strict=False)
        return reward if trainable else reward.freeze()
