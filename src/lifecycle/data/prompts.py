"""Prompt sets and the vocabulary of the synthetic world."""

import os
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset

from . import synthetic

CAPTION_WORDS = ("a", "moving", "on", "background")


def vocabulary() -> list[str]:
    """Every word a synthetic-world caption can contain (for the tiny word-level tokenizer)."""
    words = [*CAPTION_WORDS]
    for values in synthetic.ATTRIBUTES.values():
        words.extend(values)
    return words


def eval_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """`n` synthetic-world captions balanced over colour x direction (all 24 combinations by default)."""
    return [m["caption"] for m in synthetic.prompt_metadata(seed=seed, n=n)]


def load_prompts(spec, key: str = "prompts") -> list[str]:
    """A prompt set from config: a list of strings, or a path to a text file with one prompt per line."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: no prompt file {str(path)!r}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        prompts = [str(p) for p in spec]
    if not prompts:
        raise ValueError(f"{key}: the prompt set is empty")
    return prompts


class PromptStream(IterableDataset):
    """Batches of prompts drawn from `prompts`: a fresh seeded permutation per pass, each rank its own slice.

    The sequence is a function of (seed, batch index) alone, starting at `start_batch`, so a resumed
    run draws exactly the prompts an uninterrupted one would.
    """

    def __init__(self, prompts: list[str], batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.prompts, self.batch_size, self.seed = list(prompts), batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size

    def batch(self, index: int) -> list[str]:
        per_step = self.batch_size * self.world_size
        first = index * per_step + self.rank * self.batch_size
        n = len(self.prompts)
        out = []
        for k in range(first, first + self.batch_size):
            order = np.random.default_rng([self.seed, k // n]).permutation(n)
            out.append(self.prompts[order[k % n]])
        return out

    def __iter__(self):
        index = self.start_batch
        while True:
            yield {"prompts": self.batch(index)}
            index += 1
