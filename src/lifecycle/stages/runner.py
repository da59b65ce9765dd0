"""What every training stage's run shares: the sequence itself (`TrainingRun`: seed, bundle, evaluation before,
trainable weights, module, reward curve, trainer, fit, last.ckpt, evaluation after, export, before/after table),
the Trainer (checkpoints, loggers, stop on signal), the trainable bundle, resume, the export with its lineage, and
where evaluation computes."""

import logging
import os
import shutil
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ..callbacks.reward_curve import reward_curve
from ..checkpointing import AtomicCheckpointIO, newest_checkpoint, read_checkpoint, remove_hpc_checkpoints
from ..distributed import FSDP2Strategy, gather_bundle
from ..errors import ConfigError
from ..loggers import drop_rows_from
from ..data.prompts import load_prompts
from ..metrics.reward_table import evaluate, write_table
from ..models import ModelBundle, build_bundle
from ..models.lora import add_lora, has_lora, merge_lora
from ..models.lora_formats import write_formats
from ..resume import RunConfig
from ..rewards.base import Reward, build_reward
from ..rundir import swap_in
from ..secrets import redact, secret_values
from ..signals import StopOnSignal
from .base import StageConfig

log = logging.getLogger(__name__)
# Checkpoints are taken after the optimizer step on purpose; Lightning warns about that under manual optimization.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
TRAINER_EXTRA_KEYS = ("resume", "checkpoint_every_n_steps", "throughput_window")


def stage_device(cfg: DictConfig, trainer: L.Trainer | None = None) -> torch.device:
    """Where a stage's models compute outside `trainer.fit` (the evaluations before and after training): the trainer's
    device, or, before the trainer exists, this rank's GPU under a GPU trainer. Lightning's teardown leaves the
    trained module on the CPU, so work after `fit` must move it back (or it would sample on the CPU)."""
    if trainer is not None:
        return trainer.strategy.root_device
    if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def for_evaluation(cfg: DictConfig, *modules: torch.nn.Module, trainer: L.Trainer | None = None) -> None:
    """`modules` (bundle, reward) in eval mode on `stage_device`: before training, or after `trainer.fit`."""
    for module in modules:
        module.eval().to(stage_device(cfg, trainer))


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, max_steps: int) -> L.Trainer:
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg["max_steps"] = max_steps
    every = tcfg["checkpoint_every_n_steps"]
    for key in TRAINER_EXTRA_KEYS:
        tcfg.pop(key)
    if isinstance(tcfg["strategy"], dict):
        tcfg["strategy"] = instantiate(tcfg["strategy"])
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=every, save_top_k=1, save_last=True,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    stop = StopOnSignal(run_dir / "checkpoints" / "last.ckpt")  # last: after the callbacks that update state
    callbacks = [checkpoint, RunConfig(cfg), *callbacks, stop]
    return L.Trainer(default_root_dir=run_dir, callbacks=callbacks, logger=loggers or False,
                     plugins=[AtomicCheckpointIO()], **tcfg)


def make_trainable(bundle, lora: DictConfig | None) -> None:
    """LoRA on the denoiser (only the adapters train), or the whole denoiser when `lora` is null.

    A parent exported as base + adapter is merged first, so this stage starts from the parent as
    trained (a second adapter of the same name would replace the first).
    """
    if has_lora(bundle.denoiser):
        merge_lora(bundle.denoiser)
    if lora is None:
        bundle.denoiser.requires_grad_(True)
        return
    bundle.denoiser.requires_grad_(False)
    kwargs = {"target_modules": list(lora.target_modules)} if lora.target_modules else {}
    add_lora(bundle.denoiser, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, **kwargs)


def trainable_bundle(model: DictConfig, lora: DictConfig | None):
    """The configured bundle with its denoiser's trainable weights chosen (LoRA, or all when `lora` is null)."""
    bundle = build_bundle(model)
    make_trainable(bundle, lora)
    return bundle


def resume_checkpoint(cfg: DictConfig, run_dir: Path, trainer: L.Trainer) -> str | None:
    """The checkpoint `trainer.resume` names, for Lightning: `last` is the run directory's newest valid
    checkpoint of any kind (`last.ckpt`, step checkpoints, SLURM's `hpc_ckpt_<n>.ckpt`; none: a fresh start).
    Metrics rows logged past that checkpoint are dropped (the resumed run logs them again), all of them when
    there is no checkpoint to resume (an attempt killed before its first one). Requeue checkpoints other than
    the one resumed are older or torn, and removed.

    A sharded checkpoint (a folder, from `trainer=fsdp`) resumes only under `trainer=fsdp`, on any number of ranks.
    """
    resume, resolved = cfg.trainer.resume, None
    try:
        if resume == "last":
            resolved = (newest_checkpoint(run_dir) or (None,))[0]
        elif resume:
            resolved = Path(resume)
        ckpt = read_checkpoint(resolved) if resolved is not None else {}
    except ValueError as e:
        raise ConfigError(f"trainer.resume: {e}") from None
    step = ckpt.get("global_step", 0)
    if resolved is not None:
        sharded = _is_sharded_checkpoint(resolved)  # a folder with Lightning's meta.pt
        if sharded != isinstance(trainer.strategy, FSDP2Strategy):
            raise ConfigError(f"trainer.resume: {resolved} is a {'sharded' if sharded else 'single-file'} checkpoint; "
                              f"resume it with {'trainer=fsdp' if sharded else 'a non-FSDP trainer'}")
        run_config = next(c for c in trainer.callbacks if isinstance(c, RunConfig))
        run_config.check(ckpt.get("callbacks", {}).get(run_config.state_key, {}).get("config"), resolved, step)
        log.info("resuming from %s (step %d)", resolved, step)
    if trainer.is_global_zero:
        drop_rows_from(run_dir / "metrics.csv", step)
        if resume == "last":
            remove_hpc_checkpoints(run_dir, keep=resolved)
    return None if resolved is None else str(resolved)


