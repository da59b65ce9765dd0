"""VADER: truncated backpropagation through the sampler, the stage end to end, its memory options."""

import json

import pytest
import torch
from diffusers import DDIMScheduler

from lifecycle.errors import ConfigError
from lifecycle.diffusion.sampling import sample
from lifecycle.stages.vader import frame_subset, truncation_steps

from .helpers import CONF_DIR, compose_cfg, record_vader_sampling

FAST = ["stage=vader", "stage.steps=6", "stage.batch_size=2", "stage.sampling.num_steps=4",
        "stage.evaluation.num_steps=4", "prompts.test=[a large red triangle moving left quickly on a black background,"
        "a small blue triangle moving up slowly on a gray background]",
        "prompts.train=[a large green circle moving right quickly on a black background,"
        "a small magenta square moving down slowly on a silver background]",
        "stage.optimizer.lr=0.05", "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
        "reward=vivid"]


class Linear(torch.nn.Module):
    """x_{t-1}-predictor with one weight: pred = w * x (+ 0 * condition), so gradients are easy to follow."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.9))
        self.grad_modes = []

    def forward(self, x, t, hidden, pooled):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.w * x


def _run(model, k, num_steps=5):
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=False)
    noise = torch.randn(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = (torch.zeros(2, 1, 1), torch.zeros(2, 1))
    return sample(model, scheduler, noise, cond, num_steps=num_steps, grad_steps=k), scheduler


@pytest.mark.parametrize("k", [1, 3, 5])
def test_truncated_sampling_records_only_the_last_k_steps(k):
    model = Linear()
    out, _ = _run(model, k)
    assert model.grad_modes == [False] * (5 - k) + [True] * k
    out.sum().backward()
    assert model.w.grad is not None and model.w.grad != 0


def test_truncated_gradient_equals_a_hand_unrolled_chain():
    """With x0-prediction DDIM (eta 0): x_prev = a_t·x0_hat + b_t·x_t, x0_hat = w·x_t. Gradient of the last step only."""
    model = Linear()
    out, scheduler = _run(model, 1, num_steps=2)
    out.sum().backward()
    # hand computation: run step 1 without grad, then d/dw of the last DDIM step at t_last -> prev t = -1 (alpha_prev = 1)
    ts = scheduler.timesteps
    ac = scheduler.alphas_cumprod
    noise = torch.randn(2, 3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = noise
        a_t, a_prev = ac[ts[0]], ac[ts[1]]
        x0 = 0.9 * x
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    a_t, a_prev = ac[ts[1]], scheduler.final_alpha_cumprod
    # x_prev = sqrt(a_prev)·w·x + sqrt(1 - a_prev)·(x − sqrt(a_t)·w·x)/sqrt(1 − a_t)
    d_dw = (a_prev.sqrt() - (1 - a_prev).sqrt() * a_t.sqrt() / (1 - a_t).sqrt()) * x
    torch.testing.assert_close(model.w.grad, d_dw.sum(), rtol=1e-4, atol=1e-4)


def test_truncation_modes_and_frame_subsets():
    g = torch.Generator().manual_seed(0)
    assert truncation_steps("last", 3, g) == 3
    draws = {truncation_steps("rand", 3, g) for _ in range(60)}
    assert draws == {1, 2, 3}
    with pytest.raises(ValueError, match="grad_mode"):
        truncation_steps("first", 3, g)
    assert frame_subset(8, None, g) is None and frame_subset(8, 8, g) is None
    idx = frame_subset(8, 3, g)
    assert len(idx) == 3 and len(set(idx.tolist())) == 3 and idx.tolist() == sorted(idx.tolist()) and idx.max() < 8


@pytest.mark.parametrize("mode, k", [("last", 1), ("rand", 1), ("rand", 3)])
def test_the_stage_backpropagates_through_exactly_its_last_k_sampling_steps(tmp_path, synthetic_shards, monkeypatch,
                                                                           mode, k):
    """The stage's own sampling (4 steps), not only the sampler: gradients on in the last K denoiser calls alone."""
    from lifecycle.stages.vader import run as vader

    steps = record_vader_sampling(monkeypatch)
    vader(compose_cfg(tmp_path, *FAST, "stage.steps=3", "stage.evaluation.batch_size=2",
                      f"stage.sampling.grad_mode={mode}", f"stage.sampling.grad_steps={k}", shards=synthetic_shards))
    assert len(steps) == 3
    for drawn, calls in steps:
        assert drawn == k if mode == "last" else 1 <= drawn <= k
        assert calls == [False] * (4 - drawn) + [True] * drawn


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="stage.sampling.grad_steps"):
        compose_cfg(tmp_path, *FAST, "stage.sampling.grad_steps=9")
    with pytest.raises(ConfigError, match="stage.sampling.grad_mode"):
        compose_cfg(tmp_path, *FAST, "stage.sampling.grad_mode=sometimes")
    with pytest.raises(ConfigError, match="stage.decode_frames"):
        compose_cfg(tmp_path, *FAST, "stage.decode_frames=12")


