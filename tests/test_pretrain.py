"""The pre-training stage end to end on CPU: curriculum, logging, guard, EMA, checkpoints, exact resume."""

import csv
import math
from pathlib import Path

import pytest
import torch

from lifecycle.bench.train_step import Case, build
from lifecycle.data.curriculum import Curriculum
from lifecycle.models import ModelBundle
from lifecycle.stages.pretrain import DenoiseStage
from lifecycle.errors import DivergenceError
from lifecycle.stages.pretrain import run as fit

from .helpers import compose_cfg

SHORT = [
    "stage.curriculum=[{name:low,resolution:16,frames:8,batch_size:4,steps:4},"
    "{name:full,resolution:32,frames:8,batch_size:2,steps:4}]",
    "stage.validation.num_steps=2",
    "stage.validation.prompts.n=2",
    "stage.lr_scheduler.warmup_steps=2",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.throughput_window=2",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "stage.ema.decay=0.9",
]


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_pretrain_writes_everything_a_person_looks_at(tmp_path, synthetic_shards):
    result = fit(compose_cfg(tmp_path, *SHORT, shards=synthetic_shards))
    assert result["steps"] == 8
    for rel in ["checkpoints/last.ckpt", "export/model_index.json", "export/lineage.json", "metrics.csv",
                "samples/final/000.mp4", "samples/final/001.gif", "samples/final/filmstrip.png",
                "samples/final/fidelity.json"]:
        assert (tmp_path / rel).exists(), rel
    logged = [r for r in rows(tmp_path) if r.get("train/loss")]
    assert len(logged) == 8
    assert [float(r["train/resolution"]) for r in logged] == [16.0] * 4 + [32.0] * 4  # curriculum switched
    assert [float(r["train/phase"]) for r in logged] == [0.0] * 4 + [1.0] * 4
    for key in ["train/loss_ema", "train/grad_norm", "train/lr"]:
        assert all(r[key] for r in logged), key
    # throughput from Lightning's ThroughputMonitor with the module's FLOPs per batch: 4 samples at 16 px, then
    # 2 at 32 px, where 4x the pixels cost about 4x the FLOPs per sample
    speed = [r for r in rows(tmp_path) if r.get("train/device/samples_per_sec")]
    assert len(speed) >= 6 and all(float(r["train/device/samples_per_sec"]) > 0 for r in speed)
    per_batch = [float(r["train/device/flops_per_sec"]) / float(r["train/device/batches_per_sec"]) for r in speed]
    assert 3.5 < (per_batch[-1] / 2) / (per_batch[0] / 4) < 4.5
    lrs = [float(r["train/lr"]) for r in logged]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warm-up, then cosine decay
    assert 0.0 <= result["colour_accuracy"] <= 1.0 and result["chance_colour"] == pytest.approx(1 / 6)
    # the export holds the EMA weights, not the last raw weights
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    raw = ckpt["state_dict"]["bundle.denoiser.unet.conv_in.weight"]
    exported = ModelBundle.from_pretrained(str(tmp_path / "export")).denoiser.unet.conv_in.weight
    ema = [c for k, c in ckpt["callbacks"].items() if k.startswith("EMA")][0]["shadow"]
    assert torch.equal(exported, ema["bundle.denoiser.unet.conv_in.weight"])
    assert not torch.equal(exported, raw)


@pytest.mark.faults
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, synthetic_shards, monkeypatch):
    straight = tmp_path / "straight"
    fit(compose_cfg(straight, *SHORT, shards=synthetic_shards))

    resumed = tmp_path / "resumed"
    original = DenoiseStage.training_step

    def preempted(self, batch, batch_idx):
        if self.global_step == 5:  # checkpoints exist for steps 2 and 4
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DenoiseStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        fit(compose_cfg(resumed, *SHORT, shards=synthetic_shards))
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    monkeypatch.setattr(DenoiseStage, "training_step", original)
    result = fit(compose_cfg(resumed, *SHORT, "trainer.resume=last", shards=synthetic_shards))
    assert result["steps"] == 8
    logged = [int(r["step"]) for r in rows(resumed) if r.get("train/loss")]
    assert logged == [int(r["step"]) for r in rows(straight) if r.get("train/loss")]  # history kept, no repeats

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    ema_a, ema_b = ([c for k, c in ck["callbacks"].items() if k.startswith("EMA")][0] for ck in (a, b))
    for name, tensor in ema_a["shadow"].items():
        assert torch.equal(tensor, ema_b["shadow"][name]), name
    assert a["lifecycle"] == b["lifecycle"]  # data position and loss EMA
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def _poison(monkeypatch, at_batch):
    original = DenoiseStage.denoising_loss

    def loss(self, batch, g):
        value = original(self, batch, g)
        return value * float("nan") if self.batches_seen == at_batch else value

    monkeypatch.setattr(DenoiseStage, "denoising_loss", loss)


