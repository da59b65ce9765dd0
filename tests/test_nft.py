"""stage=nft: the stage's loss is DiffusionNFT's (checked by hand against the stored old prediction, for a flow model
and a DDPM epsilon model), the old prediction is the policy that sampled the epoch, a tiny flow model and a tiny DDPM
model climb a reward under the stage, bad keys are one line, an interrupted run resumes to the same end."""

import csv
import json

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.rewards import Reward
from lifecycle.stages import nft

from .helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["stage=nft", "reward=vivid", "stage.epochs=2", "stage.sample.batch_size=4", "stage.sample.num_batches=1",
        "stage.sample.group_size=2", "stage.sample.num_steps=3", "stage.nft.timesteps=2", "stage.train.batch_size=2",
        "stage.evaluation.num_steps=3", "stage.evaluation.batch_size=4", "stage.optimizer.lr=0.01",
        "trainer.log_every_n_steps=1",
        "prompts.train=[a large green circle moving right quickly on a black background,"
        "a small magenta square moving down slowly on a silver background]",
        "prompts.test=[a large red triangle moving left quickly on a black background]"]


class Brightness(Reward):
    """Mean pixel value: a reward a tiny network can climb within seconds (its output's offset)."""

    differentiable = False

    def forward(self, videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))


class Darkness(Brightness):
    def forward(self, videos, prompts):
        return -super().forward(videos, prompts)


def _record(monkeypatch) -> list[dict]:
    """Per trained (samples, level): the stage's terms, the rollout entries they used and the network's output
    there (recomputed: the weights only move after the minibatch)."""
    seen, terms = [], nft.NFTStage.transition_terms

    def recorded(self, rows, col, cond, uncond):
        out = terms(self, rows, col, cond, uncond)
        r = self.rollout
        entry = {k: r[k][rows, col] for k in ("noise", "alpha", "sigma", "timestep", "old")}
        with torch.no_grad():
            x_t = entry["alpha"].view(-1, 1, 1, 1, 1) * r["x0"][rows] + entry["sigma"].view(-1, 1, 1, 1, 1) * entry["noise"]
            entry["pred"] = self.bundle.denoise(x_t, entry["timestep"], *cond)
        seen.append({**entry, "out": {k: v.detach() for k, v in out.items()}, "x0": r["x0"][rows],
                     "advantages": r["advantages"][rows], "kind": self.bundle.prediction_type, "update": self.updates,
                     "old_storage": r["old"].data_ptr(), "levels": r["timestep"], "sampler": self.scheduler})
        return out

    monkeypatch.setattr(nft.NFTStage, "transition_terms", recorded)
    return seen


def _by_hand(t: dict, beta: float, adv_clip: float = 5.0) -> torch.Tensor:
    """mean_i[r_i·E⁺_i + (1 − r_i)·E⁻_i]/β, r = ½ + ½·clip(A/5, −1, 1), p± = (1 ∓ β)·p_old ± β·p_θ,
    E = mean(e²)/mean|e| with e = x0_hat(p) − x0 and x0_hat written out per prediction kind."""
    r = 0.5 + 0.5 * (t["advantages"] / adv_clip).clamp(-1, 1)
    a, s = (t[k].view(-1, 1, 1, 1, 1) for k in ("alpha", "sigma"))
    x0 = t["x0"]
    x_t = a * x0 + s * t["noise"]

    def error(p):
        x0_hat = {"sample": p, "epsilon": (x_t - s * p) / a, "flow": x_t - s * p}[t["kind"]]
        e = (x0_hat - x0).flatten(1)
        return (e**2).mean(1) / e.abs().mean(1).clamp(min=1e-5)

    pos = (1 - beta) * t["old"] + beta * t["pred"]
    neg = (1 + beta) * t["old"] - beta * t["pred"]
    return (r * error(pos) + (1 - r) * error(neg)).mean() / beta


def _check(seen: list[dict], beta: float, updates_per_epoch: int) -> None:
    """The loss by hand; the stored old prediction is the network's output at the epoch's first update and not
    after it, and stays the same tensor through the epoch; K distinct planned levels per sample from the sampler's
    schedule, with x_t = alpha·x0 + sigma·noise of the right process."""
    storage = {}
    for t in seen:
        torch.testing.assert_close(t["out"]["loss"], _by_hand(t, beta), rtol=1e-4, atol=1e-6)
        epoch, step = divmod(t["update"], updates_per_epoch)
        assert storage.setdefault(epoch, t["old_storage"]) == t["old_storage"]  # computed once per epoch
        if step == 0:  # before the epoch's first update the current weights are the sampling policy
            torch.testing.assert_close(t["pred"], t["old"], rtol=0, atol=1e-4)  # batch-size rounding
        else:
            assert (t["pred"] - t["old"]).abs().max() > 1e-3
        sampler = t["sampler"]
        assert all(len(set(row.tolist())) == len(row) for row in t["levels"])
        assert set(t["timestep"].tolist()) <= set(sampler.timesteps.tolist())
        if t["kind"] == "flow":
            torch.testing.assert_close(t["alpha"], 1 - t["sigma"])
            assert set(t["sigma"].tolist()) <= set(sampler.sigmas.tolist())
        else:
            torch.testing.assert_close(t["alpha"], sampler.alphas_cumprod[t["timestep"].long()].sqrt().float())
            torch.testing.assert_close(t["alpha"] ** 2 + t["sigma"] ** 2, torch.ones_like(t["alpha"]))
    assert len(storage) == 2 and len(set(storage.values())) == 2  # a new old prediction each epoch


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_flow_nft_loss_is_the_hand_formula_on_the_stored_old_prediction_and_it_exports(tmp_path, monkeypatch):
    from lifecycle.models import ModelBundle

    seen = _record(monkeypatch)
    result = nft.run(compose_cfg(tmp_path, *FAST, "model=tiny_flow", "stage.nft.beta=0.5"))
    assert result["steps"] == 4 and result["epochs"] == 2 and result["reward_queries"] == 8
    assert len(seen) == 8  # 4 updates x 2 planned levels
    _check(seen, beta=0.5, updates_per_epoch=2)
    rows = _metrics(tmp_path)
    assert [float(r["train/reward_queries"]) for r in rows] == [4, 4, 8, 8]
    assert float(rows[0]["train/old_deviation"]) < 1e-8 < float(rows[1]["train/old_deviation"])
    assert "| NFT |" in (tmp_path / "report" / "table.md").read_text()
    reloaded = ModelBundle.from_pretrained(str(tmp_path / "export"))
    assert reloaded.is_flow and reloaded.generate(["a small blue triangle moving up slowly on a gray background"],
                                                  frames=8, resolution=32, num_steps=2, seed=0).shape == (1, 8, 3, 32, 32)


