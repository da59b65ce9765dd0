"""Reward models: the Bradley–Terry loss, learned rewards (conv and CLIP head), the reward_model stage end to end."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from lifecycle.errors import ConfigError
from lifecycle.data.preferences import held_out, read_pairs, write_pairs
from lifecycle.data.synthetic import COLOURS, caption, render_clip, sample_metadata
from lifecycle.models.text import word_tokenizer
from lifecycle.rewards.base import build_reward
from lifecycle.rewards.bradley_terry import bradley_terry_loss, preference_accuracy
from lifecycle.rewards.learned import LearnedReward
from lifecycle.rewards.synthetic import ColourReward

from .helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a large red circle moving left quickly on a black background",
           "a small blue square moving up slowly on a gray background"]


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0, 1.0])
    loss = bradley_terry_loss(chosen, rejected)
    # −log σ(d) = log(1 + e^{−d}) for d = 1, −1, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dr_c of log(1 + e^{−d}) / B = −σ(−d) / B
    torch.testing.assert_close(chosen.grad, torch.tensor([-1 / (1 + math.e), -math.e / (1 + math.e), -0.5]) / 3)
    assert preference_accuracy(chosen, rejected).item() == pytest.approx(1 / 3)  # the tie counts as wrong


def videos(n=2, frames=3, size=16, seed=0):
    return torch.rand(n, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_conv_reward_is_differentiable_and_round_trips_through_export(tmp_path):
    torch.manual_seed(0)
    reward = LearnedReward("conv", channels=[8, 16], text_dim=8, hidden=16)
    x = videos().requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (2,)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert reward(videos(), [PROMPTS[1], PROMPTS[1]])[0] != scores[0]  # the prompt matters
    assert reward(videos(frames=1, size=24), PROMPTS).shape == (2,)  # any frame count and resolution

    reward.save_pretrained(tmp_path / "export", lineage={"stage": "test"})
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == {
        "architecture": "conv", "kwargs": {"channels": [8, 16], "text_dim": 8, "hidden": 16},
        "scale": {"mean": 0.0, "std": 1.0}}
    loaded = LearnedReward.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(loaded(videos(), PROMPTS), scores.detach(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()  # inside a module switched to training, a frozen reward stays in eval mode
    assert not loaded.training

    built = build_reward({"learned": {"_target_": "lifecycle.rewards.learned.LearnedReward.from_pretrained",
                                      "path": str(tmp_path / "export"), "weight": 2.0}})
    assert built.differentiable
    x = videos().requires_grad_(True)
    out = built(x, PROMPTS)
    torch.testing.assert_close(out, 2 * scores.detach())
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_export_with_mismatched_weights_is_refused(tmp_path):
    LearnedReward("conv", channels=[8, 16]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "kwargs": {"channels": [8, 16, 32]}}))
    with pytest.raises(ValueError, match="do not match"):
        LearnedReward.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with a word-level tokenizer, saved like a hub folder."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=16, patch_size=8)
    out = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    word_tokenizer(" ".join(PROMPTS).split(), max_length=16).save_pretrained(out)
    return str(out)


def test_clip_head_with_lora_trains_only_head_and_adapters_and_round_trips(tmp_path, clip_dir):
    torch.manual_seed(0)
    reward = LearnedReward("clip", backbone=clip_dir, hidden=8, lora={"rank": 2, "alpha": 2})
    trainable = {n for n, p in reward.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("net.head.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    x = videos(size=20).requires_grad_(True)
    scores = reward(x, PROMPTS)
    scores.sum().backward()
    assert x.grad.abs().sum() > 0  # gradients reach the pixels through the frozen backbone
    with torch.no_grad():  # as after training: non-zero LoRA B, so the adapters change the scores
        for name, p in reward.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    scores = reward(x, PROMPTS).detach()

    reward.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == trainable  # the backbone is referenced, not copied
    loaded = LearnedReward.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(x.detach(), PROMPTS), scores, rtol=0, atol=1e-6)


def colour_pairs(n, frames=4, size=32, seed=0):
    """Clips of the synthetic world: chosen has the caption's colour, rejected another; scored by ColourReward."""
    rng = np.random.default_rng(seed)
    colours, reward = list(COLOURS), ColourReward()
    for _ in range(n):
        meta = sample_metadata(rng)
        wrong = colours[(colours.index(meta["colour"]) + rng.integers(1, len(colours))) % len(colours)]
        chosen, rejected = render_clip(meta, frames, size), render_clip({**meta, "colour": wrong}, frames, size)
        clips = torch.from_numpy(np.stack([chosen, rejected])).permute(0, 1, 4, 2, 3).float() / 255
        scores = reward(clips, [caption(meta)] * 2).tolist()
        yield {"prompt": caption(meta), "chosen": chosen, "rejected": rejected, "chosen_score": scores[0],
               "rejected_score": scores[1], "scores": scores}


@pytest.fixture(scope="module")
def colour_pair_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("colour") / "pairs"
    write_pairs(out, colour_pairs(320), shard_size=100, manifest={"reward": "colour"})
    return out


FAST = ["stage=reward_model", "stage.num_workers=0", "stage.batch_size=16", "stage.val_fraction=0.25",
        "stage.optimizer.lr=3e-3", "trainer.log_every_n_steps=1"]