@pytest.mark.faults
def test_guard_skip_drops_the_bad_step_and_finishes(tmp_path, synthetic_shards, monkeypatch):
    _poison(monkeypatch, at_batch=3)
    result = fit(compose_cfg(tmp_path, *SHORT, "stage.guard.action=skip", shards=synthetic_shards))
    assert result["steps"] == 8  # eight applied updates from nine batches
    counts = [float(r["guard/skipped_updates"]) for r in rows(tmp_path) if r.get("train/loss")]
    assert counts[0] == 0.0 and counts[-1] == 1.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["lifecycle"]["batches_seen"] == 9
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_validation_logs_scores_every_n_steps_and_keeps_the_best_checkpoint(tmp_path, synthetic_shards, monkeypatch):
    sampled = []  # (arguments, videos) of each validation's sampling
    generate = ModelBundle.generate

    def recording(self, *args, **kwargs):
        videos = generate(self, *args, **kwargs)
        sampled.append((args, kwargs, videos))
        return videos

    monkeypatch.setattr(ModelBundle, "generate", recording)
    result = fit(compose_cfg(tmp_path, *SHORT, "stage.validation.every_n_steps=2", "stage.validation.best=val/fid",
                             "stage.validation.prompts.n=4", "metrics.reference.n=16", shards=synthetic_shards))
    # the end of training (step 8, validated already) is not sampled again: samples/final is step 8's ...
    assert len(sampled) == 4
    assert (tmp_path / "samples" / "final" / "fidelity.json").read_text() == (
        tmp_path / "samples" / "step000008" / "fidelity.json").read_text()
    # ... which were the final EMA weights, those exported (EMA updated before the step's validation)
    args, kwargs, videos = sampled[-1]
    monkeypatch.setattr(ModelBundle, "generate", generate)
    assert torch.equal(ModelBundle.from_pretrained(str(tmp_path / "export")).generate(*args, **kwargs), videos)
    fid = {int(r["step"]): float(r["val/fid"]) for r in rows(tmp_path) if r.get("val/fid")}
    assert sorted(fid) == [2, 4, 6, 8]  # each validated step once (the end, at step 8, is not logged twice)
    assert all(r.get("val/kid") and r.get("val/colour_accuracy") for r in rows(tmp_path) if r.get("val/fid"))
    best = min(fid, key=fid.get)
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == best
    assert result["best"]["val/fid"] == pytest.approx(fid[best], rel=1e-5)
    for step in (2, 4, 6, 8):
        assert (tmp_path / "samples" / f"step{step:06d}" / "000.mp4").exists()
    assert result["fid"] == pytest.approx(fid[8], rel=1e-5)  # the final samples are step 8's
    fit(compose_cfg(tmp_path / "plain", *SHORT, "stage.validation.every_n_steps=0", shards=synthetic_shards))
    validated, plain = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (tmp_path, tmp_path / "plain"))
    assert all(torch.equal(validated["state_dict"][k], v) for k, v in plain["state_dict"].items())  # training unchanged
    shadows = [c["EMA"]["shadow"] for c in (validated["callbacks"], plain["callbacks"])]
    assert all(torch.equal(shadows[0][k], v) for k, v in shadows[1].items())  # and the EMA weights, swapped back


