"""Safety filtering with a transformers image classifier (e.g. an NSFW detector) over a few frames of each clip."""

import numpy as np
import torch
from PIL import Image
from transformers import pipeline


class SafetyFilter:
    """Scores clips by the classifier's probability of its unsafe labels and flags those at or over a threshold."""

    def __init__(self, model: str, unsafe_labels: list[str] = ("nsfw",), threshold: float = 0.5, frames: int = 3,
                 batch_size: int = 16, device: str | None = None, trust_remote_code: bool = False):
        """Loads the classifier (hub id or local folder) on `device` (CUDA when available); checks the labels exist."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = pipeline("image-classification", model=model, device=device, trust_remote_code=trust_remote_code)
        labels = list(self.pipe.model.config.id2label.values())
        if not set(unsafe_labels) & set(labels):
            raise ValueError(
                f"stage.safety.unsafe_labels {list(unsafe_labels)} match none of the model's labels {labels}"
            )
        self.unsafe_labels, self.threshold = set(unsafe_labels), threshold
        self.frames, self.batch_size = frames, batch_size

    def scores(self, videos: list[np.ndarray]) -> list[float]:
        """Per uint8 (F, H, W, 3) clip: the unsafe labels' summed probability, maxed over `frames` spread-out frames."""
        picks = [np.linspace(0, len(v) - 1, self.frames).round().astype(int) for v in videos]
        images = [Image.fromarray(v[i]) for v, idx in zip(videos, picks) for i in idx]
        # top_k=None means the pipeline's default of 5 labels, so ask for all of them by count
        out = self.pipe(images, top_k=self.pipe.model.config.num_labels, batch_size=self.batch_size)
        probs = [sum(p["score"] for p in preds if p["label"] in self.unsafe_labels) for preds in out]
        return np.array(probs).reshape(len(videos), self.frames).max(axis=1).tolist()

    def unsafe(self, videos: list[np.ndarray]) -> list[bool]:
        """Whether each clip's unsafe score reaches the threshold."""
        return [score >= self.threshold for score in self.scores(videos)]
