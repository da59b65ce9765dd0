"""DDPO: the stochastic DDIM policy and its log-probabilities, advantages, the PPO loss, the stage end to end."""

import csv
import math

import pytest
import torch
from diffusers import DDIMScheduler

from lifecycle.errors import ConfigError
from lifecycle.diffusion.ddpo import (
    PerPromptStatTracker,
    ddim_step_with_logprob,
    ddpo_scheduler,
    ppo_loss,
    sample_with_logprob,
    transition_log_prob,
)

from .helpers import CONF_DIR, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["prompts.train=[a large green circle moving right quickly on a black background,"
           "a small magenta square moving down slowly on a silver background]",
           "prompts.test=[a large red triangle moving left quickly on a black background,"
           "a small blue triangle moving up slowly on a gray background]"]
FAST = ["stage=ddpo", *PROMPTS, "reward=vivid", "stage.epochs=2", "stage.sample.batch_size=2",
        "stage.sample.num_batches=1", "stage.sample.num_steps=4", "stage.ppo.batch_size=1",
        "stage.evaluation.num_steps=4", "stage.evaluation.batch_size=2", "stage.optimizer.lr=0.01",
        "trainer.log_every_n_steps=1"]


def _scheduler(kind="epsilon", clip=False, alpha_to_one=True, steps=4):
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=kind, clip_sample=clip,
                      set_alpha_to_one=alpha_to_one, timestep_spacing="trailing")
    s.set_timesteps(steps)
    return s


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, clip", [("epsilon", False), ("v_prediction", False), ("sample", False),
                                        ("sample", True)])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_step_matches_diffusers_ddim_with_the_same_noise(kind, clip, alpha_to_one):
    s = _scheduler(kind, clip, alpha_to_one)
    x, out = _randn(2, 3, 2, 4, 4, seed=1), 2 * _randn(2, 3, 2, 4, 4, seed=2)
    for t in s.timesteps:  # the last one steps to final_alpha_cumprod
        expected = s.step(out, t, x, eta=0.7, variance_noise=_randn(2, 3, 2, 4, 4, seed=3)).prev_sample
        mine, log_prob, _, _ = ddim_step_with_logprob(s, out, t, x, 0.7, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)
        if alpha_to_one and t == s.timesteps[-1]:
            continue  # σ = 0 stepping to ᾱ = 1: no density (why ddpo_scheduler ends at ᾱ_0)
        assert torch.isfinite(log_prob).all()
        # evaluating the drawn sample as a stored transition gives the same log-probability
        again = ddim_step_with_logprob(s, out, t, x, 0.7, prev_sample=mine).log_prob
        torch.testing.assert_close(again, log_prob, rtol=0, atol=1e-6)


def test_log_prob_is_the_gaussian_density_of_the_ddim_posterior():
    """Per-sample timesteps (the last one past the start of the chain), by hand from DDIM eq. 12 and 16."""
    s = _scheduler("epsilon", alpha_to_one=False)
    ac = s.alphas_cumprod.double()
    t = torch.tensor([999, 249])  # previous timesteps 749 and -1 (-> final_alpha_cumprod = ᾱ_0)
    x, eps, x_prev = _randn(2, 3, 1, 4, 4, seed=4), _randn(2, 3, 1, 4, 4, seed=5), _randn(2, 3, 1, 4, 4, seed=6)
    eta = 0.8
    log_prob = ddim_step_with_logprob(s, eps, t, x, eta, prev_sample=x_prev).log_prob
    for i, (a_t, a_prev) in enumerate([(ac[999], ac[749]), (ac[249], ac[0])]):
        x0 = (x[i].double() - math.sqrt(1 - a_t) * eps[i].double()) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps[i].double()
        expected = torch.distributions.Normal(mu, sigma).log_prob(x_prev[i].double()).mean()
        assert log_prob[i].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_steps_own_draws_average_to_the_negative_entropy_of_diffusers_step_noise():
    """Independent of the σ formula above: σ_t is read off diffusers' DDIM step (variance noise z moves x_prev by
    σ_t·z), and the mean log-density of the step's own draws is E[log N(x; μ, σ²)] = −½ − log σ − ½ log 2π."""
    s = _scheduler("epsilon", alpha_to_one=False)
    x, out = _randn(1, 3, 4, 32, 32, seed=1), _randn(1, 3, 4, 32, 32, seed=2)  # 12,288 dimensions averaged
    for t in s.timesteps:
        ones = torch.ones_like(x)
        sigma = (s.step(out, t, x, eta=0.9, variance_noise=ones).prev_sample
                 - s.step(out, t, x, eta=0.9, variance_noise=0 * ones).prev_sample).mean().item()
        log_prob = ddim_step_with_logprob(s, out, t, x, 0.9, generator=torch.Generator().manual_seed(int(t))).log_prob
        assert log_prob.item() == pytest.approx(-0.5 - math.log(sigma) - 0.5 * math.log(2 * math.pi), abs=0.02), int(t)


