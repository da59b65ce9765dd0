"""Run a training stage: build bundle, data and module from config, fit, export, sample."""

import logging
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from omegaconf import DictConfig, OmegaConf

from .callbacks.ema import EMA
from .callbacks.validation import Validation, best_checkpoint
from .checkpointing import AtomicCheckpointIO, newest_checkpoint, read_checkpoint, remove_hpc_checkpoints
from .errors import ConfigError
from .data.curriculum import Curriculum
from .data.datamodule import ShardDataModule
from .data.latent_cache import check_cache, read_manifest
from .distributed import FSDP2Strategy, gather_bundle
from .loggers import drop_rows_from
from .metrics.quality import build_quality
from .models import build_bundle
from .models.lora import add_lora, has_lora, merge_lora
from .models.lora_formats import write_formats
from .models.memory import enable_gradient_checkpointing
from .resume import RunConfig
from .rundir import swap_in
from .secrets import redact, secret_values
from .signals import StopOnSignal
from .stages.denoise import DenoiseStage

log = logging.getLogger(__name__)
# Checkpoints are taken after the optimizer step on purpose; Lightning warns about that under manual optimization.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
TRAINER_EXTRA_KEYS = ("resume", "checkpoint_every_n_steps", "throughput_window")


def check_frames(bundle, curriculum: Curriculum) -> None:
    need = bundle.fixed_frames
    for i, phase in enumerate(curriculum.phases):
        if need is not None and phase.frames != need:
            raise ConfigError(
                f"stage.curriculum[{i}].frames: {type(bundle.denoiser).__name__} takes exactly {need} frame(s), "
                f"got {phase.frames} (vary resolution and batch size instead)"
            )


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


def fit(cfg: DictConfig) -> dict:
    """`stage=pretrain`: train the denoiser over the curriculum with validation, export the EMA bundle."""
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    s = cfg.stage
    curriculum = Curriculum(OmegaConf.to_container(s.curriculum, resolve=True))
    bundle = trainable_bundle(cfg.model, s.lora)
    check_frames(bundle, curriculum)
    if (cache := read_manifest(cfg.data.shards)) is not None:
        check_cache(cache, bundle, curriculum.phases, s.train_text_encoder)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(bundle.denoiser)
    if s.compile:  # nn.Module.compile keeps the module's class and state-dict keys: dispatch and export unchanged
        bundle.denoiser.compile()
    max_steps = cfg.trainer.max_steps or curriculum.total_steps
    module = DenoiseStage(
        bundle, curriculum,
        objective=OmegaConf.to_container(s.objective), optimizer=OmegaConf.to_container(s.optimizer),
        lr_scheduler=OmegaConf.to_container(s.lr_scheduler), guard=OmegaConf.to_container(s.guard),
        gradient_clip=s.gradient_clip, accumulate=s.accumulate, train_text_encoder=s.train_text_encoder,
        max_steps=max_steps, seed=cfg.seed,
    )
    data = ShardDataModule(
        cfg.data.shards, curriculum, seed=cfg.seed, num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer, accumulate=s.accumulate, generate=cfg.data.generate,
        select=OmegaConf.to_container(s.select) if s.select else None, split=cfg.data.split,
        balance=OmegaConf.to_container(cfg.data.balance) if cfg.data.balance else None,
        caption_key=cfg.data.caption_key, decoded_cache_mb=cfg.data.decoded_cache_mb,
        max_bad_in_a_row=cfg.data.max_bad_in_a_row, max_bad_share=cfg.data.max_bad_share,
    )
    last, val = curriculum.phases[-1], s.validation
    validation = Validation(
        run_dir / "samples", prompts=instantiate(val.prompts), frames=last.frames, resolution=last.resolution,
        quality=build_quality(cfg.metrics, last.frames, last.resolution) if val.metrics else None,
        **{k: v for k, v in OmegaConf.to_container(val).items() if k not in ("prompts", "metrics", "best", "mode")},
    )
    best = best_checkpoint(run_dir, val.best, val.mode, val.every_n_steps) if val.best and val.every_n_steps else None
    if val.best and not val.every_n_steps:
        log.info("stage.validation.best: no best checkpoint, validation runs only at the end (every_n_steps=0)")
    ema = EMA(decay=s.ema.decay, every=s.ema.every) if s.ema.decay else None
    # samples/s, FLOP/s and MFU (where Lightning knows the device's peak) from the module's flops_per_batch
    throughput = ThroughputMonitor(batch_size_fn=lambda batch: len(batch["caption"]),
                                   window_size=cfg.trainer.throughput_window)
    trainer = build_trainer(cfg, run_dir, [c for c in (ema, validation, throughput, best) if c is not None], max_steps)
    start = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=resume_checkpoint(cfg, run_dir, trainer), weights_only=True)
    save_last(trainer, run_dir)
    result = {"steps": trainer.global_step, "fit_seconds": round(time.time() - start, 1),
              **validation.results.get("final", {})}
    if best is not None and best.best_model_path:
        result["best"] = {"path": best.best_model_path, val.best: best.best_model_score.item()}
    with ema.swapped(module) if ema else nullcontext():
        export_trained(trainer, bundle, lambda: trainable_bundle(cfg.model, s.lora), run_dir / "export",
                       lineage(cfg, run_dir, trainer.global_step, cfg.data.shards), lora=s.export,
                       lora_formats=s.lora_formats)
    return result

