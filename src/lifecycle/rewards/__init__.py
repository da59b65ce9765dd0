"""Rewards: videos (B, F, C, H, W) in [0, 1] and prompts in, one score per video out.

Real families load weights with `from_pretrained` (clip: aesthetic, CLIP score, PickScore, HPS;
farm; detector; action; vjepa); `synthetic` needs no download and scores the embedded world.
"""

from .base import FrozenReward, Reward, WeightedSum, build_reward

__all__ = ["FrozenReward", "Reward", "WeightedSum", "build_reward"]