def test_deterministic_ddim_has_no_log_prob_and_only_ddim_is_accepted():
    s = _scheduler()
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(s, _randn(1, 3), s.timesteps[0], _randn(1, 3), 0.0)
    assert ddpo_scheduler(s).final_alpha_cumprod == s.alphas_cumprod[0]  # every step keeps σ > 0
    from diffusers import FlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError, match="DDIM"):
        ddpo_scheduler(FlowMatchEulerDiscreteScheduler())


# -- the sampler ---------------------------------------------------------------------------------
class Denoiser(torch.nn.Module):
    """A small conditional epsilon-predictor whose output depends on x, t and the condition."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 3, 3, padding=1)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x, t, hidden, pooled):
        shift = (self.proj(pooled) * (t.float() / 1000).unsqueeze(1)).reshape(len(x), 3, 1, 1, 1)
        return self.conv(x) + shift + hidden.mean(1).mean(1).reshape(-1, 1, 1, 1, 1)


def test_recorded_log_probs_re_evaluate_to_ratio_one():
    torch.manual_seed(0)
    model, s = Denoiser(), ddpo_scheduler(_scheduler())
    cond, uncond = (_randn(3, 5, 4, seed=7), _randn(3, 4, seed=8)), (torch.zeros(3, 5, 4), torch.zeros(3, 4))
    with torch.no_grad():
        latents, log_probs, timesteps = sample_with_logprob(model, s, _randn(3, 3, 2, 4, 4, seed=9), cond, uncond,
                                                            3.0, 4, 1.0, torch.Generator().manual_seed(0))
    assert latents.shape == (3, 5, 3, 2, 4, 4) and log_probs.shape == (3, 4) and timesteps.tolist() == [999, 749, 499, 249]
    assert torch.isfinite(log_probs).all()
    # each sample at its own step, as PPO re-evaluates them, with gradients on
    col = torch.tensor([2, 0, 3])
    rows = torch.arange(3)
    log_prob = transition_log_prob(model, s, latents[rows, col], timesteps[col], latents[rows, col + 1], cond, uncond,
                                   3.0, 1.0)
    assert torch.equal(log_prob, log_probs[rows, col])
    loss, kl, clipped = ppo_loss(torch.tensor([1.0, -1.0, 0.5]), log_prob, log_probs[rows, col], 1e-4, 5.0)
    assert clipped == 0 and kl < 1e-12
    loss.backward()
    assert model.conv.weight.grad.abs().sum() > 0


class Shift(torch.nn.Module):
    """x0-predictor x0_hat = x_t + b: the final samples' mean grows with b."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, hidden, pooled):
        return x + self.b


def test_policy_gradient_on_the_chain_raises_a_reward():
    """DDPO's loop (sample with log-probs, normalise rewards, PPO over every step) on reward = mean of the sample.

    The final step's σ is ≈ sqrt(1 − ᾱ_0); beta_start = 0.02 keeps it large enough for the score-function
    estimate to see the reward in a few 64-sample epochs (all of seeds 0-7 rise).
    """
    model = Shift()
    s = ddpo_scheduler(DDIMScheduler(num_train_timesteps=1000, beta_start=0.02, beta_end=0.02, prediction_type="sample",
                                     clip_sample=False, timestep_spacing="trailing"))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    cond, g = (torch.zeros(64, 1, 1), torch.zeros(64, 1)), torch.Generator().manual_seed(0)
    means = []
    for _ in range(10):
        with torch.no_grad():
            latents, old, timesteps = sample_with_logprob(model, s, torch.randn(64, 1, 1, 2, 2, generator=g), cond,
                                                          None, 1.0, 2, 1.0, g)
        rewards = latents[:, -1].mean(dim=(1, 2, 3, 4))
        means.append(rewards.mean().item())
        advantages = PerPromptStatTracker(64, 64).update(["p"] * 64, rewards)
        for j in range(2):
            log_prob = transition_log_prob(model, s, latents[:, j], timesteps[j].expand(64), latents[:, j + 1], cond,
                                           None, 1.0, 1.0)
            (ppo_loss(advantages, log_prob, old[:, j], 0.2, 5.0)[0] / 2).backward()
        opt.step()
        opt.zero_grad()
    assert model.b.item() > 0.5
    assert sum(means[-3:]) / 3 > means[0] + 0.5


