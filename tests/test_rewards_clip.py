"""CLIP-based rewards on tiny random CLIP models, loaded through the same from_pretrained path as real weights."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from lifecycle.models.text import word_tokenizer
from lifecycle.rewards.base import build_reward
from lifecycle.rewards.clip import AestheticReward, ClipScore, HPSReward, PickScore
from lifecycle.rewards.farm import FARMReward
from lifecycle.models.preprocess import prepare

from .helpers import CONF_DIR

PROMPTS = ["a red circle moving left", "a blue square moving up"]
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (projection 16) with a word-level tokenizer, saved like a hub folder."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=2.0))
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    word_tokenizer(" ".join(PROMPTS).split(), max_length=16).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return CLIPModel.from_pretrained(clip_dir).eval()


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """Known head weights with LAION's key layout, as a .pth state dict."""
    g = torch.Generator().manual_seed(1)
    dims = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), dims):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        state[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    path = tmp_path_factory.mktemp("head") / "head.pth"
    torch.save(state, path)
    return str(path), state


def videos(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g).requires_grad_(requires_grad)


def image_embeds(clip, v):
    """Unit CLIP image embeddings (B, F, D) computed with CLIPModel directly."""
    pixels = prepare(v.flatten(0, 1), IMAGE_SIZE)
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=pixels).pooler_output
    return F.normalize(emb, dim=-1).view(*v.shape[:2], -1)


def text_embeds(clip, clip_dir, prompts):
    tok = word_tokenizer(" ".join(PROMPTS).split(), max_length=16)
    ids = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = clip.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output
    return F.normalize(emb, dim=-1)


def laion_mlp(state, x):
    """LAION's head by hand: five affine maps in sequence (dropout is identity at inference)."""
    for idx in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    return x.squeeze(-1)


