"""Sample-quality metrics (lifecycle.metrics.quality) against hand computations of their formulas, and the
feature extractors and CLIP score on tiny transformers models saved and loaded back like hub folders."""

import io
import math
import tarfile

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTModel

from lifecycle.curation.annotate import frame_difference
from lifecycle.metrics.quality import (PretrainedFeatures, Thumbnails, VideoQuality, motion_magnitude,
                                       reference_videos, temporal_consistency)
from lifecycle.models.text import word_tokenizer

PROMPTS = ["a red circle", "a blue square"]


def test_temporal_consistency_is_the_mean_cosine_of_consecutive_frames():
    features = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],    # 45° then 45°: cos = 1/√2 twice
                             [[2.0, 0.0], [3.0, 0.0], [-1.0, 0.0]]])  # same direction, then opposite: (1 - 1) / 2
    assert temporal_consistency(features).tolist() == pytest.approx([1 / math.sqrt(2), 0.0], abs=1e-6)
    assert temporal_consistency(features[:, :1]).tolist() == [1.0, 1.0]


def test_motion_magnitude_is_the_data_engines_frame_difference():
    black_then_white = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])[None]
    half = black_then_white.clone()
    half[0, 1, :, :2] = 0  # half the pixels change
    assert motion_magnitude(torch.cat([black_then_white, half])).tolist() == pytest.approx([1.0, 0.5])
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 5, 8, 8, 3), dtype=np.uint8)
    videos = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255
    assert motion_magnitude(videos).tolist() == pytest.approx([frame_difference(c) for c in clips], abs=1e-6)


def test_thumbnails_are_area_means_centred_per_frame():
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0, :2, :2] = 1.0  # red top-left quadrant
    out = Thumbnails(2)(image)
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0] = 1.0
    assert torch.allclose(out, (expected.flatten() - 1 / 12)[None])
    assert Thumbnails(2).num_features == 12


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def fid_by_hand(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to feature rows: |μr − μf|² + Tr(Σr + Σf − 2 (Σr Σf)^½), with
    Tr (Σr Σf)^½ = Tr (Σr^½ Σf Σr^½)^½ (similar matrices; the right one symmetric, so an eigh does it)."""
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = psd_sqrt(cov_r)
    trace_root = np.sqrt(np.linalg.eigvalsh(root @ cov_f @ root).clip(min=0)).sum()
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * trace_root)


def kid_by_hand(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³ (one subset of everything)."""
    d, m = real.shape[1], len(real)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    k_rr, k_ff, k_rf = k(real, real), k(fake, fake), k(real, fake)
    off = lambda g: (g.sum() - np.trace(g)) / (m * (m - 1))  # noqa: E731
    return float(off(k_rr) + off(k_ff) - 2 * k_rf.mean())


def test_fid_and_kid_match_the_formulas_on_thumbnail_features():
    torch.manual_seed(0)
    reference = reference_videos(None, n=12, frames=4, resolution=8, seed=1)
    generated = (reference[:6] * 0.7 + 0.3 * torch.rand(6, 4, 3, 8, 8)).clamp(0, 1)
    features = Thumbnails(2)
    quality = VideoQuality(features, reference, kid={"subset_size": 24, "subsets": 3}, batch_size=7)
    row = quality(generated, ["x"] * 6)
    real = features(reference.flatten(0, 1)).double().numpy()
    fake = features(generated.flatten(0, 1)).double().numpy()
    assert row["fid"] == pytest.approx(fid_by_hand(real, fake), rel=1e-3)
    assert quality(generated, ["x"] * 6) == row  # the reference stays, the generated side is replaced
    same = quality(reference, ["x"] * 12)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["fid"] < row["fid"]


def test_kid_matches_the_unbiased_mmd_on_all_frames():
    reference = reference_videos(None, n=6, frames=4, resolution=8, seed=1)
    generated = torch.rand(6, 4, 3, 8, 8)
    features = Thumbnails(2)
    quality = VideoQuality(features, reference, fid=False, kid={"subset_size": 24, "subsets": 1})
    row = quality(generated, ["x"] * 6)
    real = features(reference.flatten(0, 1)).double().numpy()
    fake = features(generated.flatten(0, 1)).double().numpy()
    # one subset of all 24 frames on each side: the permutation only reorders the sums
    assert row["kid"] == pytest.approx(kid_by_hand(real, fake), rel=1e-4) and row["kid_std"] == 0.0
    assert "fid" not in row


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with its processor (word-level tokenizer, 32 px image processor), as a hub folder."""
    torch.manual_seed(0)
    text = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    out = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor,
                  tokenizer=word_tokenizer(" ".join(PROMPTS).split())).save_pretrained(out)
    return str(out)


def test_pretrained_features_clip_and_vit(clip_dir, tmp_path):
    images = torch.randint(0, 256, (5, 3, 32, 32)) / 255  # whole 8-bit levels: the processor works in uint8
    clip = PretrainedFeatures(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    pixels = torch.from_numpy(np.stack(processor(images=list(images), do_rescale=False,
                                                 return_tensors="np")["pixel_values"]))
    expected = model.get_image_features(pixel_values=pixels).pooler_output
    assert clip.num_features == 16 and torch.allclose(clip(images), expected, atol=1e-4)

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                             image_size=16, patch_size=8))
    vit.save_pretrained(tmp_path / "vit")  # no preprocessor_config.json: CLIP's normalisation
    features = PretrainedFeatures(str(tmp_path / "vit"))
    assert features(images).shape == (5, 24) and features.num_features == 24
    quality = VideoQuality(features, torch.rand(4, 2, 3, 32, 32), kid=None)
    assert math.isfinite(quality(torch.rand(3, 2, 3, 32, 32), ["a"] * 3)["fid"])


def test_clip_score_is_100_times_the_clipped_cosine_averaged_over_frames(clip_dir):
    videos = torch.rand(2, 3, 3, 32, 32)
    quality = VideoQuality(Thumbnails(2), torch.rand(2, 3, 3, 32, 32), fid=False, clip_score=clip_dir)
    score = quality(videos, PROMPTS)["clip_score"]
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pixels = (videos.flatten(0, 1) * 255).round().to(torch.uint8)
    inputs = processor(text=[p for p in PROMPTS for _ in range(3)], images=list(pixels), return_tensors="pt",
                       padding=True)
    image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    assert score == pytest.approx((100 * cosine.clamp(min=0)).mean().item(), rel=1e-4)


def test_reference_videos_from_shards_skip_corrupt_samples(synthetic_shards, tmp_path):
    videos = reference_videos(f"{synthetic_shards}/shard-000000.tar", n=5, frames=4, resolution=16)
    assert videos.shape == (5, 4, 3, 16, 16) and 0 <= videos.min() and videos.max() <= 1
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.npy", b"not an array"), ("a.txt", b"x"), ("b.txt", b"no video")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="holds 0 decodable video"):
        reference_videos(str(bad), n=5, frames=4, resolution=16)
    world = reference_videos(None, n=3, frames=4, resolution=16, seed=5)
    assert torch.equal(world, reference_videos(None, n=3, frames=4, resolution=16, seed=5))
