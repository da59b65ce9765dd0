"""LoRA files for tools outside diffusers (kohya for UNets, ComfyUI's Wan layout), read back with diffusers' own
readers into a fresh base model: every trained module loaded, none dropped, and the same outputs as the adapter."""

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, WanPipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from lifecycle.models import build_bundle
from lifecycle.models.lora import add_lora, has_lora
from lifecycle.models.lora_formats import convert, kohya_name, write_formats
from lifecycle.models.stand_ins import model_config

WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]  # recipes/wan_lora.yaml's


def trained(name: str):
    """A miniature of `name` with a LoRA (rank 4, alpha 8: scale 2, so a dropped alpha shows) of random weights."""
    torch.manual_seed(0)
    bundle = build_bundle(model_config(name, miniature=True)).eval()
    base = copy.deepcopy(bundle.denoiser)
    targets = WAN_TARGETS if name.startswith("wan") else ["to_q", "to_k", "to_v", "to_out.0"]
    add_lora(bundle.denoiser, rank=4, alpha=8, target_modules=targets)
    for key, p in bundle.denoiser.named_parameters():
        if ".lora_" in key:
            p.data.normal_(0, 0.05)
    return bundle, base.eval()


def read_back(name: str, path, base: torch.nn.Module) -> torch.nn.Module:
    """`path` through diffusers' LoRA readers (format detection and conversion included) into `base`."""
    if name.startswith("wan"):
        state = WanPipeline.lora_state_dict(str(path))
        base.load_lora_adapter(state, prefix="transformer")
        return base
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))[:2]
    if hasattr(base, "load_lora_adapter"):
        base.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
        return base
    # UNet3D: no diffusers LoRA loader, and diffusers' kohya converter knows only the SD UNet's names (it splits
    # `transformer_in`, `temp_attentions`). Resolve the keys as ComfyUI does: against the model's own module names.
    from safetensors.torch import load_file

    names = {kohya_name(m): m for m, _ in base.named_modules() if m}
    file = load_file(path)
    state, alphas = {}, {}
    for key, value in file.items():
        module, _, kind = key.partition(".")
        assert module in names, f"{key}: names no module of the model"
        if kind == "alpha":
            alphas[names[module]] = value.item()
        else:
            state[f"{names[module]}.lora_{'A' if kind.startswith('lora_down') else 'B'}.weight"] = value
    rank = next(v for k, v in state.items() if k.endswith("lora_A.weight")).shape[0]
    assert len(set(alphas.values())) == 1
    config = LoraConfig(r=rank, lora_alpha=next(iter(alphas.values())), target_modules=sorted(alphas))
    inject_adapter_in_model(config, base)
    result = set_peft_model_state_dict(base, state)
    assert not result.unexpected_keys
    return base


def outputs(bundle, denoiser):
    torch.manual_seed(1)
    frames = bundle.fixed_frames or 5
    x = torch.randn(1, *bundle.latent_shape(frames, 128 if frames == 1 else 32))  # an image UNet needs 2x2 at its bottom
    hidden, pooled = bundle.encode_text(["a cat playing the piano"])
    t = torch.tensor([500.0]) if bundle.is_flow else torch.tensor([500])
    live, bundle.denoiser = bundle.denoiser, denoiser.eval()
    try:
        with torch.no_grad():
            return bundle.denoise(x, t, hidden, pooled)
    finally:
        bundle.denoiser = live


@pytest.mark.parametrize("name", ["sd15", "modelscope_t2v", "wan2_1_t2v_1_3b"])
def test_lora_file_reads_back_with_diffusers_and_matches_the_adapter(name, tmp_path):
    bundle, base = trained(name)
    fmt = "comfyui" if name.startswith("wan") else "kohya"
    manifest = write_formats(bundle.denoiser, tmp_path, [fmt])[fmt]
    layers = sum(1 for m in bundle.denoiser.modules() if hasattr(m, "lora_A"))
    assert manifest["modules_trained"] == manifest["modules_written"] == layers and not manifest["missing"]
    before = outputs(bundle, base)
    loaded = read_back(name, tmp_path / f"{fmt}.safetensors", base)
    assert sum(1 for m in loaded.modules() if hasattr(m, "lora_A")) == layers  # every trained module, loaded
    want, got = outputs(bundle, bundle.denoiser), outputs(bundle, loaded)
    assert (want - before).abs().max() > 1e-3  # the adapter changes the output ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # ... and the file reproduces it (scale included)


def test_a_layout_for_another_architecture_is_refused():
    bundle, _ = trained("sd15")
    with pytest.raises(ValueError, match="'comfyui' is for Wan denoisers"):
        convert(bundle.denoiser, "comfyui")
    assert has_lora(bundle.denoiser)


def test_a_wan_module_the_layout_cannot_name_is_refused(tmp_path):
    torch.manual_seed(0)
    bundle = build_bundle(model_config("wan2_1_t2v_1_3b", miniature=True))
    add_lora(bundle.denoiser, rank=2, target_modules=["to_q", "patch_embedding"])  # no Wan name for a conv stem LoRA
    with pytest.raises(ValueError, match="no key for the trained modules \\['patch_embedding'\\]"):
        write_formats(bundle.denoiser, tmp_path, ["comfyui"])
    assert not (tmp_path / "comfyui.safetensors").exists()


def test_a_layout_the_model_cannot_take_is_a_start_up_error(tmp_path):
    from lifecycle.errors import ConfigError

    from .helpers import compose_cfg

    with pytest.raises(ConfigError, match="'comfyui' is for Wan denoisers, this model's is FramesAsChannelsUNet"):
        compose_cfg(tmp_path, "stage=vader", "stage.lora_formats=[comfyui]")
    with pytest.raises(ConfigError, match="stage.lora_formats: 'safetensors' is not one of"):
        compose_cfg(tmp_path, "stage=vader", "stage.lora_formats=[safetensors]")
    with pytest.raises(ConfigError, match="stage.lora is null"):
        compose_cfg(tmp_path, "stage=vader", "stage.lora=null", "stage.lora_formats=[kohya]")
    assert compose_cfg(tmp_path, "stage=vader", "stage.lora_formats=[kohya]").stage.lora_formats == ["kohya"]
