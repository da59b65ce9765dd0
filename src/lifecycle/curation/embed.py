"""Clip embeddings from a transformers image model (CLIP, SigLIP: any model with `get_image_features`), by hub id
or local folder: the near-duplicate search's embedding at real scale (`stage.dedup.model`)."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel


class ImageEmbedder:
    """uint8 (F, H, W, 3) clips -> the mean of `frames` spread-out frames' unit image embeddings, renormalised and
    scaled by sqrt(D): the RMS distance between two clips is then sqrt(2 (1 - cos)), whatever the model's width."""

    def __init__(self, model: str, frames: int = 4, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoImageProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModel.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
        if not hasattr(self.model, "get_image_features"):
            raise ValueError(f"stage.dedup.model: {model!r} ({type(self.model).__name__}) has no image embedding "
                             "(get_image_features); use a CLIP or SigLIP checkpoint")
        self.model.eval().to(self.device)
        self.frames = frames

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> np.ndarray:
        picks = [np.linspace(0, len(v) - 1, self.frames).round().astype(int) for v in videos]
        images = [Image.fromarray(v[i]) for v, idx in zip(videos, picks) for i in idx]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        emb = F.normalize(features.float(), dim=-1).view(len(videos), self.frames, -1).mean(1)
        return (F.normalize(emb, dim=-1) * emb.shape[1] ** 0.5).cpu().numpy()