@pytest.mark.faults
def test_validation_of_diverged_weights_reports_nan_and_keeps_the_last_finite_best(tmp_path, synthetic_shards,
                                                                                   monkeypatch):
    """With the guard blind, a NaN loss at batch 3 poisons the weights: validation must neither crash the process
    (FID's matrix square root on NaN features) nor choose a NaN step as the best checkpoint."""
    from lifecycle.stages.guard import LossGuard

    _poison(monkeypatch, at_batch=3)
    monkeypatch.setattr(LossGuard, "problem", lambda self, value, name="loss": None)
    result = fit(compose_cfg(tmp_path, *SHORT, "stage.validation.every_n_steps=2", "stage.validation.best=val/fid",
                             "stage.validation.prompts.n=4", "metrics.reference.n=16", shards=synthetic_shards))
    fid = {int(r["step"]): float(r["val/fid"]) for r in rows(tmp_path) if r.get("val/fid")}
    assert sorted(fid) == [2, 4, 6, 8] and math.isfinite(fid[2])
    assert all(math.isnan(fid[step]) for step in (4, 6, 8)) and math.isnan(result["fid"])
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.faults
def test_guard_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_shards, monkeypatch):
    _poison(monkeypatch, at_batch=5)
    with pytest.raises(DivergenceError, match="step 5: loss is nan"):
        fit(compose_cfg(tmp_path, *SHORT, "stage.guard.action=stop", shards=synthetic_shards))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert not (tmp_path / "export").exists()


def test_tensorboard_gets_scalars_and_animated_samples(tmp_path, synthetic_shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(compose_cfg(tmp_path, *SHORT, "logger=tensorboard", "trainer.max_steps=2", shards=synthetic_shards))
    assert (tmp_path / "metrics.csv").exists()  # CSV is kept beside it
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "val/fid", "val/colour_accuracy"} <= set(events.Tags()["scalars"])
    image = events.Images("val/00")[-1]
    assert image.encoded_image_string[:4] == b"GIF8" and image.width == 256  # the exported, watermarked GIF


def test_wandb_offline_gets_metrics_and_sample_videos(tmp_path, synthetic_shards):
    fit(compose_cfg(tmp_path, *SHORT, "logger=wandb", "trainer.max_steps=2", shards=synthetic_shards))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("*.mp4")), "sample videos were not logged"
    assert list(runs[0].glob("run-*.wandb"))


@pytest.mark.parametrize("option", ["stage.gradient_checkpointing=true", "stage.compile=true"])
def test_speed_options_train_the_same_weights(tmp_path, synthetic_shards, option):
    """Activation checkpointing recomputes the same activations and torch.compile runs the same math: two steps
    with either option end at the weights of two plain steps."""
    tiny = ["stage.curriculum=[{name:a,resolution:16,frames:8,batch_size:2,steps:2}]", "stage.validation.prompts.n=1",
            "stage.validation.num_steps=1", "stage.ema.decay=null", "trainer.enable_progress_bar=false",
            "data.num_workers=0", "stage.optimizer.fused=false"]
    from torch._dynamo.utils import counters

    plain = fit(compose_cfg(tmp_path / "plain", *tiny, shards=synthetic_shards))
    counters.clear()
    fast = fit(compose_cfg(tmp_path / "fast", *tiny, option, shards=synthetic_shards))
    assert plain["steps"] == fast["steps"] == 2
    assert bool(counters["stats"]["unique_graphs"]) == option.startswith("stage.compile")  # dynamo traced it
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "fast" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0])
def test_a_latent_cache_batch_gives_the_loss_of_the_video_batch(dropout):
    """Pixel space (the encoder draws no noise): latents + text embeddings computed ahead of the step, with
    dropped captions swapped for the empty caption's embedding, give exactly the loss of encoding in the step."""
    bundle = build(Case("tiny_wan", 4, 16, 6), torch.device("cpu"))
    objective = {"loss_space": None, "min_snr_gamma": 5.0, "min_snr_floor": 0.0, "noise_offset": 0.1,
                 "caption_dropout": dropout, "flow_timesteps": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    module = DenoiseStage(bundle, Curriculum([{"name": "a", "resolution": 16, "frames": 4, "batch_size": 6,
                                               "steps": 1}]), objective, optimizer={"lr": 1e-4},
                          lr_scheduler={"name": "constant", "warmup_steps": 0},
                          guard={"action": "skip", "spike_factor": 10.0, "ema_beta": 0.98, "warmup": 20})
    captions = ["a red circle moving left", "a blue square", "green", "a red square moving right", "blue", "red"]
    video = torch.rand(6, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    def gens():
        return [torch.Generator().manual_seed(i) for i in range(6)]

    with torch.no_grad():
        hidden, pooled = bundle.encode_text(captions)
        cached = {"latents": bundle.encode_video(video), "hidden": hidden, "pooled": pooled, "caption": captions}
        from_video = module.denoising_loss({"video": video, "caption": captions}, gens())
        from_cache = module.denoising_loss(cached, gens())
    assert torch.equal(from_video, from_cache)
