"""Reward model (`stage=reward_model`): fit a Bradley–Terry reward r_θ to preference pairs.

Per step: score the chosen and the rejected video of a batch of pairs with r_θ and take a
gradient step on −log σ(r_θ(chosen) − r_θ(rejected)). Held-out pairs (`val_fraction`, a fixed
function of the pair key) measure pair accuracy, the share with r_θ(chosen) > r_θ(rejected),
before and after training. The export loads as a reward: `reward=learned reward.learned.path=<run>/export`.
"""

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from ..config import check_model_paths, choice, is_later, positive
from ..data.preferences import PairDataModule, pair_batches, read_manifest
from ..errors import ConfigError
from ..rewards.bradley_terry import bradley_terry_loss, preference_accuracy
from ..rewards.learned import LearnedReward
from ..rundir import swap_in
from .base import LoRAConfig, TrainingConfig
from .optim import adamw_with_schedule, log_step
from .runner import build_trainer, lineage, resume_checkpoint, save_last, with_resumes

log = logging.getLogger(__name__)


# -- config -------------------------------------------------------------------------------------
@dataclass
class ConvScorerConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    text_buckets: int = 4096
    text_dim: int = 32
    hidden: int = 64


@dataclass
class ClipScorerConfig:
    backbone: str = "openai/clip-vit-large-patch14"
    tokenizer: Optional[str] = None
    hidden: int = 256
    lora: Optional[LoRAConfig] = None  # null: train the head only


@dataclass
class Config(TrainingConfig):
    pairs: str = MISSING
    architecture: str = "conv"  # conv | clip
    conv: ConvScorerConfig = field(default_factory=ConvScorerConfig)
    clip: ClipScorerConfig = field(default_factory=ClipScorerConfig)
    steps: int = MISSING
    batch_size: int = MISSING
    frames: Optional[int] = None  # null: the pairs' own
    resolution: Optional[int] = None
    val_fraction: float = 0.2
    eval_batch_size: int = 64
    num_workers: int = 1
    shuffle_buffer: int = 256

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        st = cfg.stage
        if not is_later(st.pairs) and not os.path.isfile(os.path.join(os.path.expanduser(st.pairs), "dataset.json")):
            raise ConfigError(f"stage.pairs: {st.pairs!r} is not a preference-pair folder (no dataset.json)")
        choice("stage.architecture", st.architecture, ("conv", "clip"))
        if st.architecture == "clip":
            check_model_paths("stage.clip", st.clip, ("backbone", "tokenizer"))
        positive(st, "steps", "batch_size", "eval_batch_size", "frames", "resolution")
        if not 0 < st.val_fraction < 1:
            raise ConfigError(f"stage.val_fraction: must be in (0, 1), got {st.val_fraction}")


# -- the LightningModule ------------------------------------------------------------------------


