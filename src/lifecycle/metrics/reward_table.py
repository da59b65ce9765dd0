"""Reward on training and held-out prompts, before and after alignment (the VADER paper's Table 1 layout)."""

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.oracle import ORACLE_COLUMNS, prompt_fidelity
from ..outputs.samples import write_samples
from ..rewards.base import WeightedSum



def sample_videos(bundle, prompts: list[str], *, frames: int, resolution: int, num_steps: int, guidance_scale: float,
                  seed: int, batch_size: int, images: Callable[[list[str]], torch.Tensor] | None = None,
                  clips: int = 1) -> torch.Tensor:
    """One video per prompt: text-to-video (prompt i from seed `seed + i`), or for image-to-video bundles
    `bundle.generate_long` from the conditioning images `images(prompts)`, `clips` clips each."""
    if bundle.image_encoder is None:
        return bundle.generate(prompts, frames=frames, resolution=resolution, num_steps=num_steps,
                               guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
    conditions = images(prompts)
    # batch `start` draws seeds seed + start·clips onwards, so no two clips anywhere share a seed
    return torch.cat([bundle.generate_long(conditions[start : start + batch_size], clips, frames, resolution, num_steps,
                                           guidance_scale, seed + start * clips)
                      for start in range(0, len(prompts), batch_size)])


@torch.no_grad()
def score_prompts(bundle, reward: WeightedSum, prompts: list[str], *, oracle: bool,
                  **sampling) -> tuple[torch.Tensor, dict]:
    """Sample one video per prompt (:func:`sample_videos` with `sampling`) and score it: reward mean/std,
    each term, oracle fidelity."""
    videos = sample_videos(bundle, prompts, **sampling)
    parts = reward_terms(reward, videos, prompts, sampling["batch_size"])
    total = sum(reward.weights[name] * score for name, score in parts.items())
    row = {"reward": total.mean().item(), "reward_std": total.std(correction=0).item(), "n": len(prompts)}
    row.update({f"reward/{name}": score.mean().item() for name, score in parts.items()})
    if oracle:
        fidelity = prompt_fidelity(videos, prompts)
        row.update({k: fidelity[k] for k in ORACLE_COLUMNS})
    return videos, row


def reward_terms(reward: WeightedSum, videos: torch.Tensor, prompts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Each term of `reward` on each video (unweighted), scored `batch_size` videos at a time."""
    return {name: torch.cat([term(v, p) for v, p in _chunks(videos, prompts, batch_size)])
            for name, term in reward.terms.items()}


def _chunks(videos: torch.Tensor, prompts: list[str], size: int):
    for start in range(0, len(prompts), size):
        yield videos[start : start + size], prompts[start : start + size]


def evaluate(bundle, reward, prompt_sets: dict[str, list[str]], out_dir: Path, tag: str, settings: dict,
             write: bool = True, quality=None) -> dict[str, dict]:
    """Score every prompt set (with `quality`, a `metrics.quality.VideoQuality`, too); with `write`, leave videos
    and scores under `out_dir/<tag>/<set>/`."""
    rows = {}
    fps = settings.get("fps", 8)
    kwargs = {k: v for k, v in settings.items() if k != "fps"}
    for name, prompts in prompt_sets.items():
        videos, rows[name] = score_prompts(bundle, reward, prompts, **kwargs)
        if quality is not None:
            rows[name].update(quality(videos, prompts))
        if write:
            write_samples(out_dir / tag / name, videos, prompts, rows[name], fps, name="scores.json")
    return rows


def table_markdown(results: dict[str, dict[str, dict]], method: str = "VADER") -> str:
    """Markdown table: one row per model (before/after), reward mean ± std per prompt set, oracle columns."""
    sets = list(next(iter(results.values())))
    oracle = [c for c in ORACLE_COLUMNS if c in results["before"][sets[-1]]]
    header = [f"reward ({s})" for s in sets] + [f"{c.replace('_accuracy', '')} acc. ({sets[-1]})" for c in oracle]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for tag, label in (("before", "base"), ("after", method)):
        rows = results[tag]
        cells = [f"{rows[s]['reward']:.4f} ± {rows[s]['reward_std']:.4f}" for s in sets]
        cells += [f"{rows[sets[-1]][c]:.3f}" for c in oracle]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(results: dict[str, dict[str, dict]], out_dir: Path, method: str = "VADER") -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.json").write_text(json.dumps(results, indent=2))
    text = table_markdown(results, method)
    (out_dir / "table.md").write_text(text)
    return text
