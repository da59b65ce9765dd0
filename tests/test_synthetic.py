import colorsys
import itertools
import json
import os
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lifecycle.data import synthetic
from lifecycle.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    caption,
    prompt_metadata,
    render_clip,
    sample_metadata,
    trajectory,
    write_shards,
)
from lifecycle.data.video_io import (
    decode_video,
    encode_video,
    filmstrip,
    save_filmstrip_png,
    write_video,
)

META = {"colour": "green", "shape": "circle", "direction": "right", "size": "large",
        "speed": "quickly", "background": "gray", "x0": 0.2, "y0": 0.5}


def alpha(video, meta):
    """Per-pixel blend weight of the object colour over the background, (F, H, W)."""
    bg = np.array(BACKGROUNDS[meta["background"]], dtype=float)
    fg = np.array(COLOURS[meta["colour"]], dtype=float)
    return ((video - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))


def centroid(weight):
    """(x, y) weighted centre per frame, in frame fractions."""
    _, h, w = weight.shape
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    mass = weight.sum(axis=(1, 2))
    return np.stack([(weight.sum(1) * xs).sum(1), (weight.sum(2) * ys).sum(1)], 1) / mass[:, None]


def read_shards(urls):
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    return list(dataset)


def test_palette_is_six_even_hues_on_neutral_backgrounds():
    hues = sorted(colorsys.rgb_to_hsv(*(c / 255 for c in rgb)) for rgb in COLOURS.values())
    assert [round(h * 360) for h, _, _ in hues] == [0, 60, 120, 180, 240, 300]
    assert all(s == 1 and v == 1 for _, s, v in hues)
    assert all(len(set(rgb)) == 1 for rgb in BACKGROUNDS.values())


def test_sampled_paths_stay_inside_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(300):
        meta = sample_metadata(rng)
        radius = SIZES[meta["size"]]
        path = trajectory(meta, 2)
        assert (path - radius >= 0).all() and (path + radius <= 1).all(), meta
        travel = path[1] - path[0]
        assert np.isclose(np.abs(travel).sum(), SPEEDS[meta["speed"]])


def test_sample_metadata_honours_fixed_attributes_and_rejects_bad_ones():
    rng = np.random.default_rng(0)
    meta = sample_metadata(rng, colour="cyan", direction="up", shape="triangle")
    assert (meta["colour"], meta["direction"], meta["shape"]) == ("cyan", "up", "triangle")
    with pytest.raises(ValueError, match="purple"):
        sample_metadata(rng, colour="purple")
    with pytest.raises(ValueError, match="texture"):
        sample_metadata(rng, texture="wood")


def test_caption_names_every_attribute():
    assert caption(META) == "a large green circle moving right quickly on a gray background"


@pytest.mark.parametrize("background", list(BACKGROUNDS))
@pytest.mark.parametrize("shape", SHAPES)
def test_render_paints_object_colour_on_exact_background(shape, background):
    meta = {**META, "shape": shape, "background": background}
    video = render_clip(meta, frames=6, size=32)
    assert video.shape == (6, 32, 32, 3) and video.dtype == np.uint8

    bg, fg = BACKGROUNDS[background], COLOURS[meta["colour"]]
    pixels = video.reshape(-1, 3)
    assert (pixels == fg).all(1).sum() > 0.03 * len(pixels)
    # Every pixel is a blend between background and object colour (anti-aliased edges).
    a = alpha(video, meta)[..., None]
    blend = np.array(bg) + a * (np.array(fg) - np.array(bg))
    assert np.abs(video - blend).max() <= 1 and a.min() >= -0.01 and a.max() <= 1.01
    # Everything outside the shape's bounding box, padded by one pixel, is background.
    radius = SIZES[meta["size"]] * 32 + 1
    for frame, (x, y) in zip(video, trajectory(meta, 6) * 32):
        outside = np.ones((32, 32), dtype=bool)
        outside[max(0, int(y - radius)) : int(y + radius) + 1,
                max(0, int(x - radius)) : int(x + radius) + 1] = False
        assert (frame[outside] == bg).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_object_moves_in_its_direction(direction):
    meta = sample_metadata(np.random.default_rng(1), direction=direction, shape="circle")
    centres = centroid(alpha(render_clip(meta, frames=8, size=32), meta))
    travel = centres[-1] - centres[0]
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    np.testing.assert_allclose(travel, np.array(step) * SPEEDS[meta["speed"]], atol=0.02)
    assert (np.diff(centres, axis=0) @ step > 0).all()  # moves a little every frame


def test_same_metadata_agrees_across_resolutions():
    rng = np.random.default_rng(2)
    for _ in range(20):
        meta = sample_metadata(rng)
        large = render_clip(meta, 8, 32).astype(float)
        small = render_clip(meta, 8, 16).astype(float)
        pooled = large.reshape(8, 16, 2, 16, 2, 3).mean(axis=(2, 4))
        assert np.abs(pooled - small).mean() < 6
        np.testing.assert_allclose(
            centroid(alpha(large, meta)), centroid(alpha(small, meta)), atol=0.025
        )


def test_prompt_metadata_covers_colour_direction_pairs_evenly():
    prompts = prompt_metadata(seed=3)
    pairs = Counter((p["colour"], p["direction"]) for p in prompts)
    assert set(pairs) == set(itertools.product(COLOURS, DIRECTIONS))
    assert set(pairs.values()) == {1}
    half = prompt_metadata(seed=3, n=12)
    assert set(Counter(p["colour"] for p in half).values()) == {2}
    assert set(Counter(p["direction"] for p in half).values()) == {3}
    assert prompts == prompt_metadata(seed=3)
    assert all(p["caption"] == caption(p) for p in prompts)
    assert len({p["caption"] for p in prompt_metadata(seed=3, n=48)}) > 24


