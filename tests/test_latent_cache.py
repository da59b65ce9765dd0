"""The latent cache: clips and captions encoded once, read by pre-training in place of the VAE and text encoder."""

import json

import pytest
import torch
from hydra.utils import instantiate

from lifecycle.errors import ConfigError
from lifecycle.data.curriculum import Curriculum
from lifecycle.stages.latent_cache import run as write
from lifecycle.data.shards import CurriculumStream, list_shards
from lifecycle.models import ModelBundle, build_bundle
from lifecycle.stages.pretrain import DenoiseStage
from lifecycle.stages.pretrain import run as fit

from .helpers import compose_cfg as compose_default


def compose_cfg(run_dir, *overrides, shards):
    """The validated config of a model=tiny_image run (a VAE model) on `shards`."""
    return compose_default(run_dir, "model=tiny_image", *overrides, shards=str(shards), tiny=False)


PHASE = {"name": "a", "resolution": 32, "frames": 1, "batch_size": 4, "steps": 3}
OBJECTIVE = {"loss_space": None, "min_snr_gamma": 5.0, "min_snr_floor": 0.0, "noise_offset": 0.1,
             "caption_dropout": 0.5, "flow_timesteps": "uniform", "logit_mean": 0.0, "logit_std": 1.0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_shards):
    """The synthetic clips at 1 frame x 32 px, encoded by model=tiny_image (a VAE model) seeded like training."""
    root = tmp_path_factory.mktemp("cache")
    cfg = compose_cfg(root / "run", "stage=latent_cache", f"stage.out={root / 'cache'}",
                      "stage.frames=1", "stage.resolution=32", "stage.batch_size=16", "stage.samples_per_shard=40",
                      shards=synthetic_shards)
    assert write(cfg) == {"samples": 160, "skipped": 0}
    assert write(cfg) == {"samples": 160, "skipped": 0}  # written once; a second run finds it
    (root / "taken").mkdir()
    with pytest.raises(ConfigError, match="stage.out: .* is not a latent cache"):
        write(compose_cfg(root / "run", "stage=latent_cache", f"stage.out={root / 'taken'}", shards=synthetic_shards))
    with pytest.raises(ConfigError, match="data.shards: .* is already a latent cache"):
        write(compose_cfg(root / "run", "stage=latent_cache", f"stage.out={root / 'again'}", shards=root / "cache"))
    return root / "cache", cfg


def first_batch(urls) -> dict:
    return next(iter(CurriculumStream(urls, Curriculum([PHASE]), seed=3, shuffle_buffer=8)))


def test_cache_holds_the_vae_posterior_and_caption_embeddings_of_every_clip(cache, synthetic_shards):
    folder, cfg = cache
    manifest = json.loads((folder / "cache.json").read_text())
    assert manifest["latent_shape"] == [4, 1, 16, 16] and manifest["samples"] == 160
    assert len(list_shards(str(folder))) == 4  # 40 a shard, as the source: both streams read the same samples

    cached, videos = first_batch(list_shards(str(folder))), first_batch(list_shards(synthetic_shards))
    assert cached["caption"] == videos["caption"]  # the same stream of samples
    torch.manual_seed(cfg.seed)
    bundle = build_bundle(cfg.model).eval()
    with torch.no_grad():
        mean, std = bundle.encode_posterior(videos["video"])
        hidden, pooled = bundle.encode_text(videos["caption"])
    for got, want in ((cached["latents"], mean), (cached["latents_std"], std), (cached["hidden"], hidden),
                      (cached["pooled"], pooled)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(std.min()) > 0  # a real posterior: training draws from it


def test_a_cached_batch_gives_the_loss_of_encoding_in_the_step(cache, synthetic_shards):
    """Same per-sample generators: the posterior draw, caption dropout, noise and timesteps all coincide."""
    folder, cfg = cache
    torch.manual_seed(cfg.seed)
    bundle = build_bundle(cfg.model)
    module = DenoiseStage(bundle, Curriculum([PHASE]), OBJECTIVE, optimizer={"lr": 1e-4},
                          lr_scheduler={"name": "constant", "warmup_steps": 0},
                          guard={"action": "skip", "spike_factor": 10.0, "ema_beta": 0.98, "warmup": 20})
    cached, videos = first_batch(list_shards(str(folder))), first_batch(list_shards(synthetic_shards))
    with torch.no_grad():
        from_video = module.denoising_loss(videos, module.sample_generators(4))
        from_cache = module.denoising_loss(cached, module.sample_generators(4))
    torch.testing.assert_close(from_cache, from_video, rtol=1e-5, atol=0)


def test_pretraining_reads_the_cache_without_running_the_vae_or_text_encoder(cache, tmp_path, monkeypatch):
    folder, _ = cache
    texts = []
    encode_text = ModelBundle.encode_text

    def record(self, prompts):
        texts.append(list(prompts))
        return encode_text(self, prompts)

    def no_vae(*args):
        raise AssertionError("the VAE ran")

    monkeypatch.setattr(ModelBundle, "encode_text", record)
    monkeypatch.setattr(ModelBundle, "encode_posterior", no_vae)
    run = ["stage.curriculum=[{name:a,resolution:32,frames:1,batch_size:8,steps:3}]",
           "stage.train_text_encoder=false", "stage.validation.num_steps=2", "stage.validation.prompts.n=2",
           "stage.validation.every_n_steps=0", "trainer.enable_progress_bar=false", "data.num_workers=0"]
    cfg = compose_cfg(tmp_path, *run, shards=str(folder))
    assert fit(cfg)["steps"] == 3
    encoded = {p for prompts in texts for p in prompts}
    assert "" in encoded  # the empty caption, for caption dropout
    assert encoded - {""} <= set(instantiate(cfg.stage.validation.prompts))  # otherwise only the sample prompts

    with pytest.raises(ConfigError, match=r"stage.curriculum\[0\]: 1 frames at 64 px"):
        fit(compose_cfg(tmp_path / "b", *run, "stage.curriculum=[{name:a,resolution:64,frames:1,batch_size:8,steps:3}]",
                        shards=str(folder)))
    with pytest.raises(ConfigError, match="stage.train_text_encoder"):
        fit(compose_cfg(tmp_path / "c", *run, "stage.train_text_encoder=true", shards=str(folder)))
