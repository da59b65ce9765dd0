"""stage=grpo: the stage's objective is PPO + β·KL on group-normalised advantages (checked against the recorded
log-probabilities, means and rewards), a flow model and a DDIM model train and export, bad keys are one line,
an interrupted run resumes to the same end."""

import csv
import json
import math

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.stages import grpo

from .helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["stage=grpo", "reward=vivid", "stage.epochs=2", "stage.sample.batch_size=4", "stage.sample.num_batches=1",
        "stage.sample.group_size=2", "stage.sample.num_steps=3", "stage.ppo.batch_size=2",
        "stage.ppo.timestep_fraction=0.5", "stage.evaluation.num_steps=3", "stage.evaluation.batch_size=4",
        "stage.optimizer.lr=0.01", "trainer.log_every_n_steps=1",
        "prompts.train=[a large green circle moving right quickly on a black background,"
        "a small magenta square moving down slowly on a silver background]",
        "prompts.test=[a large red triangle moving left quickly on a black background]"]


def _record(monkeypatch) -> dict:
    """Every rollout (rewards, advantages, old log-probs) and, per trained transition, the stage's loss with the
    policy's and the reference's Gaussian steps it came from."""
    seen = {"rollouts": [], "terms": []}
    policy_step, terms, advantages = (grpo.GRPOStage.policy_step, grpo.GRPOStage.transition_terms,
                                      grpo.GRPOStage.advantages)

    def recorded_step(self, *args):
        out = policy_step(self, *args)
        self._steps.append(out)
        return out

    def recorded_terms(self, rows, col, cond, uncond):
        self._steps = []
        out = terms(self, rows, col, cond, uncond)
        r = self.rollout
        seen["terms"].append({"out": {k: v.detach() for k, v in out.items()}, "steps": self._steps,
                              "advantages": r["advantages"][rows], "old": r["log_probs"][rows, col]})
        return out

    def recorded_advantages(self, prompts, rewards):
        adv, total = advantages(self, prompts, rewards)
        seen["rollouts"].append({"prompts": list(prompts), "rewards": rewards.clone(), "advantages": adv.clone()})
        return adv, total

    monkeypatch.setattr(grpo.GRPOStage, "policy_step", recorded_step)
    monkeypatch.setattr(grpo.GRPOStage, "transition_terms", recorded_terms)
    monkeypatch.setattr(grpo.GRPOStage, "advantages", recorded_advantages)
    return seen


def _by_hand_advantages(rewards: torch.Tensor, weights: list[float], group: int, per_term: bool) -> torch.Tensor:
    """(r − mean)/(std + 1e-4) over each run of `group` consecutive samples, of the weighted sum or of each term."""
    def norm(r):
        out = []
        for i in range(0, len(r), group):
            g = r[i : i + group].double()
            mean = sum(g.tolist()) / len(g)
            std = math.sqrt(sum((x - mean) ** 2 for x in g.tolist()) / len(g))
            out += [(x - mean) / (std + 1e-4) for x in g.tolist()]
        return torch.tensor(out, dtype=torch.float64)
    rewards = rewards.double()
    if per_term:
        return sum(w * norm(rewards[:, k]) for k, w in enumerate(weights))
    return norm(sum(w * rewards[:, k] for k, w in enumerate(weights)))


def _check_objective(seen: dict, beta: float, clip: float = 1e-4, adv_clip: float = 5.0) -> None:
    """loss = mean_i max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 ± ε)) + β·mean_i mean_d (μ − μ_ref)²/(2s²), ρ = exp(logp − logp_old)."""
    kls = []
    for t in seen["terms"]:
        policy, ref = t["steps"]
        a = t["advantages"].clamp(-adv_clip, adv_clip)
        ratio = (policy.log_prob.detach() - t["old"]).exp()
        surrogate = torch.stack([max(-ai * ri, -ai * min(max(ri, 1 - clip), 1 + clip)) for ai, ri in zip(a, ratio)])
        diff = (policy.mean.detach() - ref.mean) ** 2 / (2 * policy.std**2)
        kl = diff.flatten(1).mean(1).mean()
        kls.append(kl.item())
        torch.testing.assert_close(t["out"]["loss"], surrogate.mean() + beta * kl, rtol=1e-5, atol=1e-7)
        if kl > 0:
            assert not torch.allclose(t["out"]["loss"], surrogate.mean() - beta * kl)
    assert kls[0] == 0 and max(kls) > 0  # LoRA starts as the reference, then leaves it


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_flow_grpo_objective_is_ppo_plus_kl_on_group_advantages_and_it_exports(tmp_path, monkeypatch):
    from lifecycle.models import ModelBundle

    seen = _record(monkeypatch)
    result = grpo.run(compose_cfg(tmp_path, *FAST, "model=tiny_flow", "stage.kl_beta=0.5",
                                  "stage.ppo.clip_range=0.2"))
    assert result["steps"] == 4 and result["epochs"] == 2 and result["reward_queries"] == 8
    assert len(seen["rollouts"]) == 2 and len(seen["terms"]) == 4  # one transition (fraction 0.5 of 3) per sample row
    for roll in seen["rollouts"]:
        p = roll["prompts"]
        assert p[0] == p[1] and p[2] == p[3]  # groups of G = 2 consecutive samples of one prompt
        torch.testing.assert_close(roll["advantages"].double(), _by_hand_advantages(roll["rewards"], [1.0], 2, False),
                                   rtol=1e-5, atol=1e-6)
    _check_objective(seen, beta=0.5, clip=0.2)
    rows = _metrics(tmp_path)
    assert [float(r["train/reward_queries"]) for r in rows] == [4, 4, 8, 8] and "train/kl" in rows[0]
    assert float(rows[0]["train/approx_kl"]) < 1e-10  # an epoch's first update sees the weights that sampled
    assert "| GRPO |" in (tmp_path / "report" / "table.md").read_text()
    reloaded = ModelBundle.from_pretrained(str(tmp_path / "export"))
    assert reloaded.is_flow and reloaded.generate(["a small blue triangle moving up slowly on a gray background"],
                                                  frames=8, resolution=32, num_steps=2, seed=0).shape == (1, 8, 3, 32, 32)


