"""Pieces shared by the video rewards on transformers backbones (detector, action, vjepa).

`resample_frames` picks a fixed number of frames differentiably, `resolve_label` turns a class
name or id into the backbone's class index, and `BackboneReward` holds the frozen model.
"""

import difflib

import torch
from transformers import PretrainedConfig, PreTrainedModel

from lifecycle.rewards.base import FrozenReward


def resample_frames(videos: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, F, ...) -> (B, num_frames, ...): frames spread uniformly over the clip, repeated when F < num_frames.

    `index_select` keeps the picked frames connected to the graph, so gradients reach them.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if videos.shape[1] == num_frames:
        return videos
    index = torch.linspace(0, videos.shape[1] - 1, num_frames, device=videos.device).round().long()
    return videos.index_select(1, index)


def resolve_label(config: PretrainedConfig, label: str | int) -> int:
    """A class name (looked up in `config.label2id`) or id -> the class index, with a helpful error."""
    if isinstance(label, int):
        if label not in config.id2label:
            raise ValueError(f"class id {label} is out of range: the model has {len(config.id2label)} classes")
        return label
    if label in config.label2id:
        return int(config.label2id[label])
    names = list(config.label2id)
    hints = difflib.get_close_matches(label, names, n=5) or names[:8]
    raise ValueError(
        f"{label!r} is not a key of the model's config.label2id; valid labels include {', '.join(map(repr, hints))}"
    )


class BackboneReward(FrozenReward):
    """A reward scored by a frozen pretrained transformers model, `self.model`.

    `dtype` is transformers' `dtype` ("float32", "bfloat16", ...; None keeps the checkpoint's).
    """

    def __init__(self, model_cls: type[PreTrainedModel], name_or_path: str, dtype: str | None = None):
        super().__init__()
        self.model = model_cls.from_pretrained(name_or_path, dtype=dtype)
        self.freeze()
