"""The sink of every exported sample: content filter, watermark, files and provenance (see lifecycle.outputs)."""

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..data.video_io import filmstrip, write_atomically, write_video
from . import Mark, Policy, provenance
from .watermark import detect, embed

log = logging.getLogger(__name__)
GREY = 128  # a blocked clip's replacement
VERIFY_FRAMES = 2


def each(function, items: list) -> list:
    """`function` over `items` on a thread per core: embedding (numpy's batched SVD) and PyAV's encoders release the
    GIL, so a batch of samples is written about 1.6x faster on two cores than one after another."""
    with ThreadPoolExecutor(max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(function, items))


def screen(clips: list[np.ndarray], content_filter) -> tuple[list[np.ndarray], list[float] | None]:
    """`clips` with those the filter scores at or over its threshold replaced by grey clips of the same shape,
    and the unsafe scores (None without a filter)."""
    if content_filter is None:
        return clips, None
    scores = content_filter.scores(clips)
    return [np.full_like(c, GREY) if s >= content_filter.threshold else c for c, s in zip(clips, scores)], scores


def save_png(path: Path, image: np.ndarray, comment: str | None) -> None:
    """An RGB uint8 (H, W, 3) image as a PNG, with `comment` in its text chunk `Comment` (written atomically)."""
    info = PngImagePlugin.PngInfo()
    if comment is not None:
        info.add_text(provenance.PNG_KEY, comment)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    write_atomically(path, buffer.getvalue())


def verify(out: Path, files: list[str], mark: Mark) -> dict:
    """Detect `mark` in each of `out`'s `files` (in its first VERIFY_FRAMES frames, which keeps the check at a
    few ms per file): whether every one holds it, and each one's bit accuracy."""
    checks = dict(zip(files, each(lambda f: detect(out / f, mark, max_frames=VERIFY_FRAMES), files)))
    missing = [f for f, check in checks.items() if not check["detected"]]
    if missing:
        log.warning("outputs.watermark: not detected in %s of %s after writing", missing, out)
    return {"verified": not missing, "bit_accuracy": {f: check["bit_accuracy"] for f, check in checks.items()}}


def write_samples(out: Path, clips: list[np.ndarray], prompts: list[str], scores: dict, fps: int, name: str,
                  policy: Policy) -> None:
    """`out/`: `NNN.mp4` per uint8 (F, H, W, 3) clip and `NNN.gif` for the first `policy.gif_previews` of them,
    `filmstrip.png` labelled with the prompts, `prompts.json`, `scores` as `name` and `provenance.json`, under the
    lifecycle.outputs `policy`."""
    out.mkdir(parents=True, exist_ok=True)
    clips, unsafe = screen(clips, policy.filter)
    previews = len(prompts) if policy.gif_previews is None else policy.gif_previews
    samples = [{"index": i, "prompt": p, "files": [f"{i:03d}.mp4"] + [f"{i:03d}.gif"] * (i < previews),
                "blocked": unsafe is not None and unsafe[i] >= policy.filter.threshold,
                "unsafe_score": None if unsafe is None else unsafe[i]} for i, p in enumerate(prompts)]
    for s in (s for s in samples if s["blocked"]):
        log.warning("outputs.filter: blocked sample %s (prompt %r, unsafe score %.3f >= threshold %s); exported "
                    "as a grey clip", out / s["files"][0], s["prompt"], s["unsafe_score"], policy.filter.threshold)
    count = None if unsafe is None else sum(s["blocked"] for s in samples)
    mark = policy.watermark
    watermark = None if mark is None else {"message": mark.message, "method": mark.method, "min_size": mark.min_size}
    record = provenance.record(policy.context, samples, watermark, count)

    def comment(index: int | None) -> str | None:
        return provenance.compact(record, index) if policy.provenance else None

    def write(i: int) -> None:
        frames = clips[i] if mark is None else embed(clips[i], mark)
        for name in samples[i]["files"]:
            write_video(out / name, frames, fps=fps, comment=comment(i))

    each(write, range(len(clips)))
    strip = np.asarray(filmstrip(clips, [f"[blocked] {s['prompt']}" if s["blocked"] else s["prompt"] for s in samples]))
    save_png(out / "filmstrip.png", strip if mark is None else embed(strip[None], mark)[0], comment(None))
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2))
    (out / name).write_text(json.dumps(scores if count is None else {**scores, "blocked": count}, indent=2))
    if mark is not None:
        record["watermark"] |= verify(out, [f for s in samples for f in s["files"]] + ["filmstrip.png"], mark)
    if policy.provenance:
        (out / "provenance.json").write_text(json.dumps(record, indent=2))
