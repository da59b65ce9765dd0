"""Preference pairs (`stage=preferences`): sample candidates, score them, keep the best against the worst.

For each prompt of `prompts.train` (`repeats` times, each time with new noise): sample
`candidates` videos from `model.pretrained`, score them with `reward` (or the function
`stage.annotator`), and pair the best with the worst (`strategy: best_worst`) or every candidate
with every other (`all`), chosen = the higher score. Pairs whose scores differ by less than
`min_margin` (or not at all) are ties: dropped and counted. `source: pickapic` instead converts
a Pick-a-Pic-style JSON-lines file. Either way the pairs go to `stage.out` as preference shards
(`data.preferences`); an existing complete folder there is kept and nothing is run.
"""

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from hydra.utils import get_method
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm import tqdm

from ..config import check_prompts, choice, import_path, positive
from ..data.preferences import load_pickapic, read_manifest, write_pairs
from ..data.prompts import load_prompts
from ..errors import ConfigError
from ..models import build_bundle
from ..outputs.samples import to_uint8
from ..rewards.base import build_reward
from ..secrets import redact, secret_values
from .base import StageConfig

log = logging.getLogger(__name__)
STRATEGIES = ("best_worst", "all")


@dataclass
class Config(StageConfig):
    source: str = MISSING  # sampled | pickapic
    path: Optional[str] = None  # pickapic: the JSON-lines file
    out: str = MISSING
    candidates: int = MISSING
    repeats: int = 1
    strategy: str = MISSING  # best_worst | all
    min_margin: float = MISSING
    frames: int = 8
    resolution: int = 32
    num_steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 16
    annotator: Optional[str] = None  # dotted path of a (videos, prompts) -> scores function, in place of `reward`
    shard_size: int = 256

    @classmethod
    def uses_reward(cls, stage: DictConfig) -> bool:
        return stage.source == "sampled" and not stage.annotator

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        return stage.source == "sampled"

    @classmethod
    def resolutions(cls, stage: DictConfig) -> dict[str, int]:
        return {"stage.resolution": stage.resolution} if stage.source == "sampled" else {}

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        st = cfg.stage
        choice("stage.source", st.source, ("sampled", "pickapic"))
        choice("stage.strategy", st.strategy, STRATEGIES)
        positive(st, "repeats", "frames", "resolution", "num_steps", "batch_size", "shard_size")
        if st.candidates < 2:
            raise ConfigError(f"stage.candidates: a pair needs at least 2 candidates, got {st.candidates}")
        if st.min_margin < 0:
            raise ConfigError(f"stage.min_margin: must be >= 0, got {st.min_margin}")
        if st.source == "pickapic":
            if not st.path or not os.path.isfile(os.path.expanduser(st.path)):
                raise ConfigError(f"stage.path: no Pick-a-Pic JSON-lines file {st.path!r}")
            return
        check_prompts(cfg, "train")
        if st.annotator:
            import_path("stage.annotator", st.annotator)


