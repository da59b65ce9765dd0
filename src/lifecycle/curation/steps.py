"""The pipeline's steps, on batches of clips: Ray Data numpy batches, a dict of equal-length columns.

A clip travels as `unit` and `index` (where it is in the input), `row` (its manifest row so far, as JSON: a
step that drops it sets kept: false, step, reason), `ext` and `data` (the media bytes), `video` (decoded
uint8 frames, shaped by the row's frames/height/width) and, in the first pass, `embedding` (float16 bytes).
A CPU step is a function (Ray runs it as tasks); a model step is a class (Ray runs an actor pool of it).
Each returns the columns the steps after it read.
"""

import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ..config import CONF_DIR
from ..rewards.base import WeightedSum, build_reward
from .annotate import annotate, frame_difference
from .dedup import content_hash, thumbnail_embedding
from .embed import ImageEmbedder
from .filters import size_filter
from .media import Unit, decode, read_unit


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _rows(batch) -> list[dict]:
    return [json.loads(r) for r in batch["row"]]


def _frames(row: dict, video: bytes) -> np.ndarray:
    return np.frombuffer(video, np.uint8).reshape(row["frames"], row["height"], row["width"], 3)


def _videos(batch, rows: list[dict]) -> list[np.ndarray | None]:
    """The decoded clips of a batch, None for those already dropped."""
    return [_frames(r, v) if r.get("kept") is None else None for r, v in zip(rows, batch["video"])]


def _with_rows(batch, rows: list[dict]) -> dict:
    return {**batch, "row": _objects([json.dumps(r) for r in rows])}


def reward_entries(spec) -> dict:
    """`stage.aesthetic`'s entries, each a reward name (conf/reward) or {name: overrides of its config}, as
    {name: overrides}."""
    return {k: v or {} for entry in spec for k, v in (entry.items() if isinstance(entry, dict) else [(entry, {})])}


def aesthetic_reward(spec) -> WeightedSum | None:
    """`stage.aesthetic` (e.g. [vivid], or [{aesthetic: {clip: <CLIP folder>, head: <LAION head>}}]) -> the
    weighted sum of its rewards; None when empty."""
    if not spec:
        return None
    return build_reward({name: OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "reward" / f"{name}.yaml"), more)
                         for name, more in reward_entries(spec).items()})


# -- first pass: read, check (decode, validate, filter, hash), embed -------------------------------------------
def read(unit: dict, root: str) -> list[dict]:
    """A unit ({unit, files, shard, rows}) -> its clips, each with its row. When `rows` (JSON, the unit's manifest
    rows after deduplication) is set, only the clips still undecided come out, with those rows."""
    decided = json.loads(unit["rows"]) if unit["rows"] else None
    u = Unit(int(unit["unit"]), tuple(unit["files"]), unit["shard"] or None)
    out = []
    for i, item in enumerate(read_unit(u, root)):
        if decided is not None and decided[i].get("kept") is not None:
            continue
        row = decided[i] if decided is not None else {"unit": u.index, "index": i, "source": item.source,
                                                      "original_caption": item.caption}
        out.append({"unit": u.index, "index": i, "row": json.dumps(row), "ext": item.ext, "data": item.data})
    return out


