"""Video files in and out: encode/decode bytes, write files, and save PNG filmstrips.

Frames are uint8 numpy arrays of shape (F, H, W, 3).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# container format, codec, codec options
_PYAV_CODECS = {
    "mp4": ("mp4", "libx264", {"crf": "18"}),
    "webm": ("webm", "libvpx-vp9", {"crf": "20", "b:v": "0"}),
}
FORMATS = (*_PYAV_CODECS, "gif")
_CANVAS_GREY = 200  # distinct from the black, gray and silver backgrounds


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not frames.size:
        raise ValueError(
            f"expected non-empty uint8 frames of shape (F, H, W, 3), "
            f"got {frames.dtype} {frames.shape}"
        )
    return frames


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Replicate the last row/column where H or W is odd (yuv420p needs even sizes)."""
    _, height, width, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _encode_pyav(frames: np.ndarray, fmt: str, fps: int, comment: str | None) -> bytes:
    container_format, codec, options = _PYAV_CODECS[fmt]
    frames = _pad_to_even(frames)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def encode_video(frames: np.ndarray, fmt: str = "mp4", fps: int = 8, comment: str | None = None) -> bytes:
    """Encode uint8 (F, H, W, 3) frames as ``mp4`` (H.264), ``webm`` (VP9) or ``gif`` bytes.

    mp4 and webm use yuv420p: odd heights/widths are padded by one replicated
    row/column. The GIF writer merges identical consecutive frames. ``comment``, when
    given, is stored as the container's ``comment`` tag (the GIF comment extension).
    """
    frames = _check_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if fmt == "gif":
        extra = {} if comment is None else {"comment": comment}
        return iio.imwrite(
            "<bytes>", frames, extension=".gif", plugin="pillow", duration=1000 / fps, loop=0, **extra
        )
    if fmt not in _PYAV_CODECS:
        raise ValueError(f"unknown video format {fmt!r}; expected one of {FORMATS}")
    return _encode_pyav(frames, fmt, fps, comment)


def decode_video(data: bytes) -> np.ndarray:
    """Decode mp4, webm or gif bytes into uint8 (F, H, W, 3) RGB frames."""
    if not data:
        raise ValueError("cannot decode an empty byte string as video")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("data holds no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot decode video ({len(data)} bytes): {error}") from error
    if not frames:
        raise ValueError("video stream holds no frames")
    return np.stack(frames)


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes (png, jpeg, webp, ...) into a one-frame uint8 (1, H, W, 3) clip."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))[None]
    except OSError as error:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {error}") from error


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: a race with threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration):  # not Linux (or a kernel before 4.7)
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling file, then rename it onto ``path``. The file gets the mode an
    ordinary write would (0666 less the umask), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, comment: str | None = None) -> None:
    """Write frames to ``path``; the suffix (.mp4, .webm, .gif) picks the format (``comment``: see encode_video)."""
    path = Path(path)
    write_atomically(path, encode_video(frames, fmt=path.suffix.lower().lstrip("."), fps=fps, comment=comment))


def filmstrip(
    videos: Sequence[np.ndarray], labels: Sequence[str] | None = None, scale: int = 4
) -> Image.Image:
    """One row per video, frames left to right, upscaled ``scale`` times (nearest neighbour).

    A label, when given, is drawn above its row (the image widens to fit it). Gaps and
    the padding of shorter rows or smaller frames use a light grey canvas.
    """
    videos = [_check_frames(v) for v in videos]
    if not videos:
        raise ValueError("need at least one video")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"got {len(labels)} labels for {len(videos)} videos")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    gap = scale
    font = ImageFont.load_default()
    label_height = font.getbbox("Ag")[3] + 2 if labels is not None else 0
    cell_h = max(v.shape[1] for v in videos) * scale
    cell_w = max(v.shape[2] for v in videos) * scale
    row_h = label_height + cell_h + gap
    width = max(len(v) for v in videos) * (cell_w + gap) + gap
    if labels is not None:
        width = max(width, *(round(font.getlength(str(label))) + 2 * gap for label in labels))
    canvas = np.full((len(videos) * row_h + gap, width, 3), _CANVAS_GREY, dtype=np.uint8)
    for row, video in enumerate(videos):
        top = row * row_h + gap + label_height
        big = video.repeat(scale, axis=1).repeat(scale, axis=2)
        for index, frame in enumerate(big):
            left = gap + index * (cell_w + gap)
            canvas[top : top + frame.shape[0], left : left + frame.shape[1]] = frame
    image = Image.fromarray(canvas)
    if labels is not None:
        draw = ImageDraw.Draw(image)
        for row, label in enumerate(labels):
            draw.text((gap, row * row_h + gap), str(label), fill=(0, 0, 0), font=font)
    return image


def save_filmstrip_png(
    path: str | os.PathLike,
    videos: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    scale: int = 4,
) -> None:
    """Save :func:`filmstrip` of ``videos`` as a PNG at ``path`` (written atomically)."""
    buffer = io.BytesIO()
    filmstrip(videos, labels, scale).save(buffer, format="PNG")
    write_atomically(Path(path), buffer.getvalue())