def choose_pairs(scores: list[float], strategy: str, min_margin: float) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) candidate indices from one prompt's candidate scores, and how many ties were dropped.

    best_worst: the highest against the lowest score; all: every unordered pair of candidates.
    A pair is a tie when its score difference is below `min_margin` or zero.
    """
    if strategy == "best_worst":
        ranked = sorted(range(len(scores)), key=lambda i: scores[i])
        candidates = [(ranked[-1], ranked[0])]
    elif strategy == "all":
        candidates = [(i, j) if scores[i] >= scores[j] else (j, i)
                      for i in range(len(scores)) for j in range(i + 1, len(scores))]
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    kept = [(c, r) for c, r in candidates if scores[c] - scores[r] >= min_margin and scores[c] > scores[r]]
    return kept, len(candidates) - len(kept)


def sampled_pairs(bundle, score: Callable, prompts: list[str], s: DictConfig, seed: int, fabric: L.Fabric,
                  stats: dict) -> Iterator[dict]:
    """Pairs from `s.candidates` samples per (repeat, prompt); candidate j of job q starts from noise seed
    `seed + q·candidates + j`, so every candidate in the run has its own noise. Ties add to `stats["ties"]`;
    at the end `stats` holds the videos scored (`reward_queries`) and the `seconds` the pairs took."""
    start_time = time.perf_counter()
    n = s.candidates
    jobs = [prompt for _ in range(s.repeats) for prompt in prompts]
    per_call = max(1, s.batch_size // n)  # prompts per sampling call
    with tqdm(total=len(jobs), desc="preference prompts", unit="prompt") as bar:
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start : start + per_call]
            expanded = [p for p in chunk for _ in range(n)]
            with torch.no_grad(), fabric.autocast():
                videos = bundle.generate(expanded, frames=s.frames, resolution=s.resolution, num_steps=s.num_steps,
                                         guidance_scale=s.guidance_scale, seed=seed + start * n,
                                         batch_size=s.batch_size).float()
                scores = torch.as_tensor(score(videos, expanded)).float().cpu().tolist()
            clips = to_uint8(videos)
            for k, prompt in enumerate(chunk):
                mine = scores[k * n : (k + 1) * n]
                kept, ties = choose_pairs(mine, s.strategy, s.min_margin)
                stats["ties"] += ties
                for c, r in kept:
                    yield {"prompt": prompt, "chosen": clips[k * n + c], "rejected": clips[k * n + r],
                           "chosen_score": mine[c], "rejected_score": mine[r], "scores": mine, "source": "sampled"}
            bar.update(len(chunk))
    stats["reward_queries"] = len(jobs) * n
    stats["seconds"] = round(time.perf_counter() - start_time, 2)


def run(cfg: DictConfig) -> dict:
    """Write the preference pairs of `stage.source` to `stage.out`; returns {pairs, ties, out}."""
    s = cfg.stage
    out = Path(s.out)
    existing = read_manifest(out)
    if existing is not None:
        log.info("%s already holds %d pairs; nothing to do", out, existing["pairs"])
        return {"pairs": existing["pairs"], "ties": existing.get("ties"), "out": str(out), "reused": True}

    if s.source == "pickapic":
        manifest = {"source": "pickapic", "path": s.path, "ties": 0, "corrupt": 0}
        write_pairs(out, load_pickapic(s.path, s.resolution, stats=manifest), s.shard_size, manifest=manifest)
        pairs = read_manifest(out)["pairs"]
        log.info("wrote %d Pick-a-Pic pairs to %s (%d ties, %d unreadable rows dropped)",
                 pairs, out, manifest["ties"], manifest["corrupt"])
        return {"pairs": pairs, "ties": manifest["ties"], "corrupt": manifest["corrupt"], "out": str(out)}

    L.seed_everything(cfg.seed, workers=True)
    fabric = L.Fabric(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision)
    bundle = build_bundle(cfg.model)
    if bundle.image_encoder is not None:
        raise ConfigError("model: stage=preferences samples text-to-video models (this one is image-to-video)")
    bundle.to(fabric.device).eval()
    if s.annotator:
        score, judge = get_method(s.annotator), s.annotator
    else:
        score = build_reward(cfg.reward).to(fabric.device).eval()
        judge = redact(OmegaConf.to_container(cfg.reward, resolve=True), secret_values(cfg))
    prompts = load_prompts(cfg.prompts.train, "prompts.train")
    manifest = {"source": "sampled", "reward": judge, "model": cfg.model.pretrained, "prompts": len(prompts),
                "repeats": s.repeats, "candidates": s.candidates, "strategy": s.strategy, "min_margin": s.min_margin,
                "num_steps": s.num_steps, "guidance_scale": s.guidance_scale, "seed": cfg.seed, "ties": 0}
    write_pairs(out, sampled_pairs(bundle, score, prompts, s, cfg.seed, fabric, manifest), s.shard_size,
                manifest=manifest)
    pairs = read_manifest(out)["pairs"]
    log.info("wrote %d preference pairs to %s (%d ties dropped)", pairs, out, manifest["ties"])
    return {"pairs": pairs, "ties": manifest["ties"], "out": str(out)}
