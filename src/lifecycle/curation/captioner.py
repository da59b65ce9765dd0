"""The embedded recaptioner: attribute classifiers trained on a labelled subset, feeding a caption template.

No download: each attribute of the synthetic world but the direction (colour, shape, size, speed,
background) is a multinomial logistic regression on a few pixel features of the clip (the colour votes
and object mask of `data.oracle`, the background colour, the object's area, how much of its bounding
box it fills and where its mass sits in it, and the annotated travel), fitted on the labelled clips. The
direction comes from the temporal annotation. A real data engine uses `vlm.VLMCaptioner` instead.
"""

import json
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import ATTRIBUTES
from ..data import oracle
from .annotate import annotate, describe_motion
from .media import decode

CLASSIFIED = ("colour", "shape", "size", "speed", "background")


def clip_features(video: np.ndarray, travel: float) -> torch.Tensor:
    """uint8 (F, H, W, 3) and its annotated travel -> (14,) float features."""
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float()[None] / 255  # (1, F, 3, H, W)
    mask = oracle.object_weight(x)[0] > 0  # (F, H, W)
    pixels = x[0].permute(0, 2, 3, 1)[~mask]
    background = pixels.mean(0) if len(pixels) else torch.zeros(3)
    area = mask.float().mean()
    frames = mask.any(dim=(1, 2))
    if not frames.any():
        shape = torch.zeros(3)
    else:
        m = mask[frames].float()  # frames holding the object
        rows, cols = m.amax(2), m.amax(1)  # (f, H), (f, W): lines the object touches
        h, w = m.shape[1:]
        top, left = rows.argmax(1), cols.argmax(1)
        bottom, right = h - rows.flip(1).argmax(1), w - cols.flip(1).argmax(1)
        height, width = (bottom - top).float(), (right - left).float()
        mass = m.sum(dim=(1, 2))
        cy = (m.sum(2) * (torch.arange(h) + 0.5)).sum(1) / mass
        cx = (m.sum(1) * (torch.arange(w) + 0.5)).sum(1) / mass
        shape = torch.stack([(mass / (height * width)).mean(),  # how much of its box the object fills
                             ((cx - (left + right) / 2) / width).mean(),  # where its mass sits in the box
                             ((cy - (top + bottom) / 2) / height).mean()])
    return torch.cat([oracle.colour_votes(x)[0], background, area[None], area.sqrt()[None], shape,
                      torch.tensor([float(travel)])]).float()


def fit_softmax(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-3, steps: int = 100):
    """Multinomial logistic regression by L-BFGS: (weight (D, classes), bias (classes,))."""
    weight = torch.zeros(features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def template(attrs: dict, annotation: dict) -> str:
    """The synthetic world's caption, with the temporal annotation as its motion phrase."""
    return (f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {describe_motion(annotation)} {attrs['speed']} "
            f"on a {attrs['background']} background")


class AttributeCaptioner:
    """Fits on `labels` (a jsonl of {file, attribute: value, ...}; files relative to `media`, default the labels
    file's folder's `media/`) at construction; called on clips, returns {caption, attribute: value, ...}."""

    def __init__(self, labels: str, media: str | None = None):
        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"stage.recaption.labels: no label file {labels!r}")
        root = Path(media) if media else path.parent / "media"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"stage.recaption.labels: {labels!r} holds no labelled clips")
        feats = []
        for r in rows:
            video = decode((root / r["file"]).read_bytes(), Path(r["file"]).suffix.lstrip("."))
            feats.append(clip_features(video, annotate(video)["travel"]))
        x = torch.stack(feats)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self.mean) / self.std
        self.heads = {}
        for name in CLASSIFIED:
            y = torch.tensor([ATTRIBUTES[name].index(r[name]) for r in rows])
            self.heads[name] = fit_softmax(x, y, len(ATTRIBUTES[name]))

    def attributes(self, video: np.ndarray, annotation: dict) -> dict:
        x = (clip_features(video, annotation["travel"]) - self.mean) / self.std
        return {name: ATTRIBUTES[name][int((x @ w + b).argmax())] for name, (w, b) in self.heads.items()}

    def __call__(self, videos: list[np.ndarray], annotations: list[dict], originals: list[str]) -> list[dict]:
        out = []
        for video, ann in zip(videos, annotations):
            attrs = self.attributes(video, ann)
            out.append({"caption": template(attrs, ann), **attrs, "direction": ann["direction"]})
        return out
