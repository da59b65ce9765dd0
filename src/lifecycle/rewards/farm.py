"""FARM: a framewise aesthetic reward model with a temporal-coherence bonus."""

from collections.abc import Sequence

import torch

from lifecycle.rewards.base import check_videos
from lifecycle.rewards.clip import AestheticReward


class FARMReward(AestheticReward):
    """R(x_{1:T}) = Σ_{t=1}^{T} A(x_t) + λ · C(x_{1:T}), with

        A(x_t) = MLP(e_t),  e_t = CLIP(x_t) / ‖CLIP(x_t)‖    (the LAION aesthetic score of frame t)
        C(x_{1:T}) = 1/(T-1) · Σ_{t=1}^{T-1} ⟨e_t, e_{t+1}⟩   (mean cosine of consecutive frames)

    The aesthetic term is a sum over frames (not a mean), so it grows with T; C lies in [-1, 1].
    One CLIP pass gives the embeddings of both terms. A single frame (T = 1) has C = 1, the
    cosine of a frame with itself.

    clip, head, dtype, trust_remote_code: as `AestheticReward`. coherence_weight: λ.
    """

    def __init__(
        self,
        clip: str = "openai/clip-vit-large-patch14",
        head: str | None = None,
        coherence_weight: float = 1.0,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(clip=clip, head=head, dtype=dtype, trust_remote_code=trust_remote_code)
        self.coherence_weight = float(coherence_weight)

    @staticmethod
    def coherence(emb: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (B, T, D) -> mean cosine of consecutive frames (B,)."""
        if emb.shape[1] == 1:
            return emb.new_ones(emb.shape[0])
        return (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        self.follow(videos)
        emb = self.embed(videos)
        return self.frame_scores(emb).sum(1) + self.coherence_weight * self.coherence(emb)