def test_aesthetic_matches_hand_computation(clip_dir, clip, head_file):
    path, state = head_file
    reward = AestheticReward(clip=clip_dir, head=path)
    v = videos(2, 3, 3, 40, 48)
    expected = laion_mlp(state, image_embeds(clip, v)).mean(1)
    got = reward(v, PROMPTS)
    assert got.shape == (2,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_aesthetic_head_file_formats(clip_dir, head_file, tmp_path, caplog):
    path, state = head_file
    st = tmp_path / "head.safetensors"
    save_file(state, st)
    a, b = AestheticReward(clip=clip_dir, head=path), AestheticReward(clip=clip_dir, head=str(st))
    for name, t in state.items():
        assert torch.equal(a.head.state_dict()[name], t) and torch.equal(b.head.state_dict()[name], t)
    with pytest.raises(RuntimeError, match="Missing key"):
        bad = tmp_path / "bad.pth"
        torch.save({k.replace("layers.", "mlp."): t for k, t in state.items()}, bad)
        AestheticReward(clip=clip_dir, head=str(bad))
    with caplog.at_level(logging.WARNING):
        AestheticReward(clip=clip_dir, head=None)
    assert "randomly initialised" in caplog.text


def test_frozen_eval_and_gradient_reaches_pixels(clip_dir, head_file):
    rewards = [
        AestheticReward(clip=clip_dir, head=head_file[0]),
        FARMReward(clip=clip_dir, head=head_file[0], coherence_weight=0.5),
        ClipScore(model=clip_dir),
        PickScore(model=clip_dir, tokenizer=clip_dir),
        HPSReward(model=clip_dir),
    ]
    for reward in rewards:
        reward.train()  # a parent LightningModule's .train() must not switch the reward to training
        assert reward.differentiable and not reward.training
        assert not any(p.requires_grad for p in reward.parameters())
        v = videos(2, 2, 3, 24, 36, requires_grad=True)
        score = reward(v, PROMPTS)
        assert score.shape == (2,) and torch.isfinite(score).all()
        score.sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0, type(reward).__name__


def test_bfloat16_backbone(clip_dir, head_file):
    v = videos(2, 2, 3, 32, 32, seed=9, requires_grad=True)
    for cls, kwargs in ((AestheticReward, {"clip": clip_dir, "head": head_file[0]}), (HPSReward, {"model": clip_dir})):
        full, half = cls(**kwargs), cls(**kwargs, dtype="bfloat16")
        assert next(half.parameters()).dtype == torch.bfloat16
        score = half(v, PROMPTS)
        assert score.dtype == torch.float32
        torch.testing.assert_close(score, full(v, PROMPTS), rtol=0.05, atol=0.02)
        score.sum().backward()
        assert v.grad.abs().sum() > 0
        v.grad = None


def test_clip_scores_match_hand_cosine(clip_dir, clip, tmp_path):
    v = videos(2, 3, 3, 48, 40, seed=3)
    cos = (image_embeds(clip, v) * text_embeds(clip, clip_dir, PROMPTS).unsqueeze(1)).sum(-1).mean(1)
    torch.testing.assert_close(ClipScore(model=clip_dir)(v, PROMPTS), 100.0 * cos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ClipScore(model=clip_dir, scale=2.5)(v, PROMPTS), 2.5 * cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(HPSReward(model=clip_dir)(v, PROMPTS), cos, rtol=1e-4, atol=1e-5)
    # PickScore's tokenizer lives apart from its model (the base CLIP's): load it from its own folder.
    tok_dir = tmp_path / "tokenizer"
    word_tokenizer(" ".join(PROMPTS).split(), max_length=16).save_pretrained(tok_dir)
    temperature = clip.logit_scale.exp().item()
    assert temperature == pytest.approx(np.exp(2.0))
    pick = PickScore(model=clip_dir, tokenizer=str(tok_dir))
    torch.testing.assert_close(pick(v, PROMPTS), temperature * cos, rtol=1e-4, atol=1e-4)
    # the prompt matters: swapping prompts changes the score
    assert not torch.allclose(pick(v, PROMPTS[::-1]), pick(v, PROMPTS))


def test_farm_matches_formula(clip_dir, clip, head_file):
    path, state = head_file
    lam = 0.7
    v = videos(2, 4, 3, 32, 32, seed=5)
    e = image_embeds(clip, v)
    coherence = torch.stack([sum(e[b, t] @ e[b, t + 1] for t in range(3)) / 3 for b in range(2)])
    expected = laion_mlp(state, e).sum(1) + lam * coherence
    got = FARMReward(clip=clip_dir, head=path, coherence_weight=lam)(v, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # one frame: coherence is cos(x, x) = 1
    one = FARMReward(clip=clip_dir, head=path, coherence_weight=lam)(v[:, :1], PROMPTS)
    torch.testing.assert_close(one, laion_mlp(state, e[:, :1]).sum(1) + lam, rtol=1e-4, atol=1e-4)


def test_prepare_matches_clip_image_processor():
    """Torch preprocessing ≈ transformers' PIL CLIP processor (PIL's bicubic kernel and uint8 rounding differ slightly)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # a smooth image, so the two resampling kernels agree up to small ringing
    y, x = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 80), indexing="ij")
    img = torch.stack([x, y, 0.5 + 0.4 * torch.sin(3 * x + 2 * y)]).unsqueeze(0)
    uint8 = (img[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    ref = torch.from_numpy(np.asarray(proc(images=uint8, return_tensors="np")["pixel_values"]))
    ours = prepare((torch.from_numpy(uint8).permute(2, 0, 1)[None].float() / 255).requires_grad_(), IMAGE_SIZE)
    assert ours.shape == ref.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours.detach() - ref).abs().max() < 0.03  # a one-pixel crop offset gives > 1
    assert ours.grad_fn is not None


def test_hydra_composes_rewards(clip_dir, head_file):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["reward=[aesthetic,hps,clip_score,pickscore,farm]", "reward.hps.weight=0.5"])
    assert set(cfg.reward) == {"aesthetic", "hps", "clip_score", "pickscore", "farm"}
    assert cfg.reward.aesthetic._target_ == "lifecycle.rewards.clip.AestheticReward"
    assert cfg.reward.farm._target_ == "lifecycle.rewards.farm.FARMReward"
    assert cfg.reward.pickscore.model == "yuvalkirstain/PickScore_v1" and cfg.reward.hps.weight == 0.5
    # point the composed entries at the tiny model and build them through build_reward
    cfg.reward.aesthetic.clip = cfg.reward.farm.clip = clip_dir
    cfg.reward.aesthetic.head = cfg.reward.farm.head = head_file[0]
    for name in ("hps", "clip_score"):
        cfg.reward[name].model = clip_dir
    cfg.reward.pickscore.model = cfg.reward.pickscore.tokenizer = clip_dir
    total = build_reward(cfg.reward)
    v = videos(2, 2, 3, 32, 32, seed=7)
    parts = total.components(v, PROMPTS)
    assert isinstance(total.terms["farm"], FARMReward) and isinstance(total.terms["pickscore"], PickScore)
    expected = sum((0.5 if name == "hps" else 1.0) * s for name, s in parts.items())
    torch.testing.assert_close(total(v, PROMPTS), expected)
