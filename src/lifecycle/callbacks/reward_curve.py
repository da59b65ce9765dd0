"""Reward against reward queries and training seconds during alignment (the VADER paper's efficiency axes)."""

import json
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from ..metrics.reward_table import score_prompts


class RewardCurve(L.Callback):
    """Before the first step and every `every_n_steps` optimizer steps: sample `prompts` with fixed noise, score
    them with `reward` and append {step, reward_queries, seconds, reward, reward_std} to `path` (JSON lines).

    `reward_queries` is the module's `reward_queries` counter (videos scored so far, all ranks) and `seconds`
    the training time so far, evaluations excluded; `offset` adds work done before the stage (Diffusion-DPO:
    sampling and labelling its preference pairs). Both survive a resume through the callback's state.
    """

    def __init__(self, bundle, reward, prompts: list[str], path: Path, every_n_steps: int, sampling: dict,
                 offset: dict | None = None):
        self.bundle, self.reward, self.prompts, self.path = bundle, reward, list(prompts), Path(path)
        self.every, self.sampling = every_n_steps, dict(sampling)
        self.offset = {"reward_queries": 0, "seconds": 0.0, **(offset or {})}
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
        _, row = score_prompts(self.bundle, self.reward, self.prompts, oracle=False, **self.sampling)
        denoiser.train(training)
        if trainer.is_global_zero:
            point = {"step": trainer.global_step,
                     "reward_queries": self.offset["reward_queries"] + getattr(module, "reward_queries", 0),
                     "seconds": round(self.offset["seconds"] + self.seconds, 2),
                     "reward": row["reward"], "reward_std": row["reward_std"]}
            with self.path.open("a") as f:
                f.write(json.dumps(point) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []

    def state_dict(self) -> dict:
        return {"seconds": self.seconds + (time.perf_counter() - self.started if self.started else 0.0)}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = state["seconds"]


def reward_curve(curve: DictConfig, bundle, reward, prompts: list[str], run_dir: Path, sampling: dict,
                 offset: dict | None = None) -> list[RewardCurve]:
    """The stage's `curve` callback (sampled with `curve`'s settings plus `sampling`: frames, resolution, ...),
    or none when `curve.every_n_steps` is 0."""
    if not curve.every_n_steps:
        return []
    settings = {**{k: v for k, v in curve.items() if k != "every_n_steps"}, **sampling}
    return [RewardCurve(bundle, reward, prompts, run_dir / "curve.jsonl", curve.every_n_steps, settings, offset)]
