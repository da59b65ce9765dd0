"""Reward against reward queries and training seconds during alignment (the VADER paper's efficiency axes), and
the held-out judge beside it that catches over-optimisation (reward hacking).

A judge is a score the stage does not optimise: the pixel oracle's prompt fidelity on synthetic-world prompts
(`colour_accuracy`, `direction_accuracy`, `both_accuracy`) or any reward of conf/reward/ by name. It is measured on
the curve's own videos, so it costs no extra sampling. `JudgeGuard` watches the judges' mean: when it has fallen
more than `margin` below its best while the optimised reward stands above its value at that best, the run is
over-optimising. `action: stop` ends training there (at the next step where a checkpoint may fall), `best` trains
on; both then put the best-by-judge weights back before the evaluation after training and the export, and `log`
only records the judge. Lightning's EarlyStopping and ModelCheckpoint(monitor=...) watch one metric for lack of
improvement; this rule needs two (the reward rising while the judge falls), hence its own class.
"""

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .. import CONF_DIR
from ..data.oracle import ORACLE_COLUMNS
from ..metrics.reward_table import reward_terms, score_prompts
from ..rewards.base import WeightedSum, build_reward

log = logging.getLogger(__name__)
JUDGE_ACTIONS = ("stop", "best", "log")


def reward_file(name: str) -> Path:
    return Path(CONF_DIR) / "reward" / f"{name}.yaml"


def build_judges(names: list[str]) -> WeightedSum | None:
    """The reward judges among `names` (the rest are oracle scores) as one WeightedSum, or None."""
    rewards = {n: OmegaConf.load(reward_file(n)) for n in names if n not in ORACLE_COLUMNS}
    return build_reward(rewards) if rewards else None


class JudgeGuard:
    """The over-optimisation rule on the curve's points: tracks the best judge value, the step and the reward
    there, and says when the judge has fallen more than `margin` below that best while the reward is above its
    value at the best."""

    def __init__(self, margin: float, action: str):  # checked at start-up: stages.base.check_judge
        self.margin, self.action = margin, action
        self.best: dict | None = None  # {"step", "judge", "reward"} at the best judge value so far
        self.tripped: dict | None = None  # {"step", "judge", "reward"} where the rule first held

    def update(self, step: int, reward: float, judge: float) -> bool:
        """Fold in a curve point; True when it is a new best (the weights worth keeping)."""
        if self.best is None or judge >= self.best["judge"]:
            self.best = {"step": step, "judge": judge, "reward": reward}
            return True
        if self.tripped is None and self.best["judge"] - judge > self.margin and reward > self.best["reward"]:
            self.tripped = {"step": step, "judge": judge, "reward": reward}
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "tripped": self.tripped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.tripped = state["best"], state["tripped"]


def trainable_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters (full tensors: a sharded one is gathered, on every rank)."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).to("cpu", copy=True)
    return out


@torch.no_grad()
def load_trainable_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (from `trainable_weights`) back into the module's parameters, resharding where sharded."""
    params = dict(module.named_parameters())
    for name, value in weights.items():
        p = params[name]
        if hasattr(p, "device_mesh"):  # an FSDP2 DTensor: this rank's shard of the full value
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        p.copy_(value.to(p.device, p.dtype))