def test_reward_model_learns_colour_preferences(tmp_path, colour_pair_dir):
    """Labels from the colour reward: held-out accuracy ends well above chance; the export ranks as reported."""
    from lifecycle.stages.reward_model import run

    pairs = list(read_pairs(colour_pair_dir))
    assert all(p["chosen_score"] > p["rejected_score"] + 0.5 for p in pairs)  # the labels are the colour reward's
    result = run(compose_cfg(tmp_path, *FAST, f"stage.pairs={colour_pair_dir}", "stage.steps=250"))
    report = json.loads((tmp_path / "report" / "accuracy.json").read_text())
    held = [p for p in pairs if held_out(p["key"], 0.25)]
    assert report["after"]["pairs"] == report["before"]["pairs"] == len(held) >= 60
    assert report["after"]["accuracy"] > 0.8 and report["after"]["accuracy"] > report["before"]["accuracy"] + 0.2
    assert report["after"]["loss"] < report["before"]["loss"]
    assert result["after/accuracy"] == report["after"]["accuracy"] and result["steps"] == 250

    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"train/loss", "train/accuracy", "train/margin", "val/accuracy"} <= set(header)
    column = header.index("val/accuracy")
    accuracy = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert accuracy == pytest.approx([report["before"]["accuracy"], report["after"]["accuracy"]])

    lineage = json.loads((tmp_path / "export" / "lineage.json").read_text())
    assert lineage["stage"] == "reward_model" and lineage["parent"] == str(colour_pair_dir)
    reward = build_reward({"learned": {"_target_": "lifecycle.rewards.learned.LearnedReward.from_pretrained",
                                       "path": str(tmp_path / "export")}})
    chosen = torch.from_numpy(np.stack([p["chosen"] for p in held])).permute(0, 1, 4, 2, 3).float() / 255
    rejected = torch.from_numpy(np.stack([p["rejected"] for p in held])).permute(0, 1, 4, 2, 3).float() / 255
    prompts = [p["prompt"] for p in held]
    with torch.no_grad():
        accuracy = preference_accuracy(reward(chosen, prompts), reward(rejected, prompts)).item()
    assert accuracy == pytest.approx(report["after"]["accuracy"])
    # the export is standardised on the training split's videos: mean 0 and std 1 there, by hand
    train = [p for p in pairs if not held_out(p["key"], 0.25)]
    clips = torch.from_numpy(np.stack([p[k] for k in ("chosen", "rejected") for p in train]))
    with torch.no_grad():
        scores = reward(clips.permute(0, 1, 4, 2, 3).float() / 255, [p["prompt"] for p in train] * 2)
    assert report["scale"]["std"] > 0 and scores.mean().item() == pytest.approx(0, abs=1e-4)
    assert scores.std(correction=0).item() == pytest.approx(1, abs=1e-4)


def test_reward_model_stage_on_a_clip_backbone_with_lora(tmp_path, colour_pair_dir, clip_dir):
    from lifecycle.stages.reward_model import run

    run(compose_cfg(tmp_path, *FAST, f"stage.pairs={colour_pair_dir}", "stage.steps=3", "stage.architecture=clip",
                    f"stage.clip.backbone={clip_dir}", "stage.clip.hidden=8", "stage.clip.lora={rank:2,alpha:2}",
                    "stage.batch_size=4", "stage.resolution=16", "stage.frames=2"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "clip" and config["kwargs"]["lora"]["rank"] == 2
    saved = load_file(tmp_path / "export" / "model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())  # the adapters trained
    assert all(k.startswith("net.head.") or "lora_" in k for k in saved)
    report = json.loads((tmp_path / "report" / "accuracy.json").read_text())
    assert 0 <= report["after"]["accuracy"] <= 1 and report["after"]["pairs"] == report["before"]["pairs"]
    reward = LearnedReward.from_pretrained(tmp_path / "export")
    assert reward(videos(size=16), PROMPTS).shape == (2,)


def test_interrupted_and_resumed_reward_model_ends_with_the_same_weights(tmp_path, colour_pair_dir, monkeypatch):
    from lifecycle.stages.reward_model import RewardModelStage, run

    short = [*FAST, f"stage.pairs={colour_pair_dir}", "stage.steps=6", "trainer.checkpoint_every_n_steps=3",
             "stage.num_workers=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_cfg(straight, *short))
    original = RewardModelStage.training_step

    def preempted(self, batch, batch_idx):
        if self.global_step == 4:  # a checkpoint exists for step 3
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RewardModelStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        run(compose_cfg(resumed, *short))
    monkeypatch.setattr(RewardModelStage, "training_step", original)
    assert run(compose_cfg(resumed, *short, "trainer.resume=last"))["steps"] == 6

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["lifecycle"] == b["lifecycle"] == {"batches_seen": 6}
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for run_dir in (straight, resumed):  # one row before training and one after, also across the resume
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        column = rows[0].split(",").index("val/accuracy")
        assert sum(1 for r in rows[1:] if r.split(",")[column]) == 2


@pytest.mark.parametrize("override, key", [
    ("stage.val_fraction=1.0", "stage.val_fraction"),
    ("stage.architecture=transformer", "stage.architecture"),
    ("stage.steps=0", "stage.steps"),
])
def test_config_errors_name_the_key(tmp_path, colour_pair_dir, override, key):
    with pytest.raises(ConfigError, match=key):
        compose_cfg(tmp_path, *FAST, f"stage.pairs={colour_pair_dir}", override)
    with pytest.raises(ConfigError, match="stage.pairs"):
        compose_cfg(tmp_path, *FAST, f"stage.pairs={tmp_path}")
    with pytest.raises(ConfigError, match="reward.learned.path"):
        compose_cfg(tmp_path, *FAST, f"stage.pairs={colour_pair_dir}", "reward=learned")
