"""The reward interface: videos and prompts in, one score per video out.

Videos are float tensors (B, F, C, H, W) with values in [0, 1] (what `ModelBundle.decode_latents`
returns); a reward returns a (B,) float tensor, higher is better. `differentiable` says whether
the score carries gradients back to the pixels (reward-gradient methods such as VADER need it;
policy-gradient methods such as DDPO do not).
"""

from collections.abc import Mapping, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


class Reward(nn.Module):
    """Base class: subclasses implement `forward(videos, prompts) -> (B,)`."""

    differentiable: bool = True

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class FrozenReward(Reward):
    """A reward whose weights never train: no parameter requires grad and it stays in eval mode.

    `train()` is overridden because a reward held inside a LightningModule would otherwise be
    switched to training mode with it (turning on dropout); gradients still flow to the pixels.
    """

    def freeze(self) -> "FrozenReward":
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "FrozenReward":
        return super().train(False)

    def follow(self, videos: torch.Tensor) -> torch.Tensor:
        """Move the reward to the videos' device (it is built on the CPU, used wherever the videos are)."""
        param = next(self.parameters(), None)
        if param is not None and param.device != videos.device:
            self.to(videos.device)
        return videos


def check_videos(videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Validate the (B, F, 3, H, W) float layout and that there is one prompt per video."""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"expected videos (B, F, 3, H, W), got {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise TypeError(f"expected float videos in [0, 1], got {videos.dtype}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {videos.shape[0]} videos")
    return videos


class WeightedSum(Reward):
    """Σ weight_i · reward_i; `components` returns each term for logging."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]):
        super().__init__()
        if not rewards:
            raise ValueError("a reward needs at least one component")
        self.terms = nn.ModuleDict(dict(rewards))
        self.weights = {name: float(weights[name]) for name in rewards}
        self.differentiable = all(r.differentiable for r in self.terms.values())

    def components(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: r(videos, prompts) for name, r in self.terms.items()}

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        parts = self.components(videos, prompts)
        return sum(self.weights[name] * score for name, score in parts.items())


def build_reward(cfg: DictConfig | Mapping) -> WeightedSum:
    """`cfg.reward` -> WeightedSum. Each entry is `{_target_: ..., weight: w, **kwargs}`.

    `reward=aesthetic` or `reward=[aesthetic,hps]` on the command line selects entries
    (each conf/reward/*.yaml places itself under `reward.<name>`); `reward.hps.weight=0.5`
    changes a weight.
    """
    cfg = (OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig)
           else OmegaConf.create(dict(cfg)))
    rewards, weights = {}, {}
    for name, entry in cfg.items():
        if "_target_" not in entry:
            raise ValueError(f"reward.{name}: needs a _target_ (the Reward class to build)")
        entry = OmegaConf.to_container(entry)
        weights[name] = entry.pop("weight", 1.0)
        rewards[name] = instantiate(entry, _convert_="all")
        if not isinstance(rewards[name], Reward):
            raise TypeError(f"reward.{name}: {entry['_target_']} is not a lifecycle Reward")
    return WeightedSum(rewards, weights)
