"""Filters on decoded clips: pure functions returning why a clip is dropped ("<filter>: <detail>"), or None."""

import numpy as np


def size_filter(video: np.ndarray, min_resolution: int = 0, min_frames: int = 1, max_frames: int | None = None,
                max_aspect: float | None = None) -> str | None:
    """Drop clips whose shorter side is under `min_resolution` px, whose frame count is outside
    [`min_frames`, `max_frames`], or whose aspect ratio (long side / short side) exceeds `max_aspect`."""
    frames, height, width = video.shape[:3]
    if min(height, width) < min_resolution:
        return f"resolution: {width}x{height}, under {min_resolution} px"
    if frames < min_frames:
        return f"frames: {frames}, under {min_frames}"
    if max_frames is not None and frames > max_frames:
        return f"frames: {frames}, over {max_frames}"
    aspect = max(height, width) / min(height, width)
    if max_aspect is not None and aspect > max_aspect:
        return f"aspect: {aspect:.2f}, over {max_aspect}"
    return None
