"""Prompt sets and the vocabulary of the synthetic world."""

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
