"""Video rewards on transformers backbones (YOLOS object, VideoMAE action, V-JEPA 2), with tiny random models."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import (
    VideoMAEConfig,
    VideoMAEForVideoClassification,
    VJEPA2Config,
    VJEPA2Model,
    YolosConfig,
    YolosForObjectDetection,
)

from lifecycle.rewards.action import ActionReward
from lifecycle.rewards.base import build_reward
from lifecycle.rewards.detector import ObjectReward
from lifecycle.rewards.frames import resample_frames, resolve_label
from lifecycle.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
from lifecycle.rewards.vjepa import VJEPAReward

CONF = Path(__file__).resolve().parents[1] / "conf" / "reward"
LABELS = {0: "cat", 1: "dog", 2: "book"}
ACTIONS = {0: "running", 1: "jumping", 2: "playing guitar"}


def tiny(tmp_path_factory, name, model_cls, config, edit=lambda model: None):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    model = model_cls(config)
    edit(model)
    model.save_pretrained(path)
    return str(path)


def scramble_final_norm(model):
    """A fresh encoder's final LayerNorm is the identity affine, which would make V-JEPA's target
    normalisation a no-op; trained ones are not."""
    with torch.no_grad():
        model.encoder.layernorm.weight.uniform_(0.5, 2.0)
        model.encoder.layernorm.bias.normal_(0.0, 0.5)


@pytest.fixture(scope="module")
def yolos_dir(tmp_path_factory):
    config = YolosConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[32, 48],
        patch_size=8, num_detection_tokens=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    return tiny(tmp_path_factory, "yolos", YolosForObjectDetection, config)


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory):
    config = VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, id2label=ACTIONS, label2id={v: k for k, v in ACTIONS.items()},
    )  # fmt: skip
    return tiny(tmp_path_factory, "videomae", VideoMAEForVideoClassification, config)


@pytest.fixture(scope="module")
def vjepa_dir(tmp_path_factory):
    config = VJEPA2Config(
        patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2, hidden_size=48, num_attention_heads=2,
        num_hidden_layers=2, pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=2,
        pred_num_mask_tokens=2, num_pooler_layers=1,
    )  # fmt: skip
    return tiny(tmp_path_factory, "vjepa", VJEPA2Model, config, scramble_final_norm)


def clip(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def assert_reward_basics(reward, videos):
    """(B,) finite scores, gradients reach every video, none reach the frozen backbone."""
    videos = videos.clone().requires_grad_(True)
    score = reward(videos, [""] * len(videos))
    assert score.shape == (len(videos),) and torch.isfinite(score).all()
    score.sum().backward()
    assert videos.grad is not None and (videos.grad.flatten(1).abs().sum(1) > 0).all()
    assert reward.differentiable and not any(p.requires_grad for p in reward.parameters())
    return score.detach()


# --- shared helpers ---------------------------------------------------------------


def test_resample_frames_spreads_and_repeats_with_gradients():
    video = torch.arange(5.0).view(1, 5, 1, 1, 1).requires_grad_(True)
    assert resample_frames(video, 3).flatten().tolist() == [0.0, 2.0, 4.0]
    longer = resample_frames(video[:, :2], 4).flatten().tolist()
    assert longer == [0.0, 0.0, 1.0, 1.0]
    resample_frames(video, 3).sum().backward()
    assert video.grad.flatten().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_resolve_label_by_name_and_id_with_helpful_error():
    config = YolosConfig(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    assert resolve_label(config, "book") == 2 and resolve_label(config, 1) == 1
    with pytest.raises(ValueError, match=r"'dgo' is not a key of the model's config.label2id.*'dog'"):
        resolve_label(config, "dgo")
    with pytest.raises(ValueError, match="valid labels include 'cat', 'dog', 'book'"):
        resolve_label(config, "zebra")
    with pytest.raises(ValueError, match="class id 7 is out of range"):
        resolve_label(config, 7)


# --- YOLOS object presence / removal ------------------------------------------------


def test_object_reward_matches_hand_computation(yolos_dir):
    # 32 x 48 frames with size=32 need no resize, so the detector input is the normalised frames.
    videos = clip(2, 3, 3, 32, 48)
    remove = ObjectReward("dog", model=yolos_dir, size=32)
    present = ObjectReward(1, mode="present", model=yolos_dir, size=32)
    with torch.no_grad():
        logits = remove.model(pixel_values=normalize(videos.flatten(0, 1), IMAGENET_MEAN, IMAGENET_STD)).logits
        conf = logits.softmax(-1)[..., 1].amax(-1).view(2, 3)
        got_remove, got_present = remove(videos, ["a", "b"]), present(videos, ["a", "b"])
    assert logits.shape[-1] == len(LABELS) + 1  # classes + no-object
    torch.testing.assert_close(got_remove, 1 - conf.mean(1))
    torch.testing.assert_close(got_present, conf.mean(1))
    assert not torch.allclose(got_present, ObjectReward("cat", "present", yolos_dir, size=32)(videos, ["a", "b"]))


def test_object_reward_any_frame_size_gradients_and_geometry(yolos_dir):
    reward = ObjectReward("book", model=yolos_dir, size=32, max_size=40, num_frames=2)
    assert reward.preprocess(clip(1, 3, 60, 100)).shape == (1, 3, 24, 40)  # scale min(32/60, 40/100), floored to 8s
    assert reward.preprocess(clip(1, 3, 33, 33)).shape == (1, 3, 32, 32)
    score = assert_reward_basics(reward, clip(2, 5, 3, 27, 41))
    assert ((score >= 0) & (score <= 1)).all()
    reward.train()
    assert not reward.model.training
    with pytest.raises(ValueError, match="mode must be"):
        ObjectReward("dog", mode="erase", model=yolos_dir)
    with pytest.raises(ValueError, match="'horse' is not a key"):
        ObjectReward("horse", model=yolos_dir)


# --- VideoMAE action ------------------------------------------------------------------


def test_action_reward_is_softmax_probability(videomae_dir):
    # 4 frames of 32 x 32 match the model's num_frames and image_size: only normalisation applies.
    videos = clip(2, 4, 3, 32, 32, seed=1)
    rewards = [ActionReward(label, model=videomae_dir) for label in ("running", "jumping", "playing guitar")]
    with torch.no_grad():
        pixels = normalize(videos.flatten(0, 1), IMAGENET_MEAN, IMAGENET_STD).view(2, 4, 3, 32, 32)
        probs = rewards[0].model(pixel_values=pixels).logits.softmax(-1)
        got = torch.stack([r(videos, ["x", "y"]) for r in rewards], dim=1)
    torch.testing.assert_close(got, probs)
    torch.testing.assert_close(got.sum(1), torch.ones(2))


def test_action_reward_resamples_any_clip(videomae_dir):
    reward = ActionReward(2, model=videomae_dir)
    assert reward.preprocess(clip(2, 7, 3, 40, 50)).shape == (2, 4, 3, 32, 32)
    assert reward.preprocess(clip(1, 2, 3, 24, 24)).shape == (1, 4, 3, 32, 32)
    assert_reward_basics(reward, clip(2, 7, 3, 40, 50))


# --- V-JEPA 2 masked prediction ----------------------------------------------------------


def test_vjepa_tail_reward_matches_model_outputs(vjepa_dir):
    """With the tail mask the context is the first tubelet step, so its context-only encoding is
    the model's own encoding of the first two frames; the reward is −L1 to the normalised targets."""
    reward = VJEPAReward(model=vjepa_dir, mask="tail", tail_fraction=0.5)
    videos = clip(2, 4, 3, 40, 44, seed=2)
    model = reward.model
    with torch.no_grad():
        x = reward.pixels(videos)
        assert x.shape == (2, 4, 3, 32, 32)
        n = 16  # tokens per tubelet step: (32 / 8)²
        full = model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        targets = F.layer_norm(full[:, n:], full.shape[-1:])
        context = model(pixel_values_videos=x[:, :2], skip_predictor=True).last_hidden_state
        ids = torch.arange(2 * n).expand(2, -1)
        pred = model.predictor(context, context_mask=[ids[:, :n]], target_mask=[ids[:, n:]]).last_hidden_state
        expected = -(pred - targets).abs().mean(dim=(1, 2))
        got = reward(videos, ["", ""])
    torch.testing.assert_close(got, expected)
    # The reward differs from one whose context saw the whole clip (VJEPA2Model.forward's masks).
    with torch.no_grad():
        leaky = model(pixel_values_videos=x, context_mask=[ids[:, :n]], target_mask=[ids[:, n:]]).predictor_output
    assert not torch.allclose(got, -(leaky.last_hidden_state - targets).abs().mean(dim=(1, 2)))


