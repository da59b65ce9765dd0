"""LoRA on every denoiser family, adapter export and reload, and the memory options."""

import copy
import functools

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from hydra import compose, initialize_config_dir
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from lifecycle.models import ModelBundle, build_bundle
from lifecycle.models.lora import add_lora, has_lora, lora_state_dict, merge_lora, save_adapter
from lifecycle.models.memory import NORM_LAYERS, enable_gradient_checkpointing, freeze_to_dtype, offload_activations

from .helpers import CONF_DIR

TINY_FOLDED = [
    "model.denoiser.num_frames=2",
    "model.denoiser.unet_config.block_out_channels=[16,32]",
    "+model.denoiser.unet_config.norm_num_groups=8",
    "model.denoiser.unet_config.attention_head_dim=4",
    "model.text_encoder.config.num_hidden_layers=1",
]
BUNDLES = {"tiny_video": TINY_FOLDED, "tiny_unet3d": [], "tiny_wan": [], "tiny_image": [], "tiny_dit": []}
DENOISERS = [*BUNDLES, "svd"]
TINY_SVD = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    num_attention_heads=(2, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=2,
)
# Modules in checkpointed regions: with checkpointing each starts again in backward (pre-hooks: the
# recomputation stops early, once it has what backward needs, so a forward hook may not fire).
PROBES = {
    "tiny_video": ["unet.down_blocks.0.resnets.0", "unet.up_blocks.1.resnets.0"],
    "tiny_unet3d": ["down_blocks.0.resnets.0", "mid_block.resnets.0", "up_blocks.1.attentions.0"],
    "tiny_wan": ["blocks.0", "blocks.1"],
    "tiny_image": ["down_blocks.0.resnets.0", "up_blocks.1.resnets.0"],
    "tiny_dit": ["transformer_blocks.0", "transformer_blocks.1"],
    "svd": ["down_blocks.0.resnets.0", "up_blocks.1.resnets.0"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def model_cfg(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"model={name}", *BUNDLES[name]]).model


class Case:
    """A freshly seeded tiny denoiser (in a bundle, except the SVD UNet) and fixed inputs for it."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        if name == "svd":
            self.bundle, self.denoiser = None, UNetSpatioTemporalConditionModel(**TINY_SVD)
            self.inputs = (torch.randn(2, 2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]),
                           torch.randn(2, 1, 32, generator=g), torch.randn(2, 3, generator=g))
            return
        self.bundle = build_bundle(model_cfg(name))
        self.denoiser = self.bundle.denoiser
        shape = self.bundle.latent_shape(self.bundle.fixed_frames or 2, 16)
        t = torch.tensor([100.0, 700.0]) if self.bundle.is_flow else torch.tensor([10, 500])
        self.inputs = (torch.randn(2, *shape, generator=g), t, torch.randn(2, 16, 64, generator=g),
                       torch.randn(2, 64, generator=g))

    def out(self, bundle: ModelBundle | None = None) -> torch.Tensor:
        if self.bundle is None:
            x, t, hidden, time_ids = self.inputs
            return self.denoiser(x, t, hidden, added_time_ids=time_ids).sample
        return (bundle or self.bundle).denoise(*self.inputs)

    def step(self, lr: float = 0.1):
        """One SGD step of the trainable parameters on the mean squared output."""
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.out().square().mean().backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None


def trained_lora_case(name: str) -> Case:
    case = Case(name)
    add_lora(case.denoiser, rank=4, alpha=8)
    case.step()
    return case


@pytest.mark.parametrize("name", DENOISERS)
def test_lora_injects_trains_and_merges(name):
    case = Case(name)
    with torch.no_grad():
        before = case.out()
    base_count = sum(1 for _ in case.denoiser.parameters())
    add_lora(case.denoiser, rank=4, alpha=8)
    params = dict(case.denoiser.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(params) - len(trainable) == base_count
    assert len(lora_state_dict(case.denoiser)) == len(trainable)
    with torch.no_grad():
        assert torch.equal(case.out(), before)  # lora_B starts at zero

    case.out().square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in params.values())
    assert all(params[n].grad.abs().sum() > 0 for n in trainable if ".lora_B." in n)
    for p in params.values():
        p.grad = None
    case.step()
    with torch.no_grad():
        trained = case.out()
    assert not torch.allclose(trained, before, atol=1e-4)

    merge_lora(case.denoiser)
    assert not has_lora(case.denoiser) and not hasattr(case.denoiser, "peft_config")
    assert not any("lora_" in k or "base_layer" in k for k in case.denoiser.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(case.out(), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(BUNDLES))
@pytest.mark.parametrize("mode", ["adapter", "merge"])
def test_bundle_export_reloads_the_trained_outputs(name, mode, tmp_path):
    case = trained_lora_case(name)
    with torch.no_grad():
        trained = case.out()
    folder = case.bundle.denoiser_folder
    path = tmp_path / "export"
    if mode == "merge":  # a merged export over an older adapter export leaves no stale adapter behind
        case.bundle.save_pretrained(path, lora="adapter")
    case.bundle.save_pretrained(path, lineage={"stage": "test"}, lora=mode)
    with torch.no_grad():
        assert has_lora(case.denoiser) and torch.equal(case.out(), trained)  # exporting left training state alone
    assert (path / f"{folder}_lora" / SAFETENSORS_WEIGHTS_NAME).exists() == (mode == "adapter")
    keys = load_file(path / folder / "diffusion_pytorch_model.safetensors").keys()
    assert not any("lora_" in k or "base_layer" in k for k in keys)  # ordinary weights

    loaded = ModelBundle.from_pretrained(str(path)).eval()
    assert has_lora(loaded.denoiser) == (mode == "adapter")
    with torch.no_grad():
        reloaded = case.out(loaded)
        if mode == "adapter":  # exact: the base weights were saved un-merged, the adapter beside them
            assert torch.equal(reloaded, trained)
        else:
            case.bundle.denoiser = merge_lora(copy.deepcopy(case.denoiser))
            assert torch.equal(reloaded, case.out())
            torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reader", ["peft", "diffusers"])
def test_adapter_folder_reads_with_peft_and_diffusers(reader, tmp_path):
    case = Case("tiny_image")
    base = copy.deepcopy(case.denoiser)
    add_lora(case.denoiser, rank=4, alpha=2)  # alpha != rank: the reader must take the scale from the file
    case.step()
    with torch.no_grad():
        trained = case.out()
    save_adapter(case.denoiser, tmp_path / "unet_lora")
    if reader == "peft":
        PeftModel.from_pretrained(base, str(tmp_path / "unet_lora"))  # injects into `base` in place
    else:
        base.load_lora_adapter(str(tmp_path / "unet_lora"), prefix="base_model.model",
                               weight_name=SAFETENSORS_WEIGHTS_NAME, use_safetensors=True)
    case.bundle.denoiser = base
    with torch.no_grad():
        assert torch.equal(case.out(), trained)


def gradients(case: Case) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # same dropout masks in every run
    case.out().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in case.denoiser.named_parameters() if p.grad is not None}
    case.denoiser.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", DENOISERS)
def test_gradient_checkpointing_recomputes_with_equal_gradients(name):
    case = Case(name)
    case.denoiser.train()
    calls = {p: 0 for p in PROBES[name]}
    for p in PROBES[name]:
        case.denoiser.get_submodule(p).register_forward_pre_hook(lambda *_, p=p: calls.__setitem__(p, calls[p] + 1))
    plain = gradients(case)
    assert set(calls.values()) == {1}
    enable_gradient_checkpointing(case.denoiser)
    calls.update(dict.fromkeys(calls, 0))
    assert_same_gradients(gradients(case), plain)
    assert set(calls.values()) == {2}, calls  # forward, then again in backward
    with torch.no_grad():
        calls.update(dict.fromkeys(calls, 0))
        case.out()
    assert set(calls.values()) == {1}


def test_checkpointed_unet3d_copy_recomputes_its_own_blocks():
    case = Case("tiny_unet3d")
    enable_gradient_checkpointing(case.denoiser)
    enable_gradient_checkpointing(case.denoiser)  # idempotent: still one recomputation
    twin = copy.deepcopy(case.denoiser)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    calls = []
    case.denoiser.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append("original"))
    twin.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append("twin"))
    case.bundle.denoiser = twin
    case.out().square().mean().backward()
    assert calls == ["twin", "twin"]
    assert case.denoiser.conv_in.weight.grad is None and twin.conv_in.weight.grad is not None


@pytest.mark.parametrize("name", ["tiny_unet3d", "tiny_video"])
def test_offloaded_activations_give_equal_gradients(name):
    case = Case(name)
    plain = gradients(case)
    with offload_activations():
        offloaded = gradients(case)
    assert_same_gradients(offloaded, plain)


@pytest.mark.parametrize("name", ["tiny_unet3d", "tiny_video", "tiny_wan"])
def test_lora_trains_over_bf16_frozen_weights(name):
    case = Case(name)
    add_lora(case.denoiser, rank=4, alpha=8)
    freeze_to_dtype(case.denoiser, "bf16")
    params = dict(case.denoiser.named_parameters())
    norms = {f"{n}.{k}" for n, m in case.denoiser.named_modules() if isinstance(m, NORM_LAYERS) for k, _ in
             m.named_parameters(recurse=False)}
    assert len(norms) > 0
    assert all(p.dtype == (torch.float32 if p.requires_grad or n in norms else torch.bfloat16)
               for n, p in params.items())
    lora_b = [p for n, p in params.items() if ".lora_B." in n]
    with torch.no_grad():  # a reachable target: the output under some random LoRA; then back to B = 0
        for p in lora_b:
            p.normal_(0, 0.3)
        with torch.autocast("cpu", torch.bfloat16):
            target = case.out().float()
        for p in lora_b:
            p.zero_()
    opt = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=10)
    losses = []
    for _ in range(10):
        with torch.autocast("cpu", torch.bfloat16):
            out = case.out()
        loss = (out.float() - target).square().mean()
        loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in params.values())
        assert all(p.grad.dtype == torch.float32 for p in params.values() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)
