"""Duplicates: exact (same bytes) and near (same picture: a re-encode, a brightness change, noise).

Near-duplicates compare embeddings at a root-mean-square distance up to `threshold`. The embedded default's
embedding is a thumbnail: `frames` evenly spaced frames area-downsampled to `size` x `size` RGB, with each
channel's mean over the clip removed (so a brightness shift cancels); its distance is in [0, 1] pixel units.
Why not a perceptual hash (imagehash's pHash): it hashes grayscale, so clips that differ only in colour
collide, and palette-quantised GIF re-encodes moved it by up to 48 of 192 bits; colour thumbnails separate
both. At real scale `embed.ImageEmbedder` gives a CLIP/SigLIP embedding instead.

The search goes through a faiss index over the clips of distinct content (exact duplicates are caught by
hash first): an exact flat index up to `exact_up_to` clips, beyond it an approximate one (IVF: k-means cells,
`nprobe` of them searched; HNSW: a proximity graph, `ef_search` candidates) - `index` chooses.
"""

import hashlib
import logging
import math

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads, at INFO
import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

INDEXES = ("auto", "flat", "ivf", "hnsw")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def thumbnail_embedding(video: np.ndarray, frames: int = 4, size: int = 16) -> np.ndarray:
    """uint8 (F, H, W, 3) -> float32 (frames * 3 * size * size,), channel means removed."""
    idx = np.linspace(0, len(video) - 1, frames).round().astype(int)
    x = torch.from_numpy(np.ascontiguousarray(video[idx])).permute(0, 3, 1, 2).float() / 255
    thumbs = F.adaptive_avg_pool2d(x, (size, size))
    return (thumbs - thumbs.mean(dim=(0, 2, 3), keepdim=True)).flatten().numpy()


def build_index(embeddings: np.ndarray, index: str = "auto", exact_up_to: int = 100_000, nprobe: int = 16,
                hnsw_m: int = 32, ef_search: int = 128) -> faiss.Index:
    """A faiss L2 index holding `embeddings` (N, D) float32. `index`: flat (exact), ivf (IVFFlat, 4 sqrt(N)
    cells trained on up to 256 points per cell), hnsw (HNSWFlat, `hnsw_m` links), or auto (flat up to
    `exact_up_to` vectors, else ivf)."""
    if index not in INDEXES:
        raise ValueError(f"stage.dedup.index: one of {INDEXES}, got {index!r}")
    n, dim = embeddings.shape
    kind = ("flat" if n <= exact_up_to else "ivf") if index == "auto" else index
    if kind == "flat" or n < 2:
        out = faiss.IndexFlatL2(dim)
    elif kind == "ivf":
        cells = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss warns under 39 training points per cell
        out = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, cells)
        sample = np.random.default_rng(0).permutation(n)[: 256 * cells]
        out.train(embeddings[np.sort(sample)])
        out.nprobe = min(nprobe, cells)
    else:
        out = faiss.IndexHNSWFlat(dim, hnsw_m)
        out.hnsw.efSearch = ef_search
    out.add(embeddings)
    return out


def search_pairs(index: faiss.Index, embeddings: np.ndarray, threshold: float, neighbours: int = 16,
                 block: int = 65536) -> dict[int, list[tuple[int, float]]]:
    """{i: [(j, distance), ...]} for earlier clips j < i within `threshold` RMS distance of clip i, among its
    `neighbours` nearest in `index` (which holds `embeddings`, float32 (N, D), in order), queried in blocks."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    k = min(neighbours + 1, len(emb))  # the clip itself comes back too
    pairs: dict[int, list[tuple[int, float]]] = {}
    for s in range(0, len(emb), block):
        dist, idx = index.search(emb[s:s + block], k)
        rms = np.sqrt(np.maximum(dist, 0) / emb.shape[1])  # squared L2 / D = squared RMS distance
        earlier = (idx >= 0) & (idx < np.arange(s, s + len(idx))[:, None])
        # faiss's distances round differently with its thread count: candidates are measured again, exactly
        for i, j in zip(*np.nonzero((rms <= threshold * 1.01 + 1e-6) & earlier)):
            a, b = s + int(i), int(idx[i, j])
            d = float(np.sqrt(np.mean((emb[a].astype(np.float64) - emb[b]) ** 2)))
            if d <= threshold:
                pairs.setdefault(a, []).append((b, d))
    return pairs


def near_pairs(embeddings: np.ndarray, threshold: float, neighbours: int = 16,
               **index_args) -> dict[int, list[tuple[int, float]]]:
    """`search_pairs` through an index built by `build_index(embeddings, **index_args)`."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not len(emb):
        return {}
    return search_pairs(build_index(emb, **index_args), emb, threshold, neighbours)


def find_duplicates(hashes: list[str], embeddings: np.ndarray, threshold: float,
                    **search_args) -> list[tuple[int, str, float] | None]:
    """For each clip in order: None if it is kept, else (index of the earlier kept clip it repeats, "exact" or
    "near", distance). The first of a group is kept; a clip near only dropped clips is kept. `embeddings` is
    (N, D); near-duplicate search (`near_pairs`, given `search_args`) is off when `threshold` is negative."""
    out: list[tuple[int, str, float] | None] = [None] * len(hashes)
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h in first:
            out[i] = (first[h], "exact", 0.0)
        else:
            first[h] = i
    if threshold < 0 or not first:
        return out
    distinct = np.array(sorted(first.values()))  # exact copies stay out of the index (they would fill the neighbours)
    pairs = near_pairs(np.asarray(embeddings)[distinct], threshold, **search_args)
    for a, i in enumerate(distinct):
        near = sorted((d, int(distinct[b])) for b, d in pairs.get(a, []) if out[distinct[b]] is None)
        if near:
            d, j = near[0]
            out[i] = (j, "near", d)
    return out