def check(batch, filters: dict, dedup: dict, thumbnails: bool) -> dict:
    """Decode and validate (corrupt input: dropped at step decode, never fatal), filter on size and length, hash;
    the thumbnail embedding too when no embedding model is set, else the frames for the model."""
    torch.set_num_threads(1)
    rows, videos, embeddings = _rows(batch), [], []
    for row, data, ext in zip(rows, batch["data"], batch["ext"]):
        video, embedding = b"", b""
        try:
            frames = decode(data, ext)
        except Exception as exc:  # noqa: BLE001 - any unreadable input is skipped and counted, never fatal
            row |= {"kept": False, "step": "decode", "reason": str(exc)[:200]}
        else:
            row |= {"frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2])}
            if (why := size_filter(frames, **filters)) is not None:
                row |= {"kept": False, "step": "filter", "reason": why}
            else:
                row["hash"] = content_hash(data)
                if thumbnails:
                    embedding = thumbnail_embedding(frames, dedup["frames"], dedup["size"]).astype(np.float16).tobytes()
                else:  # for the embedding model's step
                    video = frames.tobytes()
        videos.append(video)
        embeddings.append(embedding)
    return {"unit": batch["unit"], "row": _objects([json.dumps(r) for r in rows]), "video": _objects(videos),
            "embedding": _objects(embeddings)}


class Embed:
    """The model step of the first pass: `embed.ImageEmbedder` on the clips still in."""

    def __init__(self, model: str, frames: int):
        torch.set_num_threads(1)
        self.embedder = ImageEmbedder(model, frames)

    def __call__(self, batch) -> dict:
        rows = _rows(batch)
        videos = _videos(batch, rows)
        keep = [i for i, v in enumerate(videos) if v is not None]
        out = list(batch["embedding"])
        if keep:
            for i, e in zip(keep, self.embedder([videos[i] for i in keep])):
                out[i] = e.astype(np.float16).tobytes()
        return {**batch, "embedding": _objects(out)}


# -- second pass: describe (annotate, motion), score, safety, recaption ----------------------------------------
def describe(batch, annotate_args: dict) -> dict:
    """Decode the clips that survived deduplication; annotate their motion (static, pan, object direction) and
    score it (the mean frame difference)."""
    torch.set_num_threads(1)
    rows, videos = _rows(batch), []
    for row, data, ext in zip(rows, batch["data"], batch["ext"]):
        frames = decode(data, ext)
        row |= {"annotation": annotate(frames, **annotate_args), "motion": frame_difference(frames)}
        videos.append(frames.tobytes())
    return {**_with_rows(batch, rows), "video": _objects(videos)}


class Score:
    """The aesthetic score: the configured rewards' components and their weighted sum, per clip."""

    def __init__(self, spec):
        torch.set_num_threads(1)
        self.reward = aesthetic_reward(spec)

    def __call__(self, batch) -> dict:
        rows = _rows(batch)
        for row, video in zip(rows, _videos(batch, rows)):
            clip = torch.from_numpy(video.copy()).permute(0, 3, 1, 2).float()[None] / 255
            with torch.no_grad():
                parts = {n: float(v) for n, v in self.reward.components(clip, [row["original_caption"]]).items()}
            row |= {**parts, "aesthetic": sum(self.reward.weights[n] * v for n, v in parts.items())}
        return _with_rows(batch, rows)


class Safety:
    """The safety filter (`stage.safety`, e.g. `safety.SafetyFilter`): clips scored at or over its threshold drop."""

    def __init__(self, cfg: dict):
        torch.set_num_threads(1)
        self.filter = instantiate(cfg, _convert_="all")

    def __call__(self, batch) -> dict:
        rows = _rows(batch)
        videos = _videos(batch, rows)
        keep = [i for i, v in enumerate(videos) if v is not None]
        for i, score in zip(keep, self.filter.scores([videos[i] for i in keep]) if keep else []):
            rows[i]["unsafe"] = score
            if score >= self.filter.threshold:
                rows[i] |= {"kept": False, "step": "safety", "reason": f"unsafe score {score:.3f}"}
        return _with_rows(batch, rows)


class Recaption:
    """The recaptioner (`stage.recaption`: the embedded attribute captioner, or a VLM) on the clips still in;
    it returns a caption, or {caption, attribute: value, ...}."""

    def __init__(self, cfg: dict):
        torch.set_num_threads(1)
        self.captioner = instantiate(cfg, _convert_="all")

    def __call__(self, batch) -> dict:
        rows = _rows(batch)
        videos = _videos(batch, rows)
        keep = [i for i, v in enumerate(videos) if v is not None]
        if keep:
            out = self.captioner([videos[i] for i in keep], [rows[i]["annotation"] for i in keep],
                                 [rows[i]["original_caption"] for i in keep])
            for i, new in zip(keep, out):
                rows[i] |= new if isinstance(new, dict) else {"caption": new}
        return _with_rows(batch, rows)
