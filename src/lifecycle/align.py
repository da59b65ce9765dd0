"""Run reward-gradient alignment (`stage=vader`): evaluate, align, evaluate again, export."""

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .callbacks.reward_curve import reward_curve
from .errors import ConfigError
from .data.conditioning import conditioning
from .data.prompts import load_prompts
from .metrics.reward_table import evaluate, write_table
from .models import build_bundle
from .models.memory import enable_gradient_checkpointing, freeze_to_dtype
from .rewards.base import build_reward
from .stages.vader import VaderStage
from .train import (build_trainer, export_trained, for_evaluation, lineage, make_trainable, resume_checkpoint,
                    save_last, trainable_bundle)

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def vader(cfg: DictConfig) -> dict:
    """VADER on `model.pretrained` (usually the previous stage's export) with `reward`, over `prompts.train`.

    Image-to-video bundles sample from `stage.condition` images, in training and evaluation alike.
    """
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    s = cfg.stage
    bundle = build_bundle(cfg.model)
    reward = build_reward(cfg.reward)
    prompt_sets = {name: load_prompts(cfg.prompts[name], f"prompts.{name}") for name in ("train", "test")}
    images = None if bundle.image_encoder is None else conditioning(s.condition, s.resolution, cfg.seed)
    if images is None and s.clips > 1:
        raise ConfigError(f"stage.clips: long-horizon rollout ({s.clips} clips) needs an image-to-video model")
    settings = {**OmegaConf.to_container(s.evaluation), "frames": s.frames, "resolution": s.resolution,
                "images": images, "clips": s.clips}

    for_evaluation(cfg, bundle, reward)
    before = evaluate(bundle, reward, prompt_sets, run_dir / "samples", "before", settings, write=rank_zero_only.rank == 0)

    make_trainable(bundle, s.lora)
    if s.memory.gradient_checkpointing:
        enable_gradient_checkpointing(bundle.denoiser)
    dtype = DTYPES.get(s.memory.frozen_dtype)
    if dtype is not None:
        for part in (bundle.denoiser, bundle.text_encoder, bundle.image_encoder, bundle.vae, reward):
            if part is not None:
                freeze_to_dtype(part, dtype)
    module = VaderStage(
        bundle, reward, prompt_sets["train"], frames=s.frames, resolution=s.resolution,
        sampling=OmegaConf.to_container(s.sampling), optimizer=OmegaConf.to_container(s.optimizer),
        lr_scheduler=OmegaConf.to_container(s.lr_scheduler), batch_size=s.batch_size, decode_frames=s.decode_frames,
        gradient_clip=s.gradient_clip, accumulate=s.accumulate, offload=s.memory.offload_activations,
        autocast_dtype=dtype, seed=cfg.seed, condition=images, clips=s.clips,
    )
    curve = reward_curve(s.curve, bundle, reward, prompt_sets["train"], run_dir,
                         {"frames": s.frames, "resolution": s.resolution, "images": images, "clips": s.clips})
    trainer = build_trainer(cfg, run_dir, curve, s.steps)
    start = time.time()
    trainer.fit(module, ckpt_path=resume_checkpoint(cfg, run_dir, trainer), weights_only=True)
    save_last(trainer, run_dir)
    fit_seconds = round(time.time() - start, 1)

    for_evaluation(cfg, bundle, reward, trainer=trainer)
    with torch.autocast(trainer.strategy.root_device.type, dtype=dtype, enabled=dtype is not None):
        after = evaluate(bundle, reward, prompt_sets, run_dir / "samples", "after", settings, write=trainer.is_global_zero)
    result = {"steps": trainer.global_step, "fit_seconds": fit_seconds,
              **{f"{tag}/{name}/reward": rows[name]["reward"] for tag, rows in (("before", before), ("after", after))
                 for name in rows}}
    if dtype is not None:  # frozen weights were stored in half precision for training; export in fp32
        bundle.float()
    data = {name: cfg.prompts[name] for name in ("train", "test")}
    export_trained(trainer, bundle, lambda: trainable_bundle(cfg.model, s.lora), run_dir / "export",
                   lineage(cfg, run_dir, trainer.global_step, data), lora=s.export, lora_formats=s.lora_formats)
    if trainer.is_global_zero:
        log.info("reward before/after alignment:\n%s", write_table({"before": before, "after": after}, run_dir / "report"))
    return result
