"""A trained LoRA in the key layouts tools outside diffusers load (`stage.lora_formats`), with a coverage manifest.

- `kohya`: `lora_unet_<module path, dots as underscores>.{lora_down,lora_up}.weight` and `.alpha`, as kohya-ss
  writes for UNets and AUTOMATIC1111, ComfyUI, SD.Next and diffusers' `load_lora_weights` read (UNet2D, UNet3D,
  the folded UNet of the embedded default).
- `comfyui`: a Wan transformer's LoRA under the original Wan module names ComfyUI, musubi-tuner and diffusers'
  Wan loader read: `diffusion_model.blocks.<i>.self_attn.q.lora_A.weight`, ... and `.alpha`.

diffusers' own `convert_state_dict_to_kohya` writes every `.alpha` as the rank, whatever `lora_alpha` was, which
changes the adapter's scale; and nothing in diffusers writes the Wan layout. Hence these few mappings.

Each file gets an entry in `formats.json`: how many LoRA modules were trained and written, and those the layout has
no key for (`missing`: a file is only written when that is empty). tests/test_lora_formats.py reads every file back
with diffusers' own readers into a fresh base model: every key lands on a module, and the outputs match.
"""

import json
import re
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from .lora import ADAPTER_NAME

FORMATS = ("kohya", "comfyui")
# diffusers' Wan module paths -> the original Wan names (the inverse of diffusers' Wan LoRA conversion)
WAN_NAMES = [
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)$", r"blocks.\1.self_attn.\2"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)$", r"blocks.\1.cross_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.add_(k|v)_proj$", r"blocks.\1.cross_attn.\2_img"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^proj_out$", "head.head"),
    (r"^condition_embedder\.text_embedder\.linear_(1|2)$", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.time_embedder\.linear_(1|2)$", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
]


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def wan_name(module: str) -> str | None:
    for pattern, replacement in WAN_NAMES:
        if re.match(pattern, module):
            return "diffusion_model." + re.sub(pattern, replacement, module)
    return None


def trained_layers(denoiser: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (lora_A weight, lora_B weight, alpha)}, read from each peft LoRA layer itself."""
    return {name: (m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight, float(m.lora_alpha[ADAPTER_NAME]))
            for name, m in denoiser.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A}


def convert(denoiser: nn.Module, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA of `denoiser` as `fmt`'s state dict, and its coverage entry."""
    if fmt not in FORMATS:
        raise ValueError(f"lora format {fmt!r} is not one of {FORMATS}")
    wan = isinstance(denoiser, WanTransformer3DModel)
    if (fmt == "comfyui") != wan:
        raise ValueError(f"lora format {fmt!r} is for {'UNet' if fmt == 'kohya' else 'Wan'} denoisers, not "
                         f"{type(denoiser).__name__} (use {'comfyui' if wan else 'kohya'})")
    name = wan_name if wan else kohya_name
    down, up = ("lora_A", "lora_B") if wan else ("lora_down", "lora_up")
    state, written, missing = {}, [], []
    for module, (a, b, alpha) in trained_layers(denoiser).items():
        key = name(module)
        if key is None:
            missing.append(module)
            continue
        state[f"{key}.{down}.weight"] = a.detach().contiguous()
        state[f"{key}.{up}.weight"] = b.detach().contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
        written.append(module)
    return state, {"modules_trained": len(written) + len(missing), "modules_written": len(written),
                   "keys": len(state), "missing": missing, "rank": int(a.shape[0]) if written else None}


def write_formats(denoiser: nn.Module, folder: str | Path, formats: list[str]) -> dict:
    """`<folder>/<format>.safetensors` for each of `formats` and `<folder>/formats.json`; refuses (ValueError) a
    layout that would drop a trained module or name one the model lacks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for fmt in formats:
        state, entry = convert(denoiser, fmt)
        if entry["missing"]:
            raise ValueError(f"lora format {fmt!r} has no key for the trained modules {entry['missing']}")
        save_file(state, folder / f"{fmt}.safetensors", metadata={"format": "pt"})
        manifest[fmt] = {"file": f"{fmt}.safetensors", **entry}
    (folder / "formats.json").write_text(json.dumps(manifest, indent=2))
    return manifest