def save_last(trainer: L.Trainer, run_dir: Path) -> None:
    """The final step's full checkpoint `checkpoints/last.ckpt`, for resume and export; SLURM requeue checkpoints
    are older from then on."""
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:
        remove_hpc_checkpoints(run_dir)


def lineage(cfg: DictConfig, run_dir: Path, step: int, data, **extra) -> dict:
    """What an export records of its making: recipe, stage, parent export, data, step, run directory, config
    (resolved, with secrets redacted)."""
    made = {"recipe": cfg.get("recipe"), "stage": cfg.stage.name, "parent": cfg.model.get("pretrained"), "data": data,
            "step": step, "run_dir": str(run_dir), **extra, "config": OmegaConf.to_container(cfg, resolve=True)}
    return redact(made, secret_values(cfg))


def with_resumes(lineage: dict, trainer: L.Trainer) -> dict:
    """`lineage` plus what each resume of the run changed, at which step (`resumed`): the values that actually ran."""
    resumed = next(c for c in trainer.callbacks if isinstance(c, RunConfig)).history
    return {**lineage, "resumed": resumed} if resumed else lineage


def export(bundle, path: Path, lineage: dict, lora: str = "merge", lora_formats: list[str] = ()) -> None:
    """Write the bundle folder next to `path` and swap it in, so `path` is never half-written and an old export
    stays until the new one is complete (`lifecycle.rundir.swap_in`).

    A LoRA denoiser is exported merged, or as base weights plus an adapter folder (`lora="adapter"`); with
    `lora_formats` its LoRA is also written in those layouts to `lora_formats/` (models/lora_formats.py).
    """
    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    bundle.save_pretrained(staging, lineage=lineage, lora=lora)
    if lora_formats:
        write_formats(bundle.denoiser, staging / "lora_formats", list(lora_formats))
    swap_in(staging, path)


def export_trained(trainer: L.Trainer, bundle, rebuild, path: Path, lineage: dict, lora: str = "merge",
                   lora_formats: list[str] = ()) -> None:
    """`export` on rank 0 after training; a sharded (`trainer=fsdp`) bundle is first gathered into `rebuild()`,
    an unsharded bundle of the same structure, so every rank must call this."""
    lineage = with_resumes(lineage, trainer)
    if isinstance(trainer.strategy, FSDP2Strategy):
        bundle = gather_bundle(bundle, rebuild)
    if trainer.is_global_zero:
        export(bundle, path, lineage, lora=lora, lora_formats=lora_formats)
        log.info("exported %s", path)