def test_vjepa_block_mask_is_fixed_and_hides_targets_from_context(vjepa_dir):
    reward = VJEPAReward(model=vjepa_dir, mask="block", seed=3)
    context, target = reward.token_masks(2, torch.device("cpu"))
    assert len(context) > 0 and len(target) > 0 and len(context) + len(target) == 32
    assert torch.equal(torch.cat([context, target]).sort().values, torch.arange(32))
    hidden = torch.zeros(32, dtype=torch.bool)
    hidden[target] = True
    assert torch.equal(hidden[:16], hidden[16:])  # the same spatial blocks through every step
    assert all(torch.equal(a, b) for a, b in zip((context, target), reward.token_masks(2, torch.device("cpu"))))
    assert not torch.equal(target, VJEPAReward(model=vjepa_dir, seed=4).token_masks(2, torch.device("cpu"))[1])

    # No gradient from the prediction to the hidden patches' pixels: the context never saw them.
    x = reward.pixels(clip(1, 4, 3, 32, 32, seed=5)).requires_grad_(True)
    pred, targets = reward.predict(x)
    (grad,) = torch.autograd.grad(pred.sum(), x)
    patch_grad = grad.abs().sum((0, 2)).view(2, 2, 4, 8, 4, 8).sum((1, 3, 5)).flatten()  # per token
    assert (patch_grad[hidden] == 0).all() and (patch_grad[~hidden] > 0).all()
    assert pred.shape == targets.shape == (1, len(target), 48)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(1, len(target)), atol=1e-5, rtol=0)

    score = assert_reward_basics(reward, clip(2, 5, 3, 30, 37))  # 5 frames -> 6, any frame size
    assert (score < 0).all()
    torch.testing.assert_close(reward(clip(2, 5, 3, 30, 37), ["", ""]), score)  # deterministic


