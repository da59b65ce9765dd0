"""Duplicates: exact (same bytes) and near (same picture: a re-encode, a brightness change, noise).

Near-duplicates compare thumbnail embeddings: `frames` evenly spaced frames area-downsampled to
`size` x `size` RGB, with each channel's mean over the clip removed (so a brightness shift cancels),
at a root-mean-square distance up to `threshold` (in [0, 1] pixel units). Why not a perceptual hash
(imagehash's pHash): it hashes grayscale, so clips that differ only in colour collide, and palette-
quantised GIF re-encodes moved it by up to 48 of 192 bits; colour thumbnails separate both.
The search is exhaustive (blocks of distance matrices): fine up to ~1e5 clips per run.
"""

import hashlib

import numpy as np
import torch
import torch.nn.functional as F


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def thumbnail_embedding(video: np.ndarray, frames: int = 4, size: int = 16) -> np.ndarray:
    """uint8 (F, H, W, 3) -> float32 (frames * 3 * size * size,), channel means removed."""
    idx = np.linspace(0, len(video) - 1, frames).round().astype(int)
    x = torch.from_numpy(np.ascontiguousarray(video[idx])).permute(0, 3, 1, 2).float() / 255
    thumbs = F.adaptive_avg_pool2d(x, (size, size))
    return (thumbs - thumbs.mean(dim=(0, 2, 3), keepdim=True)).flatten().numpy()


def near_pairs(embeddings: np.ndarray, threshold: float, block: int = 1024) -> dict[int, list[tuple[int, float]]]:
    """{i: [(j, distance), ...]} for every earlier clip j < i within `threshold` RMS distance, in blocks of rows."""
    emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    scale = emb.shape[1] ** 0.5
    pairs: dict[int, list[tuple[int, float]]] = {}
    for s in range(0, len(emb), block):
        d = torch.cdist(emb[s:s + block], emb[:s + block]) / scale
        d.masked_fill_(torch.ones_like(d, dtype=torch.bool).triu(s), float("inf"))  # only j < i
        for i, j in torch.nonzero(d <= threshold).tolist():
            pairs.setdefault(s + i, []).append((j, float(d[i, j])))
    return pairs


def find_duplicates(hashes: list[str], embeddings: np.ndarray, threshold: float) -> list[tuple[int, str, float] | None]:
    """For each clip in order: None if it is kept, else (index of the earlier kept clip it repeats, "exact" or
    "near", distance). The first of a group is kept; a clip near only dropped clips is kept. `embeddings` is
    (N, D); near-duplicate search is off when `threshold` is negative."""
    out: list[tuple[int, str, float] | None] = [None] * len(hashes)
    first: dict[str, int] = {}
    pairs = near_pairs(embeddings, threshold) if threshold >= 0 and len(hashes) else {}
    for i, h in enumerate(hashes):
        if h in first:
            out[i] = (first[h], "exact", 0.0)
            continue
        first[h] = i
        near = [(d, j) for j, d in pairs.get(i, []) if out[j] is None]
        if near:
            d, j = min(near)
            out[i] = (j, "near", d)
    return out
