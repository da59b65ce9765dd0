"""Image-to-video (SVD-style) bundles: conditioning, layout, save/load, guidance, gradients, long horizon."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler
from hydra import compose, initialize_config_dir

from lifecycle.config import validate
from lifecycle.diffusion.sampling import sample
from lifecycle.models import ModelBundle, build_bundle
from lifecycle.models.preprocess import CLIP_MEAN, CLIP_STD, normalize

from .helpers import CONF_DIR

RES, STEPS = 16, 2


def svd_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_svd", f"run_dir={tmp_path}", *overrides])
    return validate(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def svd():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_svd"]).model
    torch.manual_seed(0)
    return build_bundle(cfg).eval()


def images(n, seed=0, res=RES):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def test_config_validates_and_sets_the_micro_conditioning(tmp_path):
    cfg = svd_cfg(tmp_path, "model.conditioning.motion_bucket_id=50")
    bundle = build_bundle(cfg.model)
    assert bundle.text_encoder is None and bundle.tokenizer is None
    assert isinstance(bundle.scheduler, EulerDiscreteScheduler)  # not turned into DDPM betas
    assert bundle.prediction_type == "v_prediction"
    assert (bundle.conditioning.fps, bundle.conditioning.motion_bucket_id) == (7, 50)
    assert bundle.latent_shape(frames=4, resolution=(16, 24)) == (4, 4, 8, 12)


def test_encode_image_follows_the_svd_pipeline(svd):
    img = images(2)
    with torch.no_grad():
        cond = svd.encode_image(img, torch.Generator().manual_seed(3))
        aug = torch.randn(img.shape, generator=torch.Generator().manual_seed(3))
        latents = svd.vae.encode(img * 2 - 1 + 0.02 * aug).latent_dist.mode()
        size = svd.image_encoder.config.image_size
        pixels = normalize(F.interpolate(img, size=(size, size), mode="bicubic", antialias=True), CLIP_MEAN, CLIP_STD)
        embeds = svd.image_encoder(pixel_values=pixels).image_embeds
    assert cond.embeds.shape == (2, 1, svd.denoiser.config.cross_attention_dim)
    torch.testing.assert_close(cond.embeds[:, 0], embeds)
    torch.testing.assert_close(cond.latents, latents)  # unscaled mode, as the pipeline concatenates it
    torch.testing.assert_close(cond.time_ids, torch.tensor([[6.0, 127.0, 0.02]] * 2))  # fps - 1
    uncond = cond.unconditional()
    assert not uncond.embeds.any() and not uncond.latents.any() and torch.equal(uncond.time_ids, cond.time_ids)


def test_denoise_permutes_to_the_unets_frame_major_layout(svd):
    frames = 3
    with torch.no_grad():
        cond = svd.encode_image(images(1), torch.Generator().manual_seed(0))
        x = torch.randn(1, frames, 4, RES // 2, RES // 2)  # (B, F, C, h, w), as the UNet takes it
        image = cond.latents.unsqueeze(1).repeat(1, frames, 1, 1, 1)
        ref = svd.denoiser(torch.cat([x, image], dim=2), torch.tensor([0.5]), encoder_hidden_states=cond.embeds,
                           added_time_ids=cond.time_ids).sample
        out = svd.denoise(x.permute(0, 2, 1, 3, 4), torch.tensor([0.5]), *cond)
    assert out.shape == (1, 4, frames, RES // 2, RES // 2)
    torch.testing.assert_close(out.permute(0, 2, 1, 3, 4), ref)


def test_save_and_from_pretrained_reload_exactly(svd, tmp_path):
    svd.save_pretrained(tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["vae"][1] == "AutoencoderKLTemporalDecoder" and index["unet"][1] == "UNetSpatioTemporalConditionModel"
    assert "tokenizer" not in index and "text_encoder" not in index
    loaded = ModelBundle.from_pretrained(str(tmp_path / "export")).eval()
    assert type(loaded.scheduler) is EulerDiscreteScheduler
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(svd.scheduler.config)
    for (k, a), b in zip(svd.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x, t = torch.randn(1, 4, 2, RES // 2, RES // 2), torch.tensor([1.2])
    with torch.no_grad():
        outs = [b.denoise(x, t, *b.encode_image(images(1), torch.Generator().manual_seed(0))) for b in (svd, loaded)]
    assert torch.equal(*outs)


def test_guidance_with_zero_unconditional_matches_two_hand_written_passes(svd):
    img, scale = images(1), 2.5
    noise = torch.randn(1, 4, 2, RES // 2, RES // 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = svd.encode_image(img, torch.Generator().manual_seed(0))
        out = sample(svd.denoise, svd.inference_scheduler(), noise, cond, cond.unconditional(), scale, num_steps=1)

        sched = svd.inference_scheduler()
        sched.set_timesteps(1)
        t, sigma = sched.timesteps[0], sched.sigmas[0]
        torch.testing.assert_close(t, 0.25 * sigma.log())  # SVD's continuous timestep
        x = noise * (sigma**2 + 1) ** 0.5
        x_in = sched.scale_model_input(x, t)
        torch.testing.assert_close(x_in, noise)  # Euler's input scaling 1/sqrt(sigma^2 + 1) undoes it
        zeros = (torch.zeros_like(cond.embeds), torch.zeros_like(cond.latents), cond.time_ids)
        pred_cond = svd.denoise(x_in, t[None], cond.embeds, cond.latents, cond.time_ids)
        pred_uncond = svd.denoise(x_in, t[None], *zeros)
        expected = sched.step(pred_uncond + scale * (pred_cond - pred_uncond), t, x).prev_sample
        sched.set_timesteps(1)
        sched.scale_model_input(x, t)
        unguided = sched.step(pred_cond, t, x).prev_sample
    assert (expected - unguided).abs().max() > 1e-2  # guidance matters at this tolerance
    # One batched pass vs two: float32 reduction order differs by ~1e-4 on these magnitudes.
    torch.testing.assert_close(out, expected, atol=5e-4, rtol=1e-3)


def test_generate_from_images_shape_range_and_per_image_seeds(svd):
    img = images(2, res=24)
    with torch.no_grad():
        video = svd.generate_from_images(img, frames=4, resolution=RES, num_steps=STEPS, seed=7)
        second = svd.generate_from_images(img[1:], frames=4, resolution=RES, num_steps=STEPS, seed=8)
    assert video.shape == (2, 4, 3, RES, RES)
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0
    torch.testing.assert_close(second[0], video[1], atol=1e-5, rtol=1e-4)  # image i uses seed + i alone


def test_gradient_reaches_the_denoiser_through_sampling(svd):
    svd.zero_grad()
    noise = torch.randn(1, 4, 2, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    video = svd.sample_clip(images(1), noise, num_steps=STEPS, guidance_scale=2.0,
                            generator=torch.Generator().manual_seed(0))
    video.mean().backward()
    grads = {n: p.grad for n, p in svd.denoiser.named_parameters()}
    assert grads["conv_in.weight"].abs().sum() > 0
    cross = [g for n, g in grads.items() if "attn2.to_k" in n]  # the image embedding's path
    assert cross and all(g is not None and g.abs().sum() > 0 for g in cross)
    svd.zero_grad()


def test_long_horizon_conditions_each_clip_on_the_previous_last_frame(svd):
    frames, seed = 3, 5
    img = images(1)
    with torch.no_grad():
        long = svd.generate_long(img, clips=2, frames=frames, num_steps=STEPS, seed=seed)
        first = svd.generate_from_images(img, frames, num_steps=STEPS, seed=seed)
        last = long[:, frames - 1]
        second = svd.generate_from_images(last, frames, num_steps=STEPS, seed=seed + 1)
        other = svd.generate_from_images(last.flip(-1), frames, num_steps=STEPS, seed=seed + 1)
    assert long.shape == (1, 2 * frames, 3, RES, RES)
    torch.testing.assert_close(long[:, :frames], first)
    torch.testing.assert_close(long[:, frames:], second)
    assert (other - long[:, frames:]).abs().max() > 1e-3  # a different last frame gives a different next clip
