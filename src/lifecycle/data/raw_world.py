"""The synthetic world as raw media, the way real data arrives: the data engine's embedded input.

`write_raw(out_dir, ...)` writes `out_dir/media/` (the input of `stage=curate`) and two files beside it:

- media: the world's clips as mp4, webm and gif files named like camera uploads (`IMG_0042.mp4`), with
  useless captions: a sidecar `.txt` ("nice video", "lol") or none at all (the file name is the caption).
  Mixed in: exact duplicates (a copied file), near-duplicates (the same clip re-encoded in another format with a
  slight brightness change and noise), corrupt files (empty, truncated, random bytes), clips the filters should
  drop (too small, too short, too wide) and a few still images;
- `labels.jsonl`: the true attributes of a small labelled subset of the clean clips (what the embedded
  recaptioner learns from);
- `truth.jsonl`: the truth about every file (its kind, attributes, the file it duplicates), read only by the
  curation report to score caption accuracy and duplicate detection.

Like `synthetic.write_shards`, the folder is built in a staging sibling and renamed into place with `raw.json`
written last; a complete folder with the same parameters is reused.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .staging import write_once
from .synthetic import caption, render_clip, sample_metadata
from .video_io import encode_video

MANIFEST = "raw.json"
NOISY_CAPTIONS = ("nice video", "check this out", "lol", "my video", "untitled", "wow", "test", "")
FORMATS = {"mp4": 0.6, "webm": 0.2, "gif": 0.2}
_NAMES = {"mp4": "IMG_{:04d}", "webm": "VID_2024_{:04d}", "gif": "clip{}"}


def _noisy_caption(rng: np.random.Generator) -> str | None:
    """A sidecar caption worth nothing, or None (no sidecar: the file name is the only caption)."""
    return None if rng.random() < 0.5 else NOISY_CAPTIONS[rng.integers(len(NOISY_CAPTIONS))]


def _near_copy(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same clip, a little brighter and noisier (what a re-upload through another app looks like)."""
    noisy = video.astype(np.int16) + int(rng.integers(3, 8)) + rng.integers(-2, 3, video.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _corrupt(kind: str, rng: np.random.Generator, good: bytes) -> bytes:
    return {"empty": b"", "truncated": good[: len(good) // 3], "garbage": rng.bytes(2048)}[kind]


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_into(root: Path, p: dict, progress: bool) -> None:
    rng = np.random.default_rng(p["seed"])
    media = root / "media"
    media.mkdir()
    truth, labels, counts = [], [], {}
    formats, weights = list(FORMATS), np.array(list(FORMATS.values()))

    def put(name: str, data: bytes, kind: str, meta: dict | None = None, of: str | None = None,
            note: str | None = None) -> None:
        (media / name).write_bytes(data)
        text = _noisy_caption(rng)
        if text is not None:
            (media / name).with_suffix(".txt").write_text(text)
        truth.append({"file": name, "kind": kind, "duplicate_of": of, "note": note,
                      **({"caption": caption(meta), **{k: meta[k] for k in meta if k not in ("x0", "y0")}}
                         if meta else {})})
        counts[kind] = counts.get(kind, 0) + 1

    clean = []
    for i in tqdm(range(p["num_clips"]), desc="raw clips", unit="clip", disable=not progress):
        meta = sample_metadata(rng)
        video = render_clip(meta, p["frames"], p["size"])
        fmt = formats[rng.choice(len(formats), p=weights / weights.sum())]
        name = _NAMES[fmt].format(i) + f".{fmt}"
        put(name, encode_video(video, fmt), "clean", meta)
        clean.append((name, meta, video, fmt))
        if rng.random() < p["labelled"]:
            labels.append({"file": name, **{k: v for k, v in meta.items() if k not in ("x0", "y0")}})
    n = p["num_clips"]
    picks = rng.permutation(n)
    cuts = np.cumsum([0, *(round(p[k] * n) for k in ("exact_duplicates", "near_duplicates", "corrupt", "rejects"))])
    for j in picks[cuts[0]:cuts[1]]:
        name, meta = clean[j][0], clean[j][1]
        put(f"copy_of_{Path(name).stem}{Path(name).suffix}", (media / name).read_bytes(), "exact_duplicate", meta, name)
    for j in picks[cuts[1]:cuts[2]]:
        name, meta, video, fmt = clean[j]
        other = formats[(formats.index(fmt) + 1 + int(rng.integers(len(formats) - 1))) % len(formats)]
        put(f"{Path(name).stem}_edit.{other}", encode_video(_near_copy(video, rng), other), "near_duplicate", meta, name)
    for k, j in enumerate(picks[cuts[2]:cuts[3]]):
        name, kind = clean[j][0], ("empty", "truncated", "garbage")[k % 3]
        put(f"broken_{k:03d}{Path(name).suffix}", _corrupt(kind, rng, (media / name).read_bytes()), "corrupt",
            note=kind)
    for k, j in enumerate(picks[cuts[3]:cuts[4]]):  # what the default filters drop
        meta = clean[j][1]
        kind = ("small", "short", "wide", "image")[k % 4]
        if kind == "small":
            data, ext = encode_video(render_clip(meta, p["frames"], p["size"] // 2)), "mp4"
        elif kind == "short":
            data, ext = encode_video(render_clip(meta, 2, p["size"])), "mp4"
        elif kind == "wide":
            wide = np.concatenate([render_clip(meta, p["frames"], p["size"])] * 3, axis=2)
            data, ext = encode_video(wide), "mp4"
        else:
            data, ext = _png(render_clip(meta, 1, p["size"])[0]), "png"
        put(f"reject_{k:03d}.{ext}", data, "reject", meta, note=kind)
    (root / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    (root / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    summary = {**p, "files": len(truth), "kinds": counts, "labelled_clips": len(labels)}
    (root / MANIFEST).write_text(json.dumps(summary, indent=2))


def write_raw(out_dir: str | os.PathLike, num_clips: int = 4000, frames: int = 8, size: int = 32, seed: int = 0,
              labelled: float = 0.1, exact_duplicates: float = 0.03, near_duplicates: float = 0.05,
              corrupt: float = 0.02, rejects: float = 0.02, progress: bool = True) -> dict:
    """Write the raw world into `out_dir` (see the module docstring); returns its `raw.json` summary.

    The fractions are of `num_clips`: `labelled` clean clips get true labels; duplicates, corrupt files and
    filter rejects are added on top of the clean clips. Raises ValueError when `out_dir` holds a raw world
    written with other parameters, FileExistsError when it holds anything else.
    """
    if not isinstance(num_clips, int) or num_clips <= 0:
        raise ValueError(f"num_clips must be a positive integer, got {num_clips!r}")
    fractions = {"labelled": labelled, "exact_duplicates": exact_duplicates, "near_duplicates": near_duplicates,
                 "corrupt": corrupt, "rejects": rejects}
    bad = {k: v for k, v in fractions.items() if not 0 <= v <= 1}
    if bad or exact_duplicates + near_duplicates + corrupt + rejects > 1:
        raise ValueError(f"fractions must lie in [0, 1] and the added files number at most num_clips, got {fractions}")
    params = {"num_clips": num_clips, "frames": frames, "size": size, "seed": seed, **fractions}
    return write_once(out_dir, MANIFEST, params, lambda staging: _write_into(staging, params, progress))
