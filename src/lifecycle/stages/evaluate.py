"""Evaluation (`stage=evaluate`): several exported models side by side on the same prompts, noise and rewards.

Each model in `stage.models` (export folders, or run directories holding an `export/`) samples
`prompts.train` and `prompts.test` with the same settings and seeds; every term of `reward` scores
the videos, and for synthetic-world prompts the pixel oracle checks colour and direction. Writes
`report/table.md` (one row per model), `report/table.json` and `samples/<model>/<set>/` videos.
"""

import json
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .. import outputs
from ..data.prompts import load_prompts
from ..metrics.reward_table import ORACLE_COLUMNS, evaluate
from ..models import ModelBundle
from ..rewards.base import build_reward

log = logging.getLogger(__name__)


def export_folder(path: str) -> Path:
    """The bundle folder of `path`: itself, or its `export/`."""
    folder = Path(path).expanduser()
    return folder if (folder / "model_index.json").is_file() else folder / "export"


def label(path: str) -> str:
    """A model's row name: its run directory's name (`outputs/demo/sft/export` -> `sft`)."""
    folder = export_folder(path)
    return folder.parent.name if folder.name == "export" else folder.name


def table_markdown(results: dict[str, dict[str, dict]]) -> str:
    """One row per model: each reward term per prompt set (mean), then the oracle's accuracies on the last set."""
    first = next(iter(results.values()))
    sets = list(first)
    terms = [k for k in first[sets[0]] if k.startswith("reward/")]
    oracle = [c for c in ORACLE_COLUMNS if c in first[sets[-1]]]
    header = [f"{t.removeprefix('reward/')} ({s})" for t in terms for s in sets]
    header += [f"{c.replace('_accuracy', '')} acc. ({sets[-1]})" for c in oracle]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, rows in results.items():
        cells = [f"{rows[s][t]:.4f}" for t in terms for s in sets] + [f"{rows[sets[-1]][c]:.3f}" for c in oracle]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    """Score every model of `stage.models`; returns {model: {set: row}}."""
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    s = cfg.stage
    reward = build_reward(cfg.reward).eval()
    prompt_sets = {name: load_prompts(cfg.prompts[name], f"prompts.{name}") for name in ("train", "test")}
    settings = {**OmegaConf.to_container(s.evaluation), "frames": s.frames, "resolution": s.resolution}
    results = {}
    for path in s.models:
        name = label(path)
        folder = str(export_folder(path))
        bundle = ModelBundle.from_pretrained(folder).eval()
        with outputs.sampled_from(folder):  # the samples' provenance names the model they came from
            results[name] = evaluate(bundle, reward, prompt_sets, run_dir / "samples" / name, "", settings)
        log.info("evaluated %s: %s", name, {k: round(v["reward"], 4) for k, v in results[name].items()})
    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "table.json").write_text(json.dumps(results, indent=2))
    text = table_markdown(results)
    (report / "table.md").write_text(text)
    log.info("evaluation:\n%s", text)
    return {name: {k: v["reward"] for k, v in rows.items()} for name, rows in results.items()}
