"""CLIP-based rewards: the LAION aesthetic predictor and text-image scorers (CLIP score, PickScore, HPS).

All load their backbones with transformers' `from_pretrained` (a hub id or a local folder), are
frozen, and score every frame of a (B, F, 3, H, W) video in [0, 1]; frames are resized and
normalised in torch (`preprocess.prepare`), so gradients reach the pixels.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

from lifecycle.rewards.base import FrozenReward, check_videos
from lifecycle.models.preprocess import prepare

log = logging.getLogger(__name__)


def frames_of(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) -> (B·F, C, H, W)."""
    return videos.flatten(0, 1)


class AestheticHead(nn.Module):
    """LAION's improved-aesthetic-predictor MLP, with its layout so its weights file loads as is.

    The dropouts are identity at inference; they are kept only so the state-dict keys
    (layers.0, 2, 4, 6, 7) match the released `sac+logos+ava1-l14-linearMSE.pth`.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A weights file: `.safetensors`, or a `.pth`/`.pt` tensor dict (loaded with weights_only)."""
    if Path(path).suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticReward(FrozenReward):
    """LAION aesthetic score: MLP(e / ‖e‖) on the CLIP image embedding e of each frame, mean over frames.

    clip: CLIP hub id or folder (a `CLIPModel` or `CLIPVisionModelWithProjection` checkpoint);
        LAION's head was trained on ViT-L/14 (768-d embeddings).
    head: LAION head weights file (.pth/.pt/.safetensors, keys layers.{0,2,4,6,7}.{weight,bias});
        None leaves the head randomly initialised (a warning says so).
    dtype: the backbone's dtype (transformers' `dtype`: "float32", "bfloat16", ...); None keeps
        the checkpoint's. The head runs in its own dtype (float32 unless cast).
    trust_remote_code: run a repository's own code (a config `auto_map`); off unless you trust `clip`.
    """

    def __init__(self, clip: str = "openai/clip-vit-large-patch14", head: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False):
        super().__init__()
        config = AutoConfig.from_pretrained(clip, trust_remote_code=trust_remote_code)
        if isinstance(config, CLIPConfig):
            # A full CLIP checkpoint keeps the projection width at the top level, and its
            # vision_config need not repeat it (transformers would then build a 512-d projection).
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        self.vision = CLIPVisionModelWithProjection.from_pretrained(clip, config=config, dtype=dtype)
        self.image_size = self.vision.config.image_size
        self.head = AestheticHead(self.vision.config.projection_dim)
        if head is None:
            log.warning("AestheticReward: head=None, the aesthetic head is randomly initialised (scores are meaningless)")
        else:
            self.head.load_state_dict(load_state_dict(head), strict=True)
        self.freeze()

    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> unit-norm CLIP image embeddings (B, F, D), in float32."""
        b, f = videos.shape[:2]
        pixels = prepare(frames_of(videos), self.image_size).to(self.vision.dtype)
        emb = self.vision(pixel_values=pixels).image_embeds.float()
        return F.normalize(emb, dim=-1).view(b, f, -1)

    def frame_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (B, F, D) -> aesthetic score per frame (B, F), float32."""
        return self.head(emb.to(self.head.layers[0].weight.dtype)).float()

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        self.follow(videos)
        return self.frame_scores(self.embed(videos)).mean(1)


class ClipScore(FrozenReward):
    """scale · cos(image embedding, text embedding), per frame, mean over frames.

    The base of the CLIP text-image scorers (`PickScore`, `HPSReward` only change the defaults).
    Unlike the CLIPScore metric (100 · max(cos, 0)) the cosine is not clipped at 0, so the
    gradient never vanishes.

    model: `CLIPModel` hub id or folder. tokenizer: hub id or folder (default: `model`'s).
    scale: the factor on the cosine; None uses the model's learned temperature logit_scale.exp().
    dtype: the backbone's dtype (None keeps the checkpoint's); the cosine is computed in float32.
    trust_remote_code: run a repository's own code (a tokenizer `auto_map`); off unless you trust it.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        tokenizer: str | None = None,
        scale: float | None = 100.0,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.model = CLIPModel.from_pretrained(model, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
        self.image_size = self.model.config.vision_config.image_size
        # A tokenizer without a saved model_max_length reports a huge one: cap at the position table.
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.scale = scale
        self.freeze()

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> unit-norm text embeddings (B, D), float32 (no gradient: prompts are fixed)."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        with torch.no_grad():
            emb = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(emb.pooler_output.float(), dim=-1)

    def image_embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [0, 1] -> unit-norm image embeddings (B, F, D), float32."""
        b, f = videos.shape[:2]
        pixels = prepare(frames_of(videos), self.image_size).to(self.model.dtype)
        emb = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
        return F.normalize(emb, dim=-1).view(b, f, -1)

    def factor(self) -> torch.Tensor | float:
        return self.model.logit_scale.exp().float() if self.scale is None else self.scale

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        self.follow(videos)
        cos = (self.image_embeddings(videos) * self.text_embeddings(prompts).unsqueeze(1)).sum(-1)
        return self.factor() * cos.mean(1)


class PickScore(ClipScore):
    """PickScore: logit_scale.exp() · cos(image, text), as its reference inference computes it.

    PickScore_v1 is a CLIP ViT-H/14 fine-tune; its tokenizer is the base model's (`tokenizer`).
    """

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        tokenizer: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        scale: float | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(model=model, tokenizer=tokenizer, scale=scale, dtype=dtype,
                         trust_remote_code=trust_remote_code)


class HPSReward(ClipScore):
    """HPS-style score: cos(image, text), as HPSv2's reference `score` returns it (about 0.2-0.35).

    HPSv2 is an open_clip ViT-H/14 fine-tune; this runs its weights converted to a transformers
    `CLIPModel` (default `adams-story/HPSv2-hf`, or a local folder of converted HPSv2/v2.1 weights).
    """

    def __init__(
        self,
        model: str = "adams-story/HPSv2-hf",
        tokenizer: str | None = None,
        scale: float | None = 1.0,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(model=model, tokenizer=tokenizer, scale=scale, dtype=dtype,
                         trust_remote_code=trust_remote_code)
