"""Conditioning images for image-to-video models, one per prompt.

`stage.condition` says where they come from: `synthetic` renders the first frame of the
synthetic-world clip a caption describes; any other value is a folder of image files, looked
up by prompt. Images are float (B, 3, H, W) in [0, 1], squashed to the square training
resolution (as SVD squashes its input).
"""

import re
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import synthetic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def prompt_attributes(prompt: str) -> dict[str, str]:
    """The synthetic-world attributes a prompt names: the first word of each attribute's vocabulary."""
    words = re.findall(r"[a-z]+", prompt.lower())
    found = {}
    for name, choices in synthetic.ATTRIBUTES.items():
        word = next((w for w in words if w in choices), None)
        if word is not None:
            found[name] = word
    return found


def condition_images(prompts: list[str], resolution: int, seed: int = 0) -> torch.Tensor:
    """Frame 0 of a synthetic-world clip per prompt, (B, 3, resolution, resolution) in [0, 1].

    The attributes the prompt names are fixed; the rest, and the start position, are drawn from
    (`seed`, the prompt's CRC-32), so a prompt always gets the same image whatever batch it is in.
    """
    frames = []
    for prompt in prompts:
        rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
        meta = synthetic.sample_metadata(rng, **prompt_attributes(prompt))
        frames.append(synthetic.render_clip(meta, frames=1, size=resolution)[0])
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def image_path(folder: Path, prompt: str) -> Path:
    """`folder/prompt` if that file exists, else `folder/prompt<suffix>` for a suffix in IMAGE_SUFFIXES."""
    for path in (folder / prompt, *(folder / f"{prompt}{suffix}" for suffix in IMAGE_SUFFIXES)):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no conditioning image for prompt {prompt!r} in {str(folder)!r} "
                            f"(expected the file {prompt!r}, or it with one of {list(IMAGE_SUFFIXES)})")


def folder_images(folder: Path, prompts: list[str], resolution: int) -> torch.Tensor:
    """The image named by each prompt in `folder`, (B, 3, resolution, resolution) in [0, 1].

    Decoded and resized with PIL (bicubic): these are inputs, nothing backpropagates into them.
    """
    images = []
    for prompt in prompts:
        with Image.open(image_path(folder, prompt)) as image:
            image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        images.append(np.asarray(image))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def conditioning(source: str, resolution: int, seed: int = 0) -> Callable[[list[str]], torch.Tensor]:
    """prompts -> conditioning images, for `stage.condition` = `synthetic` or a folder of images."""
    if source == "synthetic":
        return partial(condition_images, resolution=resolution, seed=seed)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"stage.condition: {source!r} is neither 'synthetic' nor a folder of images")
    return partial(folder_images, folder, resolution=resolution)