def test_vader_raises_the_reward_and_leaves_table_samples_and_export(tmp_path, synthetic_shards):
    from lifecycle.stages.vader import run as vader
    from lifecycle.models import ModelBundle

    cfg = compose_cfg(tmp_path, *FAST, "stage.steps=10", shards=synthetic_shards)
    result = vader(cfg)
    assert result["steps"] == 10
    table = json.loads((tmp_path / "report" / "table.json").read_text())
    assert table["after"]["train"]["reward"] > table["before"]["train"]["reward"] + 0.01
    assert (tmp_path / "report" / "table.md").read_text().count("|") > 10
    for tag in ("before", "after"):
        for name in ("train", "test"):
            assert (tmp_path / "samples" / tag / name / "000.mp4").stat().st_size > 0
    assert "train/reward" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    # the export is a plain (merged) bundle that reproduces the aligned samples
    reloaded = ModelBundle.from_pretrained(str(tmp_path / "export"))
    videos = reloaded.generate(["a large red triangle moving left quickly on a black background"], frames=8,
                               resolution=32, num_steps=4, seed=0)
    assert videos.shape == (1, 8, 3, 32, 32)


@pytest.mark.parametrize("option", [
    "stage.memory.gradient_checkpointing=true",
    "stage.memory.frozen_dtype=bf16",
    "stage.memory.offload_activations=true",
    "stage.accumulate=2",
    "stage.gradient_clip=0.001",
    "stage.decode_frames=3",
    "stage.sampling.grad_mode=rand",
])
def test_memory_and_optimisation_options_train(tmp_path, synthetic_shards, option):
    """Each option runs VADER steps that change the LoRA weights and log a finite reward."""
    from lifecycle.stages.vader import run as vader
    from lifecycle.models import ModelBundle

    cfg = compose_cfg(tmp_path, *FAST, "stage.steps=2", "stage.evaluation.batch_size=2", option, shards=synthetic_shards)
    vader(cfg)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    rewards = [float(r.split(",")[header.index("train/reward")]) for r in rows[1:] if r.split(",")[header.index("train/reward")]]
    assert rewards and all(torch.isfinite(torch.tensor(rewards)))
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    lora_b = [v for k, v in trained.items() if "lora_B" in k]  # zero at initialisation
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)
    exported = ModelBundle.from_pretrained(str(tmp_path / "export")).denoiser
    assert {p.dtype for p in exported.parameters()} == {torch.float32}  # also after bf16 frozen weights


def test_interrupted_and_resumed_vader_ends_with_the_same_lora(tmp_path, synthetic_shards, monkeypatch):
    from lifecycle.stages.vader import run as vader
    from lifecycle.stages.vader import VaderStage

    short = [*FAST, "stage.evaluation.batch_size=2", "stage.curve.every_n_steps=2", "stage.curve.num_steps=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    vader(compose_cfg(straight, *short, shards=synthetic_shards))
    original = VaderStage.training_step

    def preempted(self, batch, batch_idx):
        if self.global_step == 4:  # a checkpoint exists for step 3
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(VaderStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        vader(compose_cfg(resumed, *short, shards=synthetic_shards))
    monkeypatch.setattr(VaderStage, "training_step", original)
    assert vader(compose_cfg(resumed, *short, "trainer.resume=last", shards=synthetic_shards))["steps"] == 6

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["state_dict"] and all("lora" in k for k in a["state_dict"])  # only the trained weights are saved
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["lifecycle"] == b["lifecycle"] and a["lifecycle"]["batches_seen"] == 6  # and the guard's state
    assert a["lifecycle"]["guard"]["seen"] == 6 and a["lifecycle"]["guard"]["rejected"] == 0
    # the reward curve: measured before training and every 2 steps, queries = steps x batch 2; the resumed
    # run re-measures only what came after its checkpoint (step 3) and reaches the same rewards
    curves = [[json.loads(line) for line in (d / "curve.jsonl").read_text().splitlines()] for d in (straight, resumed)]
    for curve in curves:
        assert [p["step"] for p in curve] == [0, 2, 4, 6]
        assert [p["reward_queries"] for p in curve] == [0, 4, 8, 12]
        assert all(later["seconds"] > earlier["seconds"] for earlier, later in zip(curve, curve[1:]))
    assert [p["reward"] for p in curves[0]] == pytest.approx([p["reward"] for p in curves[1]], abs=1e-6)


@pytest.mark.parametrize("model, extra", [
    ("tiny_unet3d", ["stage.decode_frames=2", "stage.frames=4", "stage.resolution=16"]),  # DDIM, image VAE
    ("tiny_wan", ["stage.frames=4", "stage.resolution=16"]),  # flow matching: the Euler sampler
])
def test_vader_on_each_denoiser_family_with_checkpointing(tmp_path, synthetic_shards, model, extra):
    from lifecycle.stages.vader import run as vader

    from hydra import compose, initialize_config_dir

    from lifecycle.config import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"run_dir={tmp_path}", f"model={model}", *FAST, "stage.steps=2", "stage.evaluation.batch_size=2",
            "stage.memory.gradient_checkpointing=true", "stage.evaluation.oracle=false", *extra,
            f"data.shards={synthetic_shards}", "data.generate=null"])
    vader(validate(cfg))
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    assert (tmp_path / "report" / "table.md").is_file()