def test_ddpm_epsilon_nft_full_fine_tuning_with_the_reward_curve(tmp_path, monkeypatch):
    seen = _record(monkeypatch)
    cfg = compose_cfg(tmp_path, *FAST, "model.scheduler.prediction_type=epsilon", "stage.lora=null",
                      "stage.nft.beta=0.5", "stage.evaluation=null", "stage.curve.every_n_steps=2",
                      "stage.curve.num_steps=2")
    assert nft.run(cfg)["steps"] == 4
    assert {t["kind"] for t in seen} == {"epsilon"}
    _check(seen, beta=0.5, updates_per_epoch=2)
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [(p["step"], p["reward_queries"]) for p in curve] == [(0, 0), (2, 4), (4, 8)]
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("lora" in k for k in trained["state_dict"]) and trained["lifecycle"]["reward_queries"] == 8


@pytest.mark.parametrize("model, reward", [("model=tiny_flow", "Brightness"), ("model=tiny_video", "Darkness")])
def test_a_tiny_model_climbs_the_reward_under_the_stage(tmp_path, model, reward):
    """10 epochs of 8 rollouts (groups of 4, 3 sampling steps, 2 levels each), one full fine-tuning update each (β = 1):
    the rollouts' mean reward rises (seed 0 measured: flow brightness 0.502 -> 0.522, DDPM darkness -0.502 ->
    -0.462, i.e. brightness falls), so the direction follows the reward, not a drift of the model."""
    cfg = compose_cfg(tmp_path, *FAST, model, "reward=vivid", "~reward.vivid", f"+reward.r._target_={__name__}.{reward}",
                      "stage.epochs=10", "stage.sample.batch_size=8", "stage.sample.group_size=4",
                      "stage.train.batch_size=8", "stage.nft.beta=1.0", "stage.lora=null", "stage.evaluation=null")
    nft.run(cfg)
    per_epoch = {float(r["train/epoch"]): float(r["train/reward"]) for r in _metrics(tmp_path)}
    rewards = [per_epoch[e] for e in sorted(per_epoch)]
    assert len(rewards) == 10 and sum(rewards[-3:]) / 3 > rewards[0] + 0.01, rewards


@pytest.mark.parametrize("override, key", [
    ("stage.sample.group_size=3", "stage.sample.group_size: 3 must divide"),
    ("stage.sample.group_size=1", "stage.sample.group_size: a group needs at least 2"),
    ("stage.nft.timesteps=4", "stage.nft.timesteps: 4 noise levels per sample"),
    ("stage.nft.beta=0", "stage.nft.beta: must be positive"),
    ("stage.train.batch_size=3", "stage.train.batch_size: 3 x accumulate 1 must divide"),
    ("model=tiny_svd", "model: stage=nft is for text-to-video models"),
])
def test_bad_nft_config_is_one_line_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key) as e:
        compose_cfg(tmp_path, *FAST, override, tiny=not override.startswith("model="))
    assert "\n" not in str(e.value)


def test_interrupted_and_resumed_nft_ends_identical(tmp_path, monkeypatch):
    short = [*FAST, "model=tiny_flow", "stage.epochs=3", "trainer.checkpoint_every_n_steps=3", "stage.evaluation=null"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    nft.run(compose_cfg(straight, *short))
    original = nft.NFTStage.training_step

    def preempted(self, batch, batch_idx):
        if self.updates == 5:  # mid epoch 3; the checkpoint after update 4 holds epochs 1-2
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(nft.NFTStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        nft.run(compose_cfg(resumed, *short))
    monkeypatch.setattr(nft.NFTStage, "training_step", original)
    assert nft.run(compose_cfg(resumed, *short, "trainer.resume=last"))["steps"] == 6
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["lifecycle"] == b["lifecycle"] and a["lifecycle"]["updates"] == 6
    assert [r["train/loss"] for r in _metrics(resumed)] == [r["train/loss"] for r in _metrics(straight)]


@pytest.mark.matrix  # two processes: make distributed
def test_nft_on_two_processes_counts_every_ranks_queries(tmp_path):
    """DDP on two CPU processes (gloo): each rank samples its own groups; rewards are gathered for the count."""
    import subprocess
    import sys

    from .helpers import TINY

    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "lifecycle", *FAST, *TINY, "model=tiny_flow", "stage.evaluation=null",
                    "trainer.devices=2", "trainer.strategy=ddp", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={run_dir}"], check=True, capture_output=True, text=True)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["lifecycle"]
    assert state["reward_queries"] == 2 * 4 * 2  # epochs x videos per rank x ranks
    assert [float(r["train/reward_queries"]) for r in _metrics(run_dir)] == [8, 8, 16, 16]