def score_pairs(reward: LearnedReward, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """r(chosen), r(rejected) for a batch of pairs, in one forward pass."""
    n = len(batch["prompts"])
    scores = reward(torch.cat([batch["chosen"], batch["rejected"]]), batch["prompts"] * 2)
    return scores[:n], scores[n:]


@torch.no_grad()
def pair_accuracy(reward: LearnedReward, batches: Iterable[dict], device: torch.device) -> dict:
    """{accuracy, loss (Bradley–Terry), pairs} of `reward` over `batches` of pairs."""
    was_training = reward.training
    reward.eval()
    correct = total = 0
    loss = 0.0
    for batch in batches:
        chosen, rejected = score_pairs(reward, {**batch, "chosen": batch["chosen"].to(device),
                                                "rejected": batch["rejected"].to(device)})
        n = len(batch["prompts"])
        correct += round(preference_accuracy(chosen, rejected).item() * n)
        loss += bradley_terry_loss(chosen, rejected).item() * n
        total += n
    reward.train(was_training)
    if not total:
        raise ValueError("no held-out pairs: raise stage.val_fraction or add pairs")
    return {"accuracy": correct / total, "loss": loss / total, "pairs": total}


@torch.no_grad()
def raw_statistics(reward: LearnedReward, batches: Iterable[dict], device: torch.device) -> dict:
    """{mean, std} of the raw score over every video (chosen and rejected) of `batches`."""
    was_training = reward.training
    reward.eval()
    scores = torch.cat([reward.raw(torch.cat([b["chosen"], b["rejected"]]).to(device), b["prompts"] * 2).float().cpu()
                        for b in batches])
    reward.train(was_training)
    return {"mean": scores.mean().item(), "std": scores.std(correction=0).clamp_min(1e-6).item()}


class RewardModelStage(L.LightningModule):
    def __init__(self, reward: LearnedReward, optimizer: dict, lr_scheduler: dict, gradient_clip: float | None = 1.0):
        super().__init__()
        self.reward = reward
        self.optim_cfg, self.sched_cfg, self.gradient_clip = dict(optimizer), dict(lr_scheduler), gradient_clip
        self.strict_loading = False  # checkpoints hold the trained weights only
        self.batches_seen = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        chosen, rejected = score_pairs(self.reward, batch)
        loss = bradley_terry_loss(chosen, rejected)
        self.batches_seen += 1
        log_step(self, {"train/loss": loss.detach(), "train/accuracy": preference_accuracy(chosen, rejected),
                        "train/margin": (chosen - rejected).detach().mean(), "train/skipped": float(batch["skipped"]),
                        "train/lr": self.lr_schedulers().get_last_lr()[0]}, "loss", loss.detach())
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.gradient_clip:
            self.clip_gradients(optimizer, self.gradient_clip, "norm")

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.optim_cfg, self.sched_cfg, self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A frozen backbone is reloaded from its source on resume; a checkpoint carries only what training changes.
        trained = {f"reward.{k}" for k in self.reward.trained_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["lifecycle"] = {"batches_seen": self.batches_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = checkpoint["lifecycle"]["batches_seen"]


def _log(trainer: L.Trainer, metrics: dict, step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def run(cfg: DictConfig) -> dict:
    """Fit `stage.architecture` on `stage.pairs`; report held-out accuracy before/after; export the reward."""
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    s = cfg.stage
    manifest = read_manifest(s.pairs)
    frames = s.frames or manifest["frames"]
    resolution = s.resolution or manifest["resolution"]
    if not isinstance(resolution, int):
        raise ConfigError(f"stage.resolution: the pairs are {resolution[0]}x{resolution[1]}; set a square resolution")
    reward = LearnedReward(s.architecture, **OmegaConf.to_container(s[s.architecture], resolve=True))
    module = RewardModelStage(reward, optimizer=OmegaConf.to_container(s.optimizer),
                              lr_scheduler=OmegaConf.to_container(s.lr_scheduler), gradient_clip=s.gradient_clip)
    data = PairDataModule(s.pairs, s.batch_size, frames, resolution, seed=cfg.seed, val_fraction=s.val_fraction,
                          num_workers=s.num_workers, shuffle_buffer=s.shuffle_buffer)
    trainer = build_trainer(cfg, run_dir, [], s.steps)
    device = trainer.strategy.root_device

    def evaluate() -> dict:
        batches = pair_batches(s.pairs, s.eval_batch_size, frames, resolution, split="val", val_fraction=s.val_fraction)
        return pair_accuracy(reward, batches, device)

    ckpt_path = resume_checkpoint(cfg, run_dir, trainer)
    resuming = ckpt_path is not None
    before = evaluate()
    if not resuming:  # a resumed run's metrics.csv already has this row
        _log(trainer, {"val/accuracy": before["accuracy"], "val/loss": before["loss"]}, step=0)
    start = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    save_last(trainer, run_dir)
    fit_seconds = round(time.time() - start, 1)
    after = evaluate()
    _log(trainer, {"val/accuracy": after["accuracy"], "val/loss": after["loss"]}, step=trainer.global_step)
    train_batches = pair_batches(s.pairs, s.eval_batch_size, frames, resolution, split="train",
                                 val_fraction=s.val_fraction)
    reward.set_scale(**raw_statistics(reward, train_batches, device))
    result = {"steps": trainer.global_step, "fit_seconds": fit_seconds,
              "before/accuracy": before["accuracy"], "after/accuracy": after["accuracy"]}
    if trainer.is_global_zero:
        report = {"before": before, "after": after, "scale": reward.config["scale"], "val_fraction": s.val_fraction,
                  "data": s.pairs}
        (run_dir / "report").mkdir(parents=True, exist_ok=True)
        (run_dir / "report" / "accuracy.json").write_text(json.dumps(report, indent=2))
        # its parent is the pairs it learned from (not the model that sampled them)
        made = with_resumes(lineage(cfg, run_dir, trainer.global_step, s.pairs, parent=s.pairs, accuracy=after), trainer)
        export = run_dir / "export"
        staging = export.with_name(f".{export.name}.tmp")  # swapped in whole, so the export is never half-written
        shutil.rmtree(staging, ignore_errors=True)
        reward.save_pretrained(staging, made)
        swap_in(staging, export)
        log.info("held-out pair accuracy %.3f -> %.3f (%d pairs); exported %s",
                 before["accuracy"], after["accuracy"], after["pairs"], export)
    return result
