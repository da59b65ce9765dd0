"""Safety layers on every exported sample: a content filter, an invisible watermark and provenance.

Every sample the framework exports (sample videos of training, evaluation and alignment tables) goes
through `lifecycle.outputs.samples.write_samples`, which applies the process-wide output policy:

- content filter (`outputs.filter`, off by default; `outputs/filter=classifier outputs.filter.model=<id>`): a
  transformers image classifier (lifecycle.curation.safety.SafetyFilter) scores each clip; a clip at or over
  its threshold is exported as a grey clip, logged at warning level and counted (`blocked` in the scores json
  and in provenance.json);
- invisible watermark (`outputs.watermark`, on by default): frames are upscaled (nearest) to `min_size` and
  every frame of every mp4 and gif, and filmstrip.png, carry `message` (lifecycle.outputs.watermark); each
  file is checked right after writing (provenance.json: `watermark.verified`);
- files: an mp4 per sample, and a GIF of the first `outputs.gif_previews` samples of each set (GIFs play where
  mp4 does not: markdown, TensorBoard; null: a GIF of every sample);
- provenance (`outputs.provenance`, on by default): provenance.json beside the samples (model lineage, recipe,
  stage, seed, time, lifecycle version, one entry per sample), and a compact copy inside each file
  (lifecycle.outputs.provenance).

`configure(cfg)` sets the policy from a composed config; the CLI and recipes call it right before each stage
runs, and it builds the filter model once. Until then (library use, tests calling a stage function directly)
the default `Policy()` applies: the default watermark, provenance without recipe, stage, seed or model, and no
filter.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..errors import ConfigError
from .provenance import context as run_context
from .provenance import lineage

METHODS = ("dwtDctSvd",)  # imwatermark's methods offered (see lifecycle.outputs.watermark)
MAX_MESSAGE_BYTES = 4  # 32 bits: the length measured to survive our encoders without bit errors
MIN_SIZE = 256  # imwatermark refuses images of fewer than 256x256 pixels


@dataclass(frozen=True)
class Mark:
    """The watermark: `message` (UTF-8, 1 to MAX_MESSAGE_BYTES bytes) with imwatermark's `method`, in frames
    whose short side is at least `min_size` pixels."""

    message: str = "lcyc"
    method: str = "dwtDctSvd"
    min_size: int = MIN_SIZE

    @property
    def bits(self) -> np.ndarray:
        return np.unpackbits(np.frombuffer(self.message.encode(), dtype=np.uint8))


@dataclass(frozen=True)
class Policy:
    """What the sink applies: `filter` (`.scores(clips)` and `.threshold`, a SafetyFilter; None: off),
    `watermark` (None: off), whether to write `provenance`, the provenance `context` of the run, and how many
    samples of a set also get a GIF (`gif_previews`; None: all)."""

    filter: Any = None
    watermark: Mark | None = Mark()
    provenance: bool = True
    context: dict = field(default_factory=lambda: run_context(None))
    gif_previews: int | None = 8


_policy: Policy | None = None


def current() -> Policy:
    """The configured policy, or the default one."""
    return _policy or Policy()


def configure(cfg: DictConfig | None) -> Policy:
    """Set the process-wide policy from a composed, validated config (None: back to the default)."""
    global _policy
    _policy = None if cfg is None else from_config(cfg)
    return current()


@contextmanager
def sampled_from(export: str):
    """Within it, exported samples record `export` (and its lineage) as the model that made them, in place of
    `model.pretrained`: for stages that sample several models (stage=eval)."""
    global _policy
    before = _policy
    policy = current()
    _policy = replace(policy, context={**policy.context, "model": {"pretrained": export, "lineage": lineage(export)}})
    try:
        yield
    finally:
        _policy = before


def from_config(cfg: DictConfig) -> Policy:
    """The policy of `cfg.outputs`, with the content filter built and the run's provenance context."""
    out = cfg.outputs
    mark = out.watermark
    return Policy(filter=_build_filter(out.filter),
                  watermark=Mark(mark.message, mark.method, mark.min_size) if mark.enabled else None,
                  provenance=out.provenance, context=run_context(cfg), gif_previews=out.gif_previews)


def _build_filter(node):
    if node is None:
        return None
    try:
        return instantiate(node)
    except Exception as e:  # a model that does not load is a bad outputs.filter
        raise ConfigError(f"outputs.filter: cannot build {node.get('_target_')}: {e}") from e
