"""Evaluation (`stage=eval`): exported models side by side on the same prompts, noise and seeds.

Each model in `stage.models` (export folders, or run directories holding an `export/`) samples `prompts.train`
and `prompts.test` with the same settings and seeds (image-to-video models from `stage.condition` images); every
term of `reward` scores the videos, the `metrics`
group measures them (FID/KID against its reference videos, CLIP score, temporal consistency, motion), and for
synthetic-world prompts the pixel oracle checks colour and direction. Writes `report/report.md` and
`report/report.html` (tables, sample grids, training curves), `report/table.json` and `samples/<model>/<set>/`.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from .. import outputs
from ..config import check_metrics, check_prompts, is_later
from ..data.conditioning import conditioning
from ..data.prompts import load_prompts
from ..metrics.quality import build_quality
from ..metrics.report import write_report
from ..metrics.reward_table import evaluate
from ..models import ModelBundle
from ..errors import ConfigError
from ..rewards.base import build_reward
from .base import EvaluationConfig, StageConfig

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    grid_prompts: int = 8  # prompts per set in the sample grids
    curves: list[str] = MISSING  # metrics.csv columns plotted over training steps


@dataclass
class Config(StageConfig):
    models: list[str] = MISSING  # export folders, or run directories holding export/
    frames: int = 8
    resolution: int = 32
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    condition: str = "synthetic"  # image-to-video models: conditioning images (as VADER's stage.condition)
    metrics: bool = True  # the `metrics` group's FID, KID, CLIP score, temporal consistency and motion
    report: ReportConfig = field(default_factory=ReportConfig)

    @classmethod
    def uses_reward(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        if not cfg.stage.models:
            raise ConfigError("stage.models: list the export folders (or run directories) to evaluate")
        for i, path in enumerate(cfg.stage.models):
            folder = os.path.expanduser(path)
            if not is_later(folder) and not any(os.path.isfile(os.path.join(f, "model_index.json"))
                                                for f in (folder, os.path.join(folder, "export"))):
                raise ConfigError(f"stage.models[{i}]: no exported bundle in {path!r} (nor in its export/)")
        check_prompts(cfg, "train", "test")
        if cfg.stage.condition != "synthetic" and not os.path.isdir(os.path.expanduser(cfg.stage.condition)):
            raise ConfigError(f"stage.condition: {cfg.stage.condition!r} is neither 'synthetic' nor a folder of images")
        if cfg.stage.metrics:
            check_metrics(cfg)


def export_folder(path: str) -> Path:
    """The bundle folder of `path`: itself, or its `export/`."""
    folder = Path(path).expanduser()
    return folder if (folder / "model_index.json").is_file() else folder / "export"


def label(path: str) -> str:
    """A model's row name: its run directory's name (`outputs/demo/sft/export` -> `sft`)."""
    folder = export_folder(path)
    return folder.parent.name if folder.name == "export" else folder.name


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    """Score every model of `stage.models`; returns {model: {set: {score: value}}}."""
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    s = cfg.stage
    reward = build_reward(cfg.reward).eval()
    prompt_sets = {name: load_prompts(cfg.prompts[name], f"prompts.{name}") for name in ("train", "test")}
    settings = {**OmegaConf.to_container(s.evaluation), "frames": s.frames, "resolution": s.resolution}
    quality = build_quality(cfg.metrics, s.frames, s.resolution) if s.metrics else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results, exports = {}, {}
    for i, path in enumerate(s.models):
        name = label(path)
        name = name if name not in results else f"{name}_{i}"  # two exports of the same name: both rows
        exports[name] = export_folder(path)
        bundle = ModelBundle.from_pretrained(str(exports[name])).eval().to(device)
        images = None if bundle.image_encoder is None else conditioning(s.condition, s.resolution, cfg.seed)
        with outputs.sampled_from(str(exports[name])):  # the samples' provenance names the model they came from
            results[name] = evaluate(bundle, reward, prompt_sets, run_dir / "samples" / name, "",
                                     {**settings, "images": images}, quality=quality)
        log.info("evaluated %s: %s", name, {k: round(v["reward"], 4) for k, v in results[name].items()})
    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "table.json").write_text(json.dumps(results, indent=2))
    text = write_report(report, results, exports, prompt_sets, run_dir / "samples", s.report.grid_prompts,
                        list(s.report.curves), s.evaluation.fps)
    log.info("evaluation report %s:\n%s", report / "report.md", text)
    return results