class RewardCurve(L.Callback):
    """Before the first step and every `every_n_steps` optimizer steps: sample `prompts` with fixed noise, score
    them with `reward` (and its terms, and the `judge` scores) and append {step, reward_queries, seconds, reward,
    reward_std, reward/<term>, judge/<name>, judge} to `path` (JSON lines).

    `reward_queries` is the module's `reward_queries` counter (videos scored so far, all ranks) and `seconds`
    the training time so far, evaluations excluded; `offset` adds work done before the stage (Diffusion-DPO:
    sampling and labelling its preference pairs). Both survive a resume through the callback's state, as do the
    judge guard's best point and the best-by-judge weights.
    """

    def __init__(self, bundle, reward, prompts: list[str], path: Path, every_n_steps: int, sampling: dict,
                 offset: dict | None = None, judge: list[str] = (), guard: JudgeGuard | None = None):
        self.bundle, self.reward, self.prompts, self.path = bundle, reward, list(prompts), Path(path)
        self.every, self.sampling = every_n_steps, dict(sampling)
        self.offset = {"reward_queries": 0, "seconds": 0.0, **(offset or {})}
        self.judge = list(judge)
        self.judge_rewards = build_judges(self.judge)
        self.guard = guard if self.judge else None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopping = False
        self.seconds = 0.0  # training seconds before the current stretch
        self.started = 0.0
        self.last_step = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # a resumed run drops the rows measured after its checkpoint
            rows = self.rows()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= trainer.global_step))
        self.last_step = trainer.global_step
        if trainer.global_step == 0:
            self.measure(trainer, module)
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step > self.last_step:  # with accumulation several batches end on one step
            self.last_step = step
            self.seconds += time.perf_counter() - self.started
            self.measure(trainer, module)
            self.started = time.perf_counter()
        # Epoch-based stages (DDPO, GRPO, NFT) checkpoint only between epochs; they say where with `at_boundary`.
        if self.stopping and getattr(module, "at_boundary", True):
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step > self.last_step:  # the final weights, when the last interval was short
            self.last_step = trainer.global_step
            self.seconds += time.perf_counter() - self.started
            self.measure(trainer, module)
            self.started = 0.0

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        denoiser = self.bundle.denoiser
        training = denoiser.training
        denoiser.eval()
        oracle = any(name in ORACLE_COLUMNS for name in self.judge)
        videos, row = score_prompts(self.bundle, self.reward, self.prompts, oracle=oracle, **self.sampling)
        denoiser.train(training)
        point = {"step": trainer.global_step,
                 "reward_queries": self.offset["reward_queries"] + getattr(module, "reward_queries", 0),
                 "seconds": round(self.offset["seconds"] + self.seconds, 2),
                 **{k: v for k, v in row.items() if k.startswith("reward")}}
        if self.judge:
            rewards = reward_terms(self.judge_rewards, videos, self.prompts, self.sampling["batch_size"]) \
                if self.judge_rewards is not None else {}
            scores = {n: row[n] if n in ORACLE_COLUMNS else rewards[n].mean().item() for n in self.judge}
            point.update({f"judge/{n}": v for n, v in scores.items()})
            point["judge"] = sum(scores.values()) / len(scores)
            point = trainer.strategy.broadcast(point)  # rank 0's figures decide on every rank
            self.watch(trainer, module, point)
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps(point) + "\n")

    def watch(self, trainer: L.Trainer, module: L.LightningModule, point: dict) -> None:
        """Keep the best-by-judge weights; flag the run once the guard's rule holds."""
        if self.guard.update(point["step"], point["reward"], point["judge"]) and self.guard.action != "log":
            self.best_weights = trainable_weights(module)
        if self.guard.tripped is not None and self.guard.tripped["step"] == point["step"]:
            point["judge_guard"] = "tripped"
            self.stopping = self.guard.action == "stop"
            best = self.guard.best
            log.warning("judge guard: step %d: reward %.4g > %.4g at step %d, but the judge (%s) fell %.4g -> %.4g, more "
                        "than the margin %g: over-optimising%s", point["step"], point["reward"], best["reward"],
                        best["step"], "/".join(self.judge), best["judge"], point["judge"], self.guard.margin,
                        "; stopping" if self.stopping else "")

    def finish(self, module: L.LightningModule) -> dict | None:
        """After training: put the best-by-judge weights back (actions stop and best) and say what happened."""
        if self.guard is None:
            return None
        restore = self.guard.action != "log" and self.best_weights is not None \
            and self.guard.best["step"] != self.last_step
        if restore:
            load_trainable_weights(module, self.best_weights)
        return {"judge": self.judge, "action": self.guard.action, "margin": self.guard.margin, "best": self.guard.best,
                "tripped": self.guard.tripped, "last_step": self.last_step, "restored_best": restore}

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []

    def state_dict(self) -> dict:
        state = {"seconds": self.seconds + (time.perf_counter() - self.started if self.started else 0.0)}
        if self.guard is not None:
            state.update(judge_guard=self.guard.state_dict(), best_weights=self.best_weights)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.seconds = state["seconds"]
        if self.guard is not None and "judge_guard" in state:
            self.guard.load_state_dict(state["judge_guard"])
            self.best_weights = state["best_weights"]
            self.stopping = self.guard.action == "stop" and self.guard.tripped is not None


def reward_curve(curve: DictConfig, bundle, reward, prompts: list[str], run_dir: Path, sampling: dict,
                 offset: dict | None = None, judge: list[str] = (), judge_guard: DictConfig | None = None
                 ) -> list[RewardCurve]:
    """The stage's `curve` callback (sampled with `curve`'s settings plus `sampling`: frames, resolution, ...),
    with the `judge` scores and their guard, or none when `curve.every_n_steps` is 0."""
    if not curve.every_n_steps:
        return []
    settings = {**{k: v for k, v in curve.items() if k != "every_n_steps"}, **sampling}
    guard = JudgeGuard(judge_guard.margin, judge_guard.action) if judge and judge_guard is not None else None
    return [RewardCurve(bundle, reward, prompts, run_dir / "curve.jsonl", curve.every_n_steps, settings, offset,
                        judge, guard)]
