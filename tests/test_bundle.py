"""Every supported denoiser family: build tiny from config, save, load back through from_pretrained."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lifecycle.models import ModelBundle, build_bundle
from lifecycle.models.bundle import ALIGNMENT

from .helpers import CONF_DIR

MODELS = ["tiny_video", "tiny_flow", "tiny_unet3d", "tiny_wan", "tiny_image", "tiny_dit"]


def model_cfg(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"model={name}"]).model


def run_once(bundle, frames, res=16):
    torch.manual_seed(0)
    video = torch.rand(2, frames, 3, res, res)
    with torch.no_grad():
        latents = bundle.encode_video(video, generator=torch.Generator().manual_seed(0))
        hidden, pooled = bundle.encode_text(["a red circle moving left", ""])
        t = torch.tensor([10, 500]) if not bundle.is_flow else torch.tensor([100.0, 700.0])
        return latents, bundle.denoise(latents, t, hidden, pooled)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_from_pretrained_reload_exactly(name, tmp_path):
    bundle = build_bundle(model_cfg(name)).eval()
    frames = bundle.fixed_frames or 4
    latents, out = run_once(bundle, frames)
    assert out.shape == latents.shape
    bundle.save_pretrained(tmp_path / "export", lineage={"stage": "test"})
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index[bundle.denoiser_folder][1] == type(bundle.denoiser).__name__
    loaded = ModelBundle.from_pretrained(str(tmp_path / "export")).eval()
    assert type(loaded.denoiser) is type(bundle.denoiser)
    assert loaded.prediction_type == bundle.prediction_type
    for a, b in zip(bundle.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    # safetensors views sit at any offset in the file; MKL's results depend on operand alignment
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in loaded.state_dict().values())
    latents2, out2 = run_once(loaded, frames)
    assert torch.equal(latents, latents2) and torch.equal(out, out2)


@pytest.mark.parametrize("name", MODELS)
def test_generate_samples_every_family(name):
    """DDIM for ε/v/x0 models, the flow-matching Euler sampler for Wan: (B, F, C, H, W) in [0, 1], seeded."""
    bundle = build_bundle(model_cfg(name)).eval()
    frames = bundle.fixed_frames or 4
    with torch.no_grad():
        a = bundle.generate(["a red circle moving left", "a blue square"], frames=frames, resolution=16, num_steps=3)
        b = bundle.generate(["a red circle moving left"], frames=frames, resolution=16, num_steps=3)
    assert a.shape == (2, frames, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a[:1], b)  # prompt i's noise depends on its index alone
    assert not torch.equal(a[0], a[1])


def test_prediction_types_and_vae_layout():
    assert build_bundle(model_cfg("tiny_video")).prediction_type == "sample"
    flow = build_bundle(model_cfg("tiny_flow"))
    assert flow.is_flow and flow.prediction_type == "flow" and flow.scheduler.config.shift == 3.0
    assert flow.denoiser.config.flow_x0
    # the flow default is the DDPM default's network, only trained and sampled as a flow
    video_cfg, flow_cfg = (OmegaConf.to_container(model_cfg(m)) for m in ("tiny_video", "tiny_flow"))
    assert flow_cfg["denoiser"].pop("flow_x0") is True
    del flow_cfg["scheduler"], video_cfg["scheduler"]
    assert flow_cfg == video_cfg
    wan = build_bundle(model_cfg("tiny_wan"))
    assert wan.is_flow and wan.prediction_type == "flow" and wan.vae is None
    unet3d = build_bundle(model_cfg("tiny_unet3d"))
    assert unet3d.latent_shape(frames=4, resolution=32) == (4, 4, 16, 16)
    video = torch.rand(1, 4, 3, 32, 32)
    assert unet3d.decode_latents(unet3d.encode_video(video)).shape == video.shape



def test_flow_x0_returns_the_velocity_of_its_x0_prediction():
    """flow_x0: the UNet's output is x0_hat and the model returns v = (x_t − x0_hat)/t, t = timestep/1000 floored at
    min_flow_t; the same weights without it return x0_hat itself."""
    from lifecycle.models import FramesAsChannelsUNet

    kwargs = {"in_channels": 3, "num_frames": 2, "patch_size": 2, "unet_config": {
        "block_out_channels": [8, 8], "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 4,
        "norm_num_groups": 4}}
    plain = FramesAsChannelsUNet(**kwargs).eval()
    flow = FramesAsChannelsUNet(**kwargs, flow_x0=True, min_flow_t=0.05).eval()
    flow.load_state_dict(plain.state_dict())
    x, text = torch.randn(3, 3, 2, 8, 8), torch.randn(3, 2, 4)
    timestep = torch.tensor([800.0, 300.0, 10.0])  # t = 0.8, 0.3 and 0.01 → floored to 0.05
    with torch.no_grad():
        x0_hat = plain(x, timestep, text).sample
        v = flow(x, timestep, text).sample
    t = torch.tensor([0.8, 0.3, 0.05]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, (x - x0_hat) / t)


def test_wan_vae_latent_shape_is_what_it_encodes():
    """AutoencoderKLWan (causal 3D: 1 + 4k frames -> 1 + k latent frames, 8x down in space) through the bundle:
    `latent_shape` must match the encoder's real output, which sampling and the latent cache rely on."""
    from diffusers import AutoencoderKLWan

    wan = build_bundle(model_cfg("tiny_wan"))
    torch.manual_seed(0)
    wan.vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    video = torch.rand(1, 9, 3, 32, 48)
    with torch.no_grad():
        latents = wan.encode_video(video)
        assert tuple(latents.shape[1:]) == wan.latent_shape(frames=9, resolution=(32, 48)) == (4, 3, 4, 6)
        assert wan.decode_latents(latents).shape == video.shape
    with pytest.raises(ValueError, match="1 \\+ 4k frames, not 8"):
        wan.latent_shape(frames=8, resolution=32)

def test_hub_id_loads_from_the_offline_cache(tmp_path, monkeypatch):
    """A hub id goes through the same from_pretrained; here it is served from a local HF cache."""
    bundle = build_bundle(model_cfg("tiny_unet3d"))
    snapshot = tmp_path / "hub" / "models--lifecycle--tiny-unet3d" / "snapshots" / ("0" * 40)
    bundle.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = ModelBundle.from_pretrained("lifecycle/tiny-unet3d")
    assert torch.equal(loaded.denoiser.conv_in.weight, bundle.denoiser.conv_in.weight)


def test_incomplete_folder_is_a_clear_error(tmp_path):
    bundle = build_bundle(model_cfg("tiny_wan"))
    bundle.save_pretrained(tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model_index.json").read_text())
    del index["text_encoder"]
    (tmp_path / "b" / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(tmp_path / "b" / "text_encoder")
    with pytest.raises(ValueError, match="text_encoder"):
        ModelBundle.from_pretrained(str(tmp_path / "b"))