def test_vjepa_rejects_bad_settings(vjepa_dir):
    with pytest.raises(ValueError, match="multiple of the tubelet size 2"):
        VJEPAReward(model=vjepa_dir, num_frames=5)
    with pytest.raises(ValueError, match="mask must be"):
        VJEPAReward(model=vjepa_dir, mask="random")
    with pytest.raises(ValueError, match="at least 2 tubelet steps"):
        VJEPAReward(model=vjepa_dir, mask="tail")(clip(1, 2, 3, 32, 32), [""])
    with pytest.raises(ValueError, match="hides every token"):
        VJEPAReward(model=vjepa_dir, num_blocks=4, block_scale=1.0)(clip(1, 4, 3, 32, 32), [""])


# --- configs ------------------------------------------------------------------------------


def test_configs_build_through_build_reward(yolos_dir, videomae_dir, vjepa_dir):
    local = {
        "object_removal": {"model": yolos_dir, "target": "dog", "size": 32},
        "action": {"model": videomae_dir},
        "vjepa": {"model": vjepa_dir},
    }
    entries = {}
    for name, overrides in local.items():
        text = (CONF / f"{name}.yaml").read_text()
        assert text.startswith(f"# @package reward.{name}\n")
        entry = OmegaConf.create(text)
        assert entry.weight == 1.0 and entry.model != overrides["model"]  # a hub id by default
        entries[name] = OmegaConf.merge(entry, overrides)
    reward = build_reward(entries)
    assert isinstance(reward.terms["object_removal"], ObjectReward)
    assert reward.terms["action"].target == 2  # "playing guitar"
    videos = clip(2, 4, 3, 32, 32)
    parts = reward.components(videos, ["", ""])
    assert set(parts) == set(local) and all(p.shape == (2,) for p in parts.values())
    torch.testing.assert_close(reward(videos, ["", ""]), sum(parts.values()))