def test_ddim_grpo_full_fine_tuning_with_per_term_advantages_and_shared_noise(tmp_path, monkeypatch):
    seen = _record(monkeypatch)
    original = grpo.GRPOStage.collect
    noises = []

    def collect(self, prompts, generator):
        noises.append(self.bundle.latent_shape(self.frames, self.resolution))
        out = original(self, prompts, generator)
        noises[-1] = out["latents"][:, 0]
        return out

    monkeypatch.setattr(grpo.GRPOStage, "collect", collect)
    cfg = compose_cfg(tmp_path, *FAST, "reward=[vivid,colour]", "reward.colour.weight=0.5", "stage.lora=null",
                      "stage.kl_beta=0.5", "stage.per_term_advantages=true", "stage.sample.same_noise_in_group=true",
                      "stage.evaluation=null", "stage.curve.every_n_steps=2", "stage.curve.num_steps=2")
    result = grpo.run(cfg)
    assert result["steps"] == 4
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [(p["step"], p["reward_queries"]) for p in curve] == [(0, 0), (2, 4), (4, 8)]
    for roll in seen["rollouts"]:
        assert roll["rewards"].shape == (4, 2)  # each term kept apart
        torch.testing.assert_close(roll["advantages"].double(),
                                   _by_hand_advantages(roll["rewards"], [1.0, 0.5], 2, True), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(roll["advantages"].double(),
                                  _by_hand_advantages(roll["rewards"], [1.0, 0.5], 2, False), atol=1e-3)
    for x in noises:  # one initial noise per group, different groups differ
        assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[2])
    _check_objective(seen, beta=0.5)  # the reference is a frozen copy of the start model
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("lora" in k for k in trained["state_dict"]) and trained["lifecycle"]["reward_queries"] == 8


@pytest.mark.parametrize("override, key", [
    ("stage.sample.group_size=3", "stage.sample.group_size: 3 must divide"),
    ("stage.sample.group_size=1", "stage.sample.group_size: a group needs at least 2"),
    ("stage.kl_beta=-1", "stage.kl_beta: must be >= 0"),
    ("stage.sample.noise_level=0", "stage.sample.noise_level: must be positive"),
    ("stage.ppo.timestep_fraction=1.5", "stage.ppo.timestep_fraction"),
    ("model=tiny_svd", "model: stage=grpo is for text-to-video models"),
])
def test_bad_grpo_config_is_one_line_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key) as e:
        compose_cfg(tmp_path, *FAST, override, tiny=not override.startswith("model="))
    assert "\n" not in str(e.value)