def test_write_shards_round_trip(tmp_path):
    urls = write_shards(tmp_path / "ds", num_clips=5, clips_per_shard=2, frames=4, size=16,
                        seed=7, progress=False)
    assert [os.path.basename(u) for u in urls] == [f"shard-00000{i}.tar" for i in range(3)]
    samples = read_shards(urls)
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(5)]
    rng = np.random.default_rng(7)
    for sample in samples:
        meta = dict(sample["json"])
        assert meta.pop("caption") == caption(meta)
        assert meta == sample_metadata(rng)
        np.testing.assert_array_equal(sample["npy"], render_clip(meta, 4, 16))
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["num_clips"] == 5 and len(manifest["shards"]) == 3


def test_write_shards_is_deterministic_and_reused(tmp_path):
    kwargs = dict(num_clips=3, clips_per_shard=2, frames=2, size=8, seed=1, progress=False)
    first = write_shards(tmp_path / "a", **kwargs)
    other = write_shards(tmp_path / "b", **kwargs)
    assert [open(u, "rb").read() for u in first] == [open(u, "rb").read() for u in other]

    files = sorted((tmp_path / "a").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert write_shards(tmp_path / "a", **kwargs) == first
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "a").iterdir())] == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging leftovers

    with pytest.raises(ValueError, match="delete it"):
        write_shards(tmp_path / "a", **{**kwargs, "seed": 2})


@pytest.mark.parametrize("bad", [
    {"num_clips": 0}, {"num_clips": -3}, {"clips_per_shard": 0}, {"frames": 0},
    {"size": 0}, {"video_format": "avi"},
])
def test_write_shards_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        write_shards(tmp_path / "ds", **{"num_clips": 2, "progress": False, **bad})
    assert not any(tmp_path.iterdir())


def test_write_shards_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    calls = []

    def failing_render(meta, frames, size):
        calls.append(meta)
        if len(calls) == 3:
            raise RuntimeError("crash")
        return render_clip(meta, frames, size)

    monkeypatch.setattr(synthetic, "render_clip", failing_render)
    with pytest.raises(RuntimeError, match="crash"):
        write_shards(tmp_path / "ds", num_clips=4, clips_per_shard=2, frames=2, size=8,
                     progress=False)
    assert not any(tmp_path.iterdir())


def test_write_shards_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_shards(tmp_path / "ds", num_clips=1, progress=False)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["notes.txt"]


def test_write_shards_mp4_decodes_to_close_colours(tmp_path):
    urls = write_shards(tmp_path / "ds", num_clips=3, frames=8, size=32, seed=4,
                        video_format="mp4", progress=False)
    for sample in read_shards(urls):
        meta = {k: v for k, v in sample["json"].items() if k != "caption"}
        video = decode_video(sample["mp4"])
        expected = render_clip(meta, 8, 32)
        assert video.shape == expected.shape
        assert np.abs(video.astype(int) - expected).mean() < 6
        # yuv420p halves chroma resolution, so judge the object's mean colour.
        mean = video[alpha(expected, meta) == 1].mean(0)
        nearest = min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())
        assert nearest == meta["colour"]


@pytest.mark.parametrize("fmt, tolerance", [("mp4", 6), ("webm", 6), ("gif", 1)])
def test_encode_decode_round_trip(fmt, tolerance):
    video = render_clip(META, frames=8, size=32)
    decoded = decode_video(encode_video(video, fmt=fmt))
    assert decoded.shape == video.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - video).mean() < tolerance


def test_mp4_pads_odd_sizes():
    video = render_clip(META, frames=3, size=31)
    decoded = decode_video(encode_video(video, fmt="mp4"))
    assert decoded.shape == (3, 32, 32, 3)
    assert np.abs(decoded[:, :31, :31].astype(int) - video).mean() < 6
    edge = decoded.astype(int)
    assert np.abs(edge[:, 31] - edge[:, 30]).mean() < 4  # padding replicates the last row
    assert np.abs(edge[:, :, 31] - edge[:, :, 30]).mean() < 4


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 50])
def test_decode_rejects_garbage(data):
    with pytest.raises(ValueError):
        decode_video(data)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_video(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_video(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="avi"):
        encode_video(np.zeros((2, 8, 8, 3), dtype=np.uint8), fmt="avi")


def test_write_video_by_suffix(tmp_path):
    video = render_clip(META, frames=4, size=16)
    for name in ["clip.mp4", "clip.gif"]:
        write_video(tmp_path / name, video)
        assert decode_video((tmp_path / name).read_bytes()).shape == video.shape
    with pytest.raises(ValueError):
        write_video(tmp_path / "clip.avi", video)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]


def test_filmstrip_layout(tmp_path):
    videos = [render_clip(META, 3, 8), render_clip({**META, "colour": "red"}, 2, 8)]
    plain = filmstrip(videos, scale=4)
    gap = 4
    assert plain.size == (3 * (8 * 4 + gap) + gap, 2 * (8 * 4 + gap) + gap)
    pixels = np.asarray(plain)
    # Frame 1 of video 0, nearest-neighbour upscaled, sits in row 0 column 1.
    left = gap + (8 * 4 + gap)
    np.testing.assert_array_equal(pixels[gap : gap + 32 : 4, left : left + 32 : 4], videos[0][1])

    save_filmstrip_png(tmp_path / "strip.png", videos, labels=["green", "a much longer label"])
    with Image.open(tmp_path / "strip.png") as image:
        assert image.format == "PNG" and image.height > plain.height
    with pytest.raises(ValueError):
        filmstrip(videos, labels=["only one"])
