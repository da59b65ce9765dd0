"""Temporal annotations read from pixels: a static shot, a camera pan, or an object moving in a direction.

Frames are uint8 (F, H, W, 3). Directions are in image terms (x right, y down): an object "moving left"
travels towards x = 0; a camera "panning left" makes the scene travel right across the frame.
"""

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")


def gray(video: np.ndarray) -> np.ndarray:
    """(F, H, W) luma in [0, 1] (ITU-R BT.601 weights)."""
    return video.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255


def frame_difference(video: np.ndarray) -> float:
    """The motion score: mean absolute luma change between consecutive frames, in [0, 1]; 0 for one frame."""
    g = gray(video)
    return float(np.abs(np.diff(g, axis=0)).mean()) if len(g) > 1 else 0.0


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel colour distance in [0, 1]: the largest channel difference (luma alone misses a magenta
    object on a grey of the same brightness)."""
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=-1) / 255


def direction(dx: float, dy: float) -> str:
    """The dominant axis of a travel (dx, dy) as left / right / up / down."""
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def global_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The whole-pixel (dx, dy) that best maps luma frame `a` onto `b`, by phase correlation."""
    cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    y, x = np.unravel_index(int(np.argmax(corr)), corr.shape)
    h, w = corr.shape
    return int(x - w if x > w // 2 else x), int(y - h if y > h // 2 else y)


def object_travel(video: np.ndarray, threshold: float) -> tuple[float, float]:
    """Least-squares (dx, dy) travel over the clip, in frame fractions, of the centroid of the pixels that differ
    from the clip's temporal median (the static background) by more than `threshold`."""
    fg = _distance(video, np.median(video, axis=0)) > threshold
    mass = fg.sum(axis=(1, 2))
    present = mass > 0
    if present.sum() < 2:
        return 0.0, 0.0
    f, h, w = fg.shape
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    cx = (fg.sum(axis=1) * xs).sum(axis=1)[present] / mass[present]
    cy = (fg.sum(axis=2) * ys).sum(axis=1)[present] / mass[present]
    t = np.linspace(0.0, 1.0, f)[present]
    return float(np.polyfit(t, cx, 1)[0]), float(np.polyfit(t, cy, 1)[0])


def annotate(video: np.ndarray, pixel_threshold: float = 0.05, static_fraction: float = 0.002,
             pan_fraction: float = 0.5, min_travel: float = 0.05) -> dict:
    """{motion: static | panning | object, direction: left/right/up/down or None, travel: frame fractions}.

    A pixel changes between consecutive frames when a channel moves by more than `pixel_threshold`. Fewer than
    `static_fraction` of pixels changing on average is a static shot; more than `pan_fraction` is a camera pan
    (its direction from the summed phase-correlation shifts); anything between is object motion, whose
    direction is the foreground centroid's fitted travel, given when it covers at least `min_travel` of the frame.
    """
    if len(video) < 2:
        return {"motion": "static", "direction": None, "travel": 0.0}
    changed = float((_distance(video[1:], video[:-1]) > pixel_threshold).mean())
    if changed < static_fraction:
        return {"motion": "static", "direction": None, "travel": 0.0}
    if changed > pan_fraction:
        g = gray(video)
        shifts = np.array([global_shift(a, b) for a, b in zip(g[:-1], g[1:])]).sum(axis=0)
        dx, dy = -shifts[0] / g.shape[2], -shifts[1] / g.shape[1]  # the camera moves against the scene
        motion = "panning"
    else:
        dx, dy = object_travel(video, pixel_threshold)
        motion = "object"
    travel = float(np.hypot(dx, dy))
    return {"motion": motion, "direction": direction(dx, dy) if travel >= min_travel else None, "travel": travel}


def describe_motion(annotation: dict) -> str:
    """The annotation as a caption phrase: "a static shot", "the camera pans left", "moving left"."""
    motion, where = annotation["motion"], annotation.get("direction")
    if motion == "static":
        return "a static shot"
    if motion == "panning":
        return f"the camera pans {where}" if where else "the camera moves"
    return f"moving {where}" if where else "moving in place"