def test_interrupted_and_resumed_grpo_ends_identical(tmp_path, monkeypatch):
    short = [*FAST, "model=tiny_flow", "stage.epochs=3", "trainer.checkpoint_every_n_steps=3", "stage.evaluation=null"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grpo.run(compose_cfg(straight, *short))
    original = grpo.GRPOStage.training_step

    def preempted(self, batch, batch_idx):
        if self.updates == 5:  # mid epoch 3; the checkpoint after update 4 holds epochs 1-2
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(grpo.GRPOStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        grpo.run(compose_cfg(resumed, *short))
    monkeypatch.setattr(grpo.GRPOStage, "training_step", original)
    assert grpo.run(compose_cfg(resumed, *short, "trainer.resume=last"))["steps"] == 6
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["lifecycle"] == b["lifecycle"] and a["lifecycle"]["updates"] == 6
    assert [r["train/loss"] for r in _metrics(resumed)] == [r["train/loss"] for r in _metrics(straight)]


def test_epoch_boundary_errors_name_grpo_not_ddpo(tmp_path):
    """GRPO runs DDPO's loop: its checkpoint and resume errors name the stage that wrote the checkpoint."""
    from lifecycle.models import build_bundle
    from lifecycle.rewards.base import build_reward

    cfg = compose_cfg(tmp_path, *FAST, "model=tiny_flow", "stage.kl_beta=0", "stage.ppo.accumulate=1")
    run = grpo.GRPORun(cfg)
    run.reward, run.prompt_sets = build_reward(cfg.reward), {"train": list(cfg.prompts.train)}
    module = run.module(build_bundle(cfg.model))
    assert module.updates_per_epoch == 2
    module.updates = 1
    with pytest.raises(RuntimeError, match="^GRPO checkpoints fall on epoch boundaries; got one after update 1$"):
        module.on_save_checkpoint({})
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="^trainer.resume: the GRPO checkpoint is 3 updates in, not on an epoch"):
        module.on_load_checkpoint({"state_dict": trainable, "lifecycle": {"updates": 3, "reward_queries": 12}})


class Drift(torch.nn.Module):
    """A flow "model" with constant velocity v = −b: the sampled videos' mean grows with b."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, hidden, pooled):
        return torch.zeros_like(x) - self.b


def test_group_relative_policy_gradient_on_the_flow_sde_raises_a_reward():
    """GRPO's loop (SDE rollouts with log-probs, groups of G = 8 normalised, PPO + KL over every step) on
    reward = mean of the sample, with the math the stage uses: the reward rises (seeds 0-5: b ends at 0.94-0.98)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lifecycle.diffusion.ddpo import ppo_loss
    from lifecycle.diffusion.grpo import (flow_sample_with_logprob, flow_sde_step_with_logprob, flow_sde_times,
                                          gaussian_kl, group_advantages)

    model, s = Drift(), FlowMatchEulerDiscreteScheduler(shift=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    cond, g = (torch.zeros(64, 1, 1), torch.zeros(64, 1)), torch.Generator().manual_seed(0)
    groups = torch.arange(8).repeat_interleave(8)
    means = []
    for _ in range(10):
        with torch.no_grad():
            latents, old, timesteps = flow_sample_with_logprob(model, s, torch.randn(64, 1, 1, 2, 2, generator=g),
                                                               cond, None, 1.0, 4, 0.7, g)
        rewards = latents[:, -1].mean(dim=(1, 2, 3, 4))
        means.append(rewards.mean().item())
        advantages = group_advantages(rewards, groups)
        for j in range(4):
            t, t_next, t_max = flow_sde_times(s, j)
            x = latents[:, j]
            step = flow_sde_step_with_logprob(model(x, timesteps[j], *cond), x, t, t_next, 0.7, t_max,
                                              prev_sample=latents[:, j + 1])
            ref = flow_sde_step_with_logprob(torch.zeros_like(x), x, t, t_next, 0.7, t_max, prev_sample=latents[:, j + 1])
            loss = ppo_loss(advantages, step.log_prob, old[:, j], 0.2, 5.0)[0] + 0.01 * gaussian_kl(step.mean, ref.mean,
                                                                                                   step.std).mean()
            (loss / 4).backward()
        opt.step()
        opt.zero_grad()
    assert model.b.item() > 0.5
    assert sum(means[-3:]) / 3 > means[0] + 0.5


@pytest.mark.matrix  # two processes: make distributed
@pytest.mark.parametrize("strategy,tuning", [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "full")])
def test_grpo_on_two_processes_counts_every_ranks_queries(tmp_path, strategy, tuning):
    """Two CPU processes (gloo): each rank samples its own groups; rewards are gathered for the count. Under
    FSDP2 the checkpoint is sharded (one file per rank) and the KL reference is the adapter-free sharded network
    (LoRA) or the unsharded frozen copy of the start (full fine-tuning)."""
    import subprocess
    import sys

    from lifecycle.checkpointing import read_checkpoint

    from .helpers import TINY

    run_dir = tmp_path / "run"
    strategy_args = (["trainer.strategy=ddp"] if strategy == "ddp" else
                     ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true"])
    done = subprocess.run([sys.executable, "-m", "lifecycle", *FAST, *TINY, "model=tiny_flow", "stage.evaluation=null",
                           "stage.kl_beta=0.1", *(["stage.lora=null"] if tuning == "full" else []),
                           *strategy_args, "trainer.devices=2", "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if strategy == "fsdp":
        assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    state = read_checkpoint(ckpt)["lifecycle"]
    assert state["reward_queries"] == 2 * 4 * 2  # epochs x videos per rank x ranks
    rows = _metrics(run_dir)
    assert [float(r["train/reward_queries"]) for r in rows] == [8, 8, 16, 16]
    assert all(math.isfinite(float(r["train/kl"])) for r in rows) and float(rows[-1]["train/kl"]) > 0
    assert (run_dir / "export" / "model_index.json").is_file()
