"""The synthetic world: one coloured shape moving across a plain neutral background.

Every clip is fully described by a small metadata dict, so captions are exact and
prompt fidelity can be scored from pixels alone (see ``lifecycle.data.oracle``).
Positions and sizes are fractions of the frame, so a clip renders at any resolution.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from lifecycle.data.staging import write_once
from lifecycle.data.video_io import encode_video

HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
COLOURS = {
    name: tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue / 360, 1.0, 1.0))
    for name, hue in HUES.items()
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
SIZES = {"small": 0.12, "large": 0.2}
SPEEDS = {"slowly": 0.3, "quickly": 0.6}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (96, 96, 96), "silver": (168, 168, 168)}

ATTRIBUTES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "direction": DIRECTIONS,
    "size": tuple(SIZES),
    "speed": tuple(SPEEDS),
    "background": tuple(BACKGROUNDS),
}
VIDEO_FORMATS = ("npy", "mp4")
MANIFEST = "dataset.json"

# Unit step per direction in image coordinates (x right, y down).
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_SUPERSAMPLE = 2
# Paths pass near the frame centre: the caption nearly fixes where the object is, so a tiny
# model learns colour and motion in minutes instead of first having to pick a position.
POSITION_JITTER = 0.1


def sample_metadata(rng: np.random.Generator, **fixed: str) -> dict:
    """Draw one clip description; ``fixed`` pins any attribute, e.g. ``colour="red"``.

    The start position (``x0``, ``y0``, fractions of the frame) is drawn so that the
    path's midpoint lies within ``POSITION_JITTER`` of the frame centre and the whole
    shape stays inside the frame for the whole clip.
    """
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; expected {list(ATTRIBUTES)}")
    meta = {}
    for name, choices in ATTRIBUTES.items():
        value = fixed.get(name, choices[rng.integers(len(choices))])
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {choices}")
        meta[name] = value
    radius, distance = SIZES[meta["size"]], SPEEDS[meta["speed"]]
    for axis, step in zip(("x0", "y0"), _STEPS[meta["direction"]]):
        half = step * distance / 2  # the path runs from midpoint - half to midpoint + half
        low = max(radius + abs(half), 0.5 - POSITION_JITTER)
        high = min(1.0 - radius - abs(half), 0.5 + POSITION_JITTER)
        meta[axis] = float(rng.uniform(low, high)) - half
    return meta


def caption(meta: dict) -> str:
    """Describe a clip, e.g. "a small red circle moving left slowly on a black background"."""
    return (
        f"a {meta['size']} {meta['colour']} {meta['shape']} moving {meta['direction']} "
        f"{meta['speed']} on a {meta['background']} background"
    )


def trajectory(meta: dict, frames: int) -> np.ndarray:
    """Centre of the shape per frame, (frames, 2) as (x, y) fractions of the frame."""
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    step = np.array(_STEPS[meta["direction"]], dtype=np.float64)
    return np.array([meta["x0"], meta["y0"]]) + np.outer(t, step) * SPEEDS[meta["speed"]]


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean inside-test of a shape centred at the origin, bounded by ``radius``."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= radius
    if shape == "triangle":  # equilateral, pointing up, circumradius ``radius``
        half_in = radius / 2
        side = math.sqrt(3) / 2 * np.abs(dx) - dy / 2
        return (dy <= half_in) & (side <= half_in)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_clip(meta: dict, frames: int = 8, size: int = 32) -> np.ndarray:
    """Render ``meta`` as a uint8 (frames, size, size, 3) clip, anti-aliased by 2x supersampling."""
    if frames <= 0 or size <= 0:
        raise ValueError(f"frames and size must be positive, got {frames=} {size=}")
    fine = size * _SUPERSAMPLE
    grid = (np.arange(fine) + 0.5) / fine
    centres = trajectory(meta, frames)
    dx = grid[None, None, :] - centres[:, 0, None, None]
    dy = grid[None, :, None] - centres[:, 1, None, None]
    inside = _coverage(meta["shape"], dx, dy, SIZES[meta["size"]])
    alpha = inside.reshape(frames, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))
    background = np.array(BACKGROUNDS[meta["background"]], dtype=np.float64)
    colour = np.array(COLOURS[meta["colour"]], dtype=np.float64)
    video = background + alpha[..., None] * (colour - background)
    return np.rint(video).astype(np.uint8)


def prompt_metadata(seed: int = 0, n: int | None = None) -> list[dict]:
    """Deterministic evaluation prompts: metadata plus ``caption``.

    Colour and direction cycle so that every combination appears once per
    ``len(COLOURS) * len(DIRECTIONS)`` prompts (the default ``n``) and any prefix is
    close to balanced; the remaining attributes are drawn at random from ``seed``.
    """
    colours, directions = ATTRIBUTES["colour"], DIRECTIONS
    n = len(colours) * len(directions) if n is None else n
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    # Shift the direction by one after each full (colour, direction) cycle of
    # length lcm so that the shifted cycles reach the remaining combinations.
    period = math.lcm(len(colours), len(directions))
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        meta = sample_metadata(
            rng,
            colour=colours[i % len(colours)],
            direction=directions[(i + i // period) % len(directions)],
        )
        prompts.append({**meta, "caption": caption(meta)})
    return prompts


def _check_args(num_clips, clips_per_shard, frames, size, video_format) -> None:
    for name, value in [("num_clips", num_clips), ("clips_per_shard", clips_per_shard),
                        ("frames", frames), ("size", size)]:
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")


def _write_into(directory: Path, params: dict, progress: bool) -> None:
    """Render and write all shards plus the manifest into ``directory``."""
    rng = np.random.default_rng(params["seed"])
    num_clips, per_shard = params["num_clips"], params["clips_per_shard"]
    names = []
    with tqdm(total=num_clips, desc="synthetic clips", unit="clip", disable=not progress) as bar:
        for start in range(0, num_clips, per_shard):
            names.append(f"shard-{len(names):06d}.tar")
            with wds.TarWriter(str(directory / names[-1]), mtime=0) as sink:
                for index in range(start, min(start + per_shard, num_clips)):
                    meta = sample_metadata(rng)
                    video = render_clip(meta, params["frames"], params["size"])
                    payload = encode_video(video) if params["video_format"] == "mp4" else video
                    sink.write({
                        "__key__": f"{index:08d}",
                        params["video_format"]: payload,
                        "json": {**meta, "caption": caption(meta)},
                    })
                    bar.update()
    (directory / MANIFEST).write_text(json.dumps({**params, "shards": names}, indent=2))


def write_shards(
    out_dir: str | os.PathLike,
    num_clips: int,
    clips_per_shard: int = 500,
    frames: int = 8,
    size: int = 32,
    seed: int = 0,
    video_format: str = "npy",
    progress: bool = True,
) -> list[str]:
    """Write the synthetic world as webdataset shards ``shard-000000.tar``, ... in ``out_dir``.

    Each sample holds ``__key__``, the clip under ``npy`` (uint8 F,H,W,3) or ``mp4``
    (encoded bytes), and ``json`` (metadata plus ``caption``). The dataset is built in a
    temporary sibling directory and renamed into place, with the manifest
    ``dataset.json`` written last; a complete dataset with the same parameters is reused
    as is. Returns the shard paths.

    Raises ValueError for bad arguments or when ``out_dir`` holds a dataset built with
    other parameters, and FileExistsError when it holds other files.
    """
    _check_args(num_clips, clips_per_shard, frames, size, video_format)
    params = {"num_clips": num_clips, "clips_per_shard": clips_per_shard, "frames": frames,
              "size": size, "seed": seed, "video_format": video_format,
              "position_jitter": POSITION_JITTER}
    done = write_once(out_dir, MANIFEST, params, lambda staging: _write_into(staging, params, progress))
    return [str(Path(out_dir) / name) for name in done["shards"]]