# -- advantages and the PPO loss -------------------------------------------------------------------
def test_per_prompt_stat_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    adv = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    # a: history [1, 3] (mean 2, std 1); b: one reward < min_count -> the batch's mean 3, std sqrt(8/3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 2 / math.sqrt(8 / 3)]))
    adv = tracker.update(["a", "b"], torch.tensor([5.0, 7.0]))
    # a: [1, 3, 5] (mean 3, std sqrt(8/3)); b: [5, 7] (mean 6, std 1)
    torch.testing.assert_close(adv, torch.tensor([2 / math.sqrt(8 / 3), 1.0]))
    resumed = PerPromptStatTracker(buffer_size=1, min_count=1)
    resumed.load_state_dict(tracker.state_dict())
    resumed.eps = 0.0
    # the buffer keeps the last 3: a = [3, 5, 7] (mean 5, std sqrt(8/3))
    for t in (tracker, resumed):
        torch.testing.assert_close(t.update(["a"], torch.tensor([7.0])), torch.tensor([2 / math.sqrt(8 / 3)]))
    assert resumed.state_dict() == tracker.state_dict()


def test_ppo_loss_by_hand():
    advantages = torch.tensor([2.0, -1.0, 10.0])  # the last is clipped to adv_clip_max = 5
    old = torch.tensor([-1.0, -2.0, -3.0])
    log_prob = (old + torch.tensor([math.log(1.5), math.log(0.5), 0.0])).requires_grad_()
    loss, kl, clipped = ppo_loss(advantages, log_prob, old, clip_range=0.2, adv_clip_max=5.0)
    # per sample max(−A·r, −A·clip(r)): max(−3, −2.4), max(0.5, 0.8), max(−5, −5)
    assert loss.item() == pytest.approx((-2.4 + 0.8 - 5) / 3)
    assert kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    assert clipped.item() == pytest.approx(2 / 3)
    loss.backward()  # the clipped terms carry no gradient; the last: d(−5·r/3)/d logp = −5/3 at r = 1
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.0, -5 / 3]))


def test_ppo_gradient_vanishes_only_outside_the_trust_region_in_the_advantages_direction():
    """PPO's rule, not its formula: a sample whose ratio has left [1 − ε, 1 + ε] the way its advantage pushes it
    (up for A > 0, down for A < 0) gets no gradient; every other sample gets d(−A·r)/d log p / N = −A·r / N."""
    eps, ratios = 0.2, [0.5, 0.85, 1.0, 1.15, 1.5]
    for a in (1.0, -1.0):
        old = torch.zeros(len(ratios))
        log_prob = torch.tensor(ratios).log().requires_grad_()
        loss, _, _ = ppo_loss(torch.full_like(old, a), log_prob, old, clip_range=eps, adv_clip_max=5.0)
        loss.backward()
        outside = [r > 1 + eps if a > 0 else r < 1 - eps for r in ratios]
        expected = [0.0 if out else -a * r / len(ratios) for r, out in zip(ratios, outside)]
        torch.testing.assert_close(log_prob.grad, torch.tensor(expected))
        # the paper's form: L = −E[min(r·A, clip(r, 1 − ε, 1 + ε)·A)]
        paper = -sum(min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r in ratios) / len(ratios)
        assert loss.item() == pytest.approx(paper)


