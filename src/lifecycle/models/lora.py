"""LoRA adapters for every denoiser family, injected with peft.

diffusers' `add_adapter` exists only on models with its PeftAdapterMixin (not UNet3DConditionModel
nor FramesAsChannelsUNet), so every denoiser goes through peft's model-agnostic
`inject_adapter_in_model`. An adapter folder is what `PeftModel.save_pretrained` writes
(`adapter_config.json` + `adapter_model.safetensors`, keys under `base_model.model.`), with the
LoRA config also in the safetensors header, keyed under the same prefix as diffusers does. So both

    PeftModel.from_pretrained(denoiser, folder)
    denoiser.load_lora_adapter(folder, prefix="base_model.model", weight_name="adapter_model.safetensors",
                               use_safetensors=True)

read it (the latter on diffusers models with PeftAdapterMixin).
"""

import copy
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from torch import nn

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"
ADAPTER_SUFFIX = "_lora"  # `unet/` -> `unet_lora/` next to it in an exported bundle
PEFT_PREFIX = "base_model.model."  # key prefix of adapters that PeftModel writes and reads


def add_lora(denoiser: nn.Module, rank: int, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA (scale alpha / rank, alpha defaults to rank) into `target_modules`; only LoRA weights stay trainable.

    Module names match by suffix, so the attention projections of every supported denoiser
    (spatial, temporal and cross attention alike) are targeted by the default.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), lora_dropout=dropout)
    return inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER_NAME)


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dict(denoiser: nn.Module) -> dict:
    """The LoRA weights only, keyed by module path (`...to_q.lora_A.weight`)."""
    return get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)


def adapter_folder(denoiser_folder: str | Path) -> Path:
    """Where the adapter of the denoiser saved in `denoiser_folder` lives: `unet` -> `unet_lora`."""
    folder = Path(denoiser_folder)
    return folder.with_name(folder.name + ADAPTER_SUFFIX)


def save_adapter(denoiser: nn.Module, folder: str | Path) -> Path:
    """Write the LoRA adapter as a peft adapter folder (see the module docstring for its readers)."""
    folder = Path(folder)
    config = denoiser.peft_config[ADAPTER_NAME]
    config.save_pretrained(str(folder))
    state = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in lora_state_dict(denoiser).items()}
    prefix = PEFT_PREFIX.rstrip(".")
    header = {f"{prefix}.{k}": v for k, v in config.to_dict().items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(header, sort_keys=True, default=sorted)}
    save_file(state, folder / SAFETENSORS_WEIGHTS_NAME, metadata=metadata)
    return folder


def load_adapter(denoiser: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the adapter saved in `folder` into a freshly loaded base denoiser and load its weights."""
    folder = Path(folder)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), denoiser, adapter_name=ADAPTER_NAME)
    state = load_file(folder / SAFETENSORS_WEIGHTS_NAME)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: adapter does not fit the denoiser (missing {missing}, "
                         f"unexpected {result.unexpected_keys})")
    return denoiser


def _lora_layers(module: nn.Module) -> list[tuple[nn.Module, str, BaseTunerLayer]]:
    """(parent, attribute name, LoRA layer) for every LoRA-wrapped layer."""
    found = []
    for name, child in module.named_modules():
        if isinstance(child, BaseTunerLayer):
            parent, _, attr = name.rpartition(".")
            found.append((module.get_submodule(parent), attr, child))
    return found


def merge_lora(denoiser: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base layers in place; the result is the plain denoiser.

    This is what peft's `LoraModel.merge_and_unload` does, for a model injected without a
    PeftModel/LoraModel wrapper: peft's layer `merge()`, then the base layer replaces its wrapper.
    """
    for parent, attr, layer in _lora_layers(denoiser):
        layer.merge()
        setattr(parent, attr, layer.get_base_layer())
    if hasattr(denoiser, "peft_config"):
        del denoiser.peft_config
    return denoiser


@contextmanager
def plain_layers(denoiser: nn.Module, merge: bool) -> Iterator[nn.Module]:
    """Within the block the LoRA wrappers are swapped for their base layers, so `save_pretrained`
    writes ordinary weights: the un-merged base, or with `merge` a merged copy of each wrapped
    layer (the live layers stay untouched, so training can go on after an export)."""
    swaps = _lora_layers(denoiser)
    for parent, attr, layer in swaps:
        if merge:
            layer = copy.deepcopy(layer)
            layer.merge()
        setattr(parent, attr, layer.get_base_layer())
    try:
        yield denoiser
    finally:
        for parent, attr, layer in swaps:
            setattr(parent, attr, layer)


def save_denoiser(denoiser: nn.Module, folder: str | Path, lora: str = "merge") -> None:
    """`save_pretrained` with ordinary weights; a LoRA is merged in (`lora="merge"`) or saved
    beside the base weights as `<folder>_lora/` (`lora="adapter"`), which `ModelBundle.from_pretrained`
    loads back."""
    if lora not in ("merge", "adapter"):
        raise ValueError(f"lora must be 'merge' or 'adapter', got {lora!r}")
    with plain_layers(denoiser, merge=lora == "merge"):
        denoiser.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(adapter_folder(folder), ignore_errors=True)  # a stale adapter would be loaded on top
    if lora == "adapter" and has_lora(denoiser):
        save_adapter(denoiser, adapter_folder(folder))