class TrainingRun:
    """The run every training stage follows, with hooks for what differs:

        seed -> bundle (`check_bundle`) -> reward and prompt sets (when the stage uses a reward) -> evaluation
        before (`stage.evaluation`) -> trainable weights (`stage.lora`; then `prepare`) -> `module` ->
        `datamodule` -> callbacks (the reward curve, `callbacks`) -> trainer (`max_steps`) -> fit (resumable)
        -> checkpoints/last.ckpt -> evaluation after -> `result` -> export (inside `exporting`) -> table.

    A stage subclasses it, sets `config` (its Config) and `method` (its name in the table), implements
    `module`, and its `run(cfg)` is `MyRun(cfg)()`.
    """

    config: type[StageConfig] = StageConfig
    method: str = "alignment"  # the before/after table's name for the training
    prompt_set_names: tuple[str, ...] = ("train", "test")

    def __init__(self, cfg: DictConfig):
        self.cfg, self.stage, self.run_dir = cfg, cfg.stage, Path(cfg.run_dir)
        self.reward: Reward | None = None
        self.prompt_sets: dict[str, list[str]] = {}

    # -- hooks ------------------------------------------------------------------------------------
    def check_bundle(self, bundle: ModelBundle) -> None:
        """Refuse a model the stage cannot train (ConfigError), before any compute."""

    def sampling(self, bundle: ModelBundle) -> dict:
        """How the stage samples videos for evaluation and the reward curve, besides `stage.evaluation`
        (called once, after the reward and prompt sets are loaded)."""
        return {"frames": self.stage.frames, "resolution": self.stage.resolution}

    def prepare(self, bundle: ModelBundle) -> None:
        """After the trainable weights are chosen: memory savers, compilation, checks on the trainable bundle."""

    def module(self, bundle: ModelBundle) -> L.LightningModule:
        raise NotImplementedError

    def datamodule(self, module: L.LightningModule) -> L.LightningDataModule | None:
        """The data the module trains on, unless it makes its own (prompt streams)."""
        return None

    def curve_offset(self) -> dict | None:
        """Reward queries and seconds spent before this stage, where its reward curve starts."""
        return None

    def callbacks(self, module: L.LightningModule) -> list:
        """Callbacks besides the reward curve."""
        return []

    def max_steps(self, module: L.LightningModule) -> int:
        return self.stage.steps

    def trainer_config(self, module: L.LightningModule) -> DictConfig:
        """The config the trainer is built from (a stage may round the checkpoint interval)."""
        return self.cfg

    def evaluating(self, trainer: L.Trainer) -> AbstractContextManager:
        """Around the evaluation after training (e.g. the autocast training used)."""
        return nullcontext()

    def result(self, module: L.LightningModule, trainer: L.Trainer) -> dict:
        """The stage's own figures for result.json."""
        return {}

    def exporting(self, module: L.LightningModule, bundle: ModelBundle) -> AbstractContextManager:
        """Around the export (e.g. EMA weights swapped in)."""
        return nullcontext()

    def lineage_data(self):
        """What the export records as the data it was trained on."""
        return {name: self.cfg.prompts[name] for name in self.prompt_set_names}

    def lineage_extra(self, module: L.LightningModule) -> dict:
        return {}

    # -- the sequence -------------------------------------------------------------------------------
    def evaluate(self, bundle: ModelBundle, tag: str, write: bool, settings: dict) -> dict:
        return evaluate(bundle, self.reward, self.prompt_sets, self.run_dir / "samples", tag, settings, write=write)

    def __call__(self) -> dict:
        cfg, s, run_dir = self.cfg, self.stage, self.run_dir
        L.seed_everything(cfg.seed, workers=True)
        bundle = build_bundle(cfg.model)
        self.check_bundle(bundle)
        evaluation = s.get("evaluation")
        if self.config.uses_reward(s):
            self.reward = build_reward(cfg.reward)
            names = self.prompt_set_names if evaluation is not None else ("train",)
            self.prompt_sets = {name: load_prompts(cfg.prompts[name], f"prompts.{name}") for name in names}
        sampling = self.sampling(bundle)
        rows = {}
        if evaluation is not None:
            settings = {**OmegaConf.to_container(evaluation), **sampling}
            for_evaluation(cfg, bundle, self.reward)
            rows["before"] = self.evaluate(bundle, "before", rank_zero_only.rank == 0, settings)

        make_trainable(bundle, s.lora)  # merges an adapter parent first
        self.prepare(bundle)
        module = self.module(bundle)
        data = self.datamodule(module)
        curve = []
        if s.get("curve") is not None and s.curve.every_n_steps:
            curve = reward_curve(s.curve, bundle, self.reward, self.prompt_sets["train"], run_dir, sampling,
                                 self.curve_offset(), list(s.get("judge") or []), s.get("judge_guard"))
        trainer = build_trainer(self.trainer_config(module), run_dir, [*curve, *self.callbacks(module)],
                                self.max_steps(module))
        start = time.time()
        trainer.fit(module, datamodule=data, ckpt_path=resume_checkpoint(cfg, run_dir, trainer), weights_only=True)
        save_last(trainer, run_dir)
        result = {"steps": trainer.global_step, "fit_seconds": round(time.time() - start, 1)}
        for callback in curve:  # the judge guard: the best-by-judge weights back for the evaluation and export
            if (judged := callback.finish(module)) is not None:
                result["judge"] = judged
                if judged["restored_best"]:
                    log.info("judge guard: evaluating and exporting the weights of step %d (best %s %.4g), not those "
                             "of step %d (checkpoints/last.ckpt)", judged["best"]["step"], "/".join(judged["judge"]),
                             judged["best"]["judge"], judged["last_step"])

        if evaluation is not None:
            for_evaluation(cfg, bundle, self.reward, trainer=trainer)
            with self.evaluating(trainer):
                rows["after"] = self.evaluate(bundle, "after", trainer.is_global_zero, settings)
            result.update({f"{tag}/{name}/reward": r[name]["reward"] for tag, r in rows.items() for name in r})
        result.update(self.result(module, trainer))
        with self.exporting(module, bundle):
            export_trained(trainer, bundle, lambda: trainable_bundle(cfg.model, s.lora), run_dir / "export",
                           lineage(cfg, run_dir, trainer.global_step, self.lineage_data(), **self.lineage_extra(module)),
                           lora=s.export, lora_formats=s.lora_formats)
        if trainer.is_global_zero and rows:
            log.info("reward before/after %s:\n%s", self.method, write_table(rows, run_dir / "report", self.method))
        return result
