import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lifecycle.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    caption,
    render_clip,
    sample_metadata,
)
from lifecycle.data.oracle import dominant_colour, motion_direction
from lifecycle.rewards.base import build_reward
from lifecycle.rewards.synthetic import (
    HUE_EPS,
    MASS_EPS,
    UNIT_DIRECTIONS,
    ColourReward,
    MotionReward,
    VividReward,
    soft_displacement,
)

from .helpers import CONF_DIR

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PROMPT = "a small red circle moving right slowly on a black background"


def to_tensor(clips):
    """uint8 (B, F, H, W, 3) numpy clips -> float (B, F, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255


@pytest.fixture(scope="module")
def world():
    """One clip per colour x background (18), shapes in turn, random direction, size and speed."""
    rng = np.random.default_rng(0)
    metas = [sample_metadata(rng, colour=c, background=b, shape=SHAPES[i % len(SHAPES)])
             for i, (c, b) in enumerate(itertools.product(COLOURS, BACKGROUNDS))]
    return metas, to_tensor([render_clip(m, 8, 32) for m in metas])


def scores_per_option(reward, metas, videos, key, options):
    """reward of every clip against its caption with ``key`` replaced by each option, (B, len(options))."""
    return torch.stack([reward(videos, [caption({**m, key: o}) for m in metas]) for o in options], dim=1)


def test_colour_prefers_the_clips_own_colour_and_agrees_with_the_oracle(world):
    metas, videos = world
    names = list(COLOURS)
    scores = scores_per_option(ColourReward(), metas, videos, "colour", names)
    own = torch.tensor([names.index(m["colour"]) for m in metas])
    own_score = scores[torch.arange(len(metas)), own]
    assert own_score.min() > 0.98
    wrong = scores.scatter(1, own[:, None], -1.0)
    assert wrong.max() < 0.2
    assert (own_score > wrong.max(dim=1).values).all()
    assert [names[i] for i in scores.argmax(dim=1)] == dominant_colour(videos) == [m["colour"] for m in metas]
    assert ((scores >= 0) & (scores <= 1)).all()


def test_motion_prefers_the_clips_own_direction_and_agrees_with_the_oracle(world):
    metas, videos = world
    reward = MotionReward()
    scores = scores_per_option(reward, metas, videos, "direction", DIRECTIONS)
    own = reward(videos, [caption(m) for m in metas])
    opposite = reward(videos, [caption({**m, "direction": OPPOSITE[m["direction"]]}) for m in metas])
    torch.testing.assert_close(opposite, -own)
    expected = torch.tensor([math.tanh(SPEEDS[m["speed"]] / reward.displacement_scale) for m in metas])
    torch.testing.assert_close(own, expected, atol=0.02, rtol=0)
    assert [DIRECTIONS[i] for i in scores.argmax(dim=1)] == motion_direction(videos)
    assert motion_direction(videos) == [m["direction"] for m in metas]
    assert set(UNIT_DIRECTIONS) == set(DIRECTIONS)


def test_static_clip_has_its_colour_but_no_motion():
    meta = sample_metadata(np.random.default_rng(1), colour="blue", background="gray")
    videos = to_tensor([np.repeat(render_clip(meta, frames=1, size=32), 8, axis=0)])
    prompts = [caption(meta)]
    assert MotionReward()(videos, prompts).abs().item() < 1e-4
    assert ColourReward()(videos, prompts).item() > 0.98


def test_frames_without_the_object_drop_out_of_the_motion_fit():
    meta = {"colour": "red", "shape": "circle", "direction": "right", "size": "small",
            "speed": "quickly", "background": "silver", "x0": 0.2, "y0": 0.7}
    clip = render_clip(meta, 8, 32)
    clip[6:] = BACKGROUNDS["silver"]
    torch.testing.assert_close(soft_displacement(to_tensor([clip]), 0.05)[0],
                               torch.tensor([0.6, 0.0]), atol=0.02, rtol=0)


def tiny_video():
    """2 frames of 4x4 black, one pure red pixel at row 1 moving from column 1 to column 2."""
    video = torch.zeros(1, 2, 3, 4, 4, dtype=torch.float64)
    video[0, 0, 0, 1, 1] = video[0, 1, 0, 1, 2] = 1.0
    return video


def test_hand_computed_values_on_a_tiny_video():
    video = tiny_video()
    w = 1 / (1 + math.exp(-(1 - 0.2) / 0.05))  # object weight of the red pixel (chroma 1)
    share = 2 * w / 32  # mean object weight: one red pixel in each 16-pixel frame

    def colour(cos_offset):
        match = math.exp(4.0 * (cos_offset / math.sqrt(1 + HUE_EPS**2) - 1))
        return share * match / (share + MASS_EPS)

    reward = ColourReward(chroma_temperature=0.05, hue_concentration=4.0)
    assert reward(video, ["a red dot"]).item() == pytest.approx(colour(1.0), rel=1e-6)
    assert reward(video, ["a blue dot"]).item() == pytest.approx(colour(-0.5), rel=1e-5)
    assert reward(video, ["a yellow dot"]).item() == pytest.approx(colour(0.5), rel=1e-5)

    mass = w / 16  # per frame
    x0, x1 = ((mass * (col + 0.5) / 4 + MASS_EPS / 2) / (mass + MASS_EPS) for col in (1, 2))
    presence = mass / (mass + MASS_EPS)
    variance = 2 * presence * 0.5**2
    travel = (x1 - x0) * variance / (variance + 1e-8)
    motion = MotionReward(chroma_temperature=0.05, displacement_scale=0.3)
    assert motion(video, ["moving right"]).item() == pytest.approx(math.tanh(travel / 0.3), rel=1e-6)
    assert motion(video, ["moving left"]).item() == pytest.approx(-math.tanh(travel / 0.3), rel=1e-6)
    assert motion(video, ["moving up"]).item() == pytest.approx(0.0, abs=1e-9)

    background = 1 - w  # background mask of the red pixel; the 30 black pixels have mask ~1
    background_luma = 2 * background * 0.299 / (30 / (1 + math.exp(-0.2 / 0.05)) + 2 * background)
    vivid = share * (1 + 0.299 - background_luma) / 2 / (share + MASS_EPS)
    assert VividReward(chroma_temperature=0.05)(video, ["anything"]).item() == pytest.approx(vivid, rel=1e-6)


@pytest.mark.parametrize("reward", [ColourReward(), MotionReward(), VividReward()], ids=lambda r: type(r).__name__)
def test_gradients_are_finite_on_blank_videos_and_nonzero_with_an_object(reward, world):
    metas, clips = world
    generator = torch.Generator().manual_seed(0)
    blank = torch.cat([
        torch.zeros(1, 8, 3, 32, 32),
        torch.full((1, 8, 3, 32, 32), 0.5),
        0.5 + 1e-6 * torch.randn(1, 8, 3, 32, 32, generator=generator),
    ])
    for videos, prompts in [(blank, [PROMPT] * 3), (clips[:4], [caption(m) for m in metas[:4]])]:
        videos = videos.clone().requires_grad_()
        score = reward(videos, prompts)
        (grad,) = torch.autograd.grad(score.sum(), videos)
        assert torch.isfinite(score).all() and torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().amax(dim=1) > 0).all()  # the clips with an object
    assert reward(blank, [PROMPT] * 3).abs().max() < 1e-3


@pytest.mark.parametrize("reward", [ColourReward(), MotionReward()], ids=lambda r: type(r).__name__)
def test_gradient_ascent_on_pixels_raises_the_reward(reward):
    generator = torch.Generator().manual_seed(0)
    videos = (0.5 + 0.05 * torch.randn(1, 8, 3, 32, 32, generator=generator)).requires_grad_()
    optimiser = torch.optim.Adam([videos], lr=0.02)
    start = reward(videos, [PROMPT]).item()
    for _ in range(15):
        optimiser.zero_grad()
        (-reward(videos, [PROMPT])).sum().backward()
        optimiser.step()
        with torch.no_grad():
            videos.clamp_(0, 1)
    assert start < 0.3
    assert reward(videos, [PROMPT]).item() > start + 0.5


def test_vivid_prefers_saturated_contrasting_objects_and_ignores_the_prompt():
    meta = sample_metadata(np.random.default_rng(2), colour="yellow", background="black")
    vivid = to_tensor([render_clip(meta, 8, 32)])
    dull = 0.3 * vivid + 0.7 * 0.2  # the same clip faded towards a dark grey
    reward = VividReward()
    scores = reward(torch.cat([vivid, dull]), ["a yellow square", "a yellow square"])
    assert scores[0] > 0.85 and scores[1] < 0.5
    torch.testing.assert_close(reward(vivid, ["a dog"]), scores[:1])


def test_prompts_without_the_needed_word_are_rejected():
    videos = torch.zeros(2, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="colour word.*a dog"):
        ColourReward()(videos, ["a red circle", "a dog"])
    with pytest.raises(ValueError, match="direction word.*a red circle"):
        MotionReward()(videos, ["a red circle", "moving up"])
    with pytest.raises(ValueError, match="prompts"):
        ColourReward()(videos, ["a red circle"])


def test_configs_build_the_rewards_with_their_defaults():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+reward=[colour,motion,vivid]", "reward.motion.weight=0.5"])
    reward = build_reward(cfg.reward)
    assert reward.weights == {"colour": 1.0, "motion": 0.5, "vivid": 1.0}
    assert reward.differentiable
    for name, cls in {"colour": ColourReward, "motion": MotionReward, "vivid": VividReward}.items():
        path = Path(CONF_DIR) / "reward" / f"{name}.yaml"
        assert path.read_text().splitlines()[0] == f"# @package reward.{name}"
        settings = {k: v for k, v in OmegaConf.load(path).items() if k not in ("_target_", "weight")}
        assert settings and type(reward.terms[name]) is cls
        for key, value in settings.items():
            assert getattr(reward.terms[name], key) == value == getattr(cls(), key)