# -- the stage --------------------------------------------------------------------------------------
def test_config_errors_name_the_key(tmp_path):
    for override, key in [("stage.sample.eta=0", "stage.sample.eta"), ("stage.ppo.batch_size=3", "stage.ppo.batch_size"),
                          ("stage.ppo.timestep_fraction=0", "stage.ppo.timestep_fraction"),
                          ("stage.per_prompt_stats.min_count=64", "stage.per_prompt_stats.min_count")]:
        with pytest.raises(ConfigError, match=key):
            compose_cfg(tmp_path, *FAST, override)


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_ddpo_trains_logs_queries_and_exports(tmp_path, synthetic_shards):
    from lifecycle.models import ModelBundle
    from lifecycle.stages.ddpo import run

    cfg = compose_cfg(tmp_path, *FAST, "stage.gradient_checkpointing=true", shards=synthetic_shards)
    result = run(cfg)
    assert result["steps"] == 4 and result["epochs"] == 2 and result["reward_queries"] == 4  # 2 updates per epoch
    rows = _metrics(tmp_path)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["train/reward_queries"]) for r in rows] == [2, 2, 4, 4]
    for first in (rows[0], rows[2]):  # an epoch's first update sees the weights that sampled: ratio 1
        assert float(first["train/clip_fraction"]) == 0 and float(first["train/approx_kl"]) < 1e-10
    assert all(math.isfinite(float(r["train/loss"])) and float(r["train/lr"]) == pytest.approx(0.01) for r in rows)
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(v.abs().max() > 0 for k, v in trained["state_dict"].items() if "lora_B" in k)
    assert trained["lifecycle"]["reward_queries"] == 4 and set(trained["lifecycle"]["tracker"]["history"]) == \
        {p.strip() for p in PROMPTS[0].split("=", 1)[1].strip("[]").split(",")}
    assert "| DDPO |" in (tmp_path / "report" / "table.md").read_text()
    reloaded = ModelBundle.from_pretrained(str(tmp_path / "export"))
    assert reloaded.generate(["a large red triangle moving left quickly on a black background"], frames=8,
                             resolution=32, num_steps=2, seed=0).shape == (1, 8, 3, 32, 32)


def test_interrupted_and_resumed_ddpo_ends_identical(tmp_path, synthetic_shards, monkeypatch):
    from lifecycle.stages.ddpo import DDPOStage, run

    short = [*FAST, "stage.epochs=3", "trainer.checkpoint_every_n_steps=3"]  # rounded up to 4: every 2 epochs
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_cfg(straight, *short, shards=synthetic_shards))
    original = DDPOStage.training_step

    def preempted(self, batch, batch_idx):
        if self.updates == 5:  # mid epoch 3; the checkpoint after update 4 holds epochs 1-2
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DDPOStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        run(compose_cfg(resumed, *short, shards=synthetic_shards))
    monkeypatch.setattr(DDPOStage, "training_step", original)
    assert run(compose_cfg(resumed, *short, "trainer.resume=last", shards=synthetic_shards))["steps"] == 6

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["lifecycle"] == b["lifecycle"] and a["lifecycle"]["updates"] == 6
    assert [r["step"] for r in _metrics(resumed)] == [r["step"] for r in _metrics(straight)] == [str(i) for i in range(6)]
    assert [r["train/loss"] for r in _metrics(resumed)] == [r["train/loss"] for r in _metrics(straight)]


def test_flow_models_are_refused_naming_model(tmp_path, synthetic_shards):
    from hydra import compose, initialize_config_dir

    from lifecycle.config import validate
    from lifecycle.stages.ddpo import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={tmp_path}", "model=tiny_wan", *FAST,
                                           f"data.shards={synthetic_shards}", "data.generate=null"])
    with pytest.raises(ConfigError, match="^model: .*flow-matching"):
        run(validate(cfg))


def test_ddpo_gathers_rewards_and_statistics_across_two_processes(tmp_path, synthetic_shards):
    """DDP on two CPU processes (gloo): each rank samples its own 2 videos an epoch, and the per-prompt tracker
    (on every rank) normalises with all 4 rewards; rank 0's checkpoint holds both ranks' rewards."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    tiny = ["model.denoiser.unet_config.block_out_channels=[16,32]", "+model.denoiser.unet_config.norm_num_groups=8",
            "model.denoiser.unet_config.attention_head_dim=4", "model.text_encoder.config.num_hidden_layers=1"]
    subprocess.run([sys.executable, "-m", "lifecycle", *FAST, *tiny, "stage.sample.num_steps=2",
                    "stage.evaluation.num_steps=2", f"data.shards={synthetic_shards}", "data.generate=null",
                    "trainer.devices=2", "trainer.strategy=ddp", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={run_dir}"], check=True, capture_output=True, text=True)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["lifecycle"]
    assert state["reward_queries"] == 2 * 2 * 2  # epochs x videos per rank x ranks
    rewards = [r for history in state["tracker"]["history"].values() for r in history]
    assert len(rewards) == 8 and len(set(rewards)) == 8  # every rank's videos, each its own noise
    assert [float(r["train/reward_queries"]) for r in _metrics(run_dir)] == [4, 4, 8, 8]
