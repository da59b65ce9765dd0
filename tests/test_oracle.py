import itertools

import numpy as np
import pytest
import torch

from lifecycle.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    caption,
    render_clip,
    sample_metadata,
)
from lifecycle.data.video_io import decode_video, encode_video
from lifecycle.data.oracle import (
    NONE,
    colour_votes,
    displacement,
    dominant_colour,
    motion_direction,
    parse_prompt,
    prompt_fidelity,
)


def to_tensor(clips):
    """uint8 (B, F, H, W, 3) numpy clips -> float (B, F, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255


def every_combination(seed=0):
    """One clip description per colour x direction x background x shape x size x speed."""
    rng = np.random.default_rng(seed)
    names = ["colour", "direction", "background", "shape", "size", "speed"]
    values = [COLOURS, DIRECTIONS, BACKGROUNDS, SHAPES, SIZES, SPEEDS]
    return [sample_metadata(rng, **dict(zip(names, combo)))
            for combo in itertools.product(*values)]


@pytest.mark.parametrize("size", [16, 32])
def test_ground_truth_clips_score_perfectly(size):
    metas = every_combination()
    videos = to_tensor([render_clip(m, frames=8, size=size) for m in metas])
    assert dominant_colour(videos) == [m["colour"] for m in metas]
    assert motion_direction(videos) == [m["direction"] for m in metas]
    scores = prompt_fidelity(videos, [caption(m) for m in metas])
    assert scores["n"] == len(metas) == 864
    assert scores["colour_accuracy"] == scores["direction_accuracy"] == scores["both_accuracy"] == 1.0


def test_ground_truth_survives_mp4_compression():
    metas = [sample_metadata(np.random.default_rng(i), colour=c, direction=d)
             for i, (c, d) in enumerate(itertools.product(COLOURS, DIRECTIONS))]
    clips = [decode_video(encode_video(render_clip(m, 8, 32), fmt="mp4")) for m in metas]
    scores = prompt_fidelity(to_tensor(clips), [caption(m) for m in metas])
    assert scores["both_accuracy"] == 1.0


def test_mismatched_prompts_score_zero():
    metas = every_combination()[::7]
    videos = to_tensor([render_clip(m, 8, 32) for m in metas])
    colours, directions = list(COLOURS), list(DIRECTIONS)
    wrong = [
        caption({**m,
                 "colour": colours[(colours.index(m["colour"]) + 1) % len(colours)],
                 "direction": directions[(directions.index(m["direction"]) + 1) % len(directions)]})
        for m in metas
    ]
    scores = prompt_fidelity(videos, wrong)
    assert scores["colour_accuracy"] == scores["direction_accuracy"] == scores["both_accuracy"] == 0.0


def test_colour_right_direction_wrong_scores_colour_only():
    meta = sample_metadata(np.random.default_rng(0), colour="yellow", direction="down")
    videos = to_tensor([render_clip(meta, 8, 32)])
    scores = prompt_fidelity(videos, [caption({**meta, "direction": "up"})])
    assert (scores["colour_accuracy"], scores["direction_accuracy"], scores["both_accuracy"]) == (1, 0, 0)


def test_noise_and_blank_videos_are_none_and_miss():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(4, 8, 3, 32, 32, generator=generator)
    blank = torch.full((4, 8, 3, 32, 32), 0.5)
    videos = torch.cat([noise, blank])
    assert dominant_colour(videos) == [NONE] * 8
    assert motion_direction(videos) == [NONE] * 8
    assert colour_votes(blank).sum() == 0
    prompts = [caption(m) for m in every_combination()[:8]]
    scores = prompt_fidelity(videos, prompts)
    assert scores["colour_accuracy"] == scores["direction_accuracy"] == 0.0


def test_static_object_has_colour_but_no_direction():
    meta = sample_metadata(np.random.default_rng(0), colour="blue")
    still = np.repeat(render_clip(meta, frames=1, size=32), 8, axis=0)
    videos = to_tensor([still])
    assert dominant_colour(videos) == ["blue"]
    assert motion_direction(videos) == [NONE]
    assert displacement(videos).abs().max() < 1e-6


def test_frames_without_the_object_are_left_out_of_the_fit():
    meta = {"colour": "red", "shape": "circle", "direction": "right", "size": "small",
            "speed": "quickly", "background": "silver", "x0": 0.2, "y0": 0.7}
    clip = render_clip(meta, 8, 32)
    clip[6:] = BACKGROUNDS["silver"]  # the object is gone in the last two frames
    assert motion_direction(to_tensor([clip])) == ["right"]
    np.testing.assert_allclose(displacement(to_tensor([clip]))[0], [0.6, 0.0], atol=0.02)


def test_direction_follows_the_dominant_axis():
    clip = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    for f in range(8):
        clip[f, 20 - 2 * f : 24 - 2 * f, 10 + f : 14 + f] = COLOURS["green"]  # mostly upward
    assert motion_direction(to_tensor([clip])) == ["up"]
    assert motion_direction(to_tensor([clip[:, :, ::-1]])) == ["up"]
    assert motion_direction(to_tensor([clip[:, ::-1]])) == ["down"]


def test_chance_levels_come_from_the_palette():
    meta = sample_metadata(np.random.default_rng(0))
    scores = prompt_fidelity(to_tensor([render_clip(meta, 4, 16)]), [caption(meta)])
    assert scores["chance_colour"] == pytest.approx(1 / 6)
    assert scores["chance_direction"] == pytest.approx(1 / 4)


def test_parse_prompt():
    assert parse_prompt("A large Magenta square moving UP quickly on a white background") == {
        "colour": "magenta", "direction": "up"}
    assert parse_prompt("a dog running") == {"colour": None, "direction": None}


def test_prompt_fidelity_rejects_unusable_input():
    videos = torch.zeros(2, 4, 3, 16, 16)
    with pytest.raises(ValueError, match="prompts"):
        prompt_fidelity(videos, ["a red circle moving left"])
    with pytest.raises(ValueError, match="colour or direction"):
        prompt_fidelity(videos, ["a red circle moving left", "a dog"])
    with pytest.raises(ValueError):
        dominant_colour(torch.zeros(2, 4, 16, 16, 3))
    with pytest.raises(TypeError):
        dominant_colour(torch.zeros(2, 4, 3, 16, 16, dtype=torch.uint8))
