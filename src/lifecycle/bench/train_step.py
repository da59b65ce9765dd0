"""The pre-training step against a plain diffusers + PyTorch loop, same model and batch (`make bench`).

    python -m lifecycle.bench.train_step [--steps 20] [--warmup 5] [--case NAME ...]

Two loops per case, each in its own process (so each has its own peak memory):
  * lifecycle: the project's pre-training module (`stages.denoise.DenoiseStage`: guard, clipping,
    LR schedule, Min-SNR-γ in the loss space) under a Lightning Trainer;
  * plain: the loop diffusers' example scripts write: fp32 master weights, autocast (bf16 where the
    device has it), AdamW, `DDPMScheduler.add_noise`, Min-SNR-γ weights from
    `diffusers.training_utils.compute_snr`, frozen text encoder and VAE, gradient clipping.
Both train the same model config from the same initial weights on the same pre-built batches
(random videos and captions: the step is measured, not data loading), with Min-SNR γ = 5, no noise
offset, no caption dropout and no EMA. Prints samples/s (after `warmup` steps), MFU (the denoiser's
forward + backward FLOPs per sample, counted by torch's FlopCounterMode, over the device's peak from
Lightning's table; "—" where it has none, e.g. CPUs), peak memory (CUDA allocator, or the process's
resident-set high-water mark on CPU) and the lifecycle/plain ratios.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import lightning as L
import torch
from diffusers.training_utils import compute_snr
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops

from ..__main__ import CONF_DIR
from ..data.curriculum import Curriculum
from ..models import build_bundle
from ..stages.denoise import DenoiseStage

GAMMA = 5.0
CASES = {  # name: (model config group, frames, resolution, batch size)
    "tiny_video": ("tiny_video", 8, 32, 32),
    "tiny_image": ("tiny_image", 1, 64, 32),
    "tiny_unet3d": ("tiny_unet3d", 4, 32, 8),
}


def build(case: str, seed: int = 0):
    """(bundle, batches maker) for `case`, weights from `seed`."""
    model, frames, resolution, batch = CASES[case]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    torch.manual_seed(seed)
    return build_bundle(cfg.model), frames, resolution, batch


def make_batches(n: int, frames: int, resolution: int, batch: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "circle", "square", "moving", "left", "right", "slowly", "quickly"]
    return [{"video": torch.rand(batch, frames, 3, resolution, resolution, generator=g),
             "caption": [" ".join(words[j] for j in torch.randint(len(words), (6,), generator=g).tolist())
                         for _ in range(batch)],
             "phase": 0, "skipped": 0} for _ in range(n)]


def precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"


class _Clock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def run_lifecycle(case: str, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` timed steps of the project's pre-training module."""
    bundle, frames, resolution, batch = build(case)
    total = warmup + steps
    curriculum = Curriculum([{"name": "bench", "resolution": resolution, "frames": frames, "batch_size": batch,
                              "steps": total}])
    objective = {"loss_space": None, "min_snr_gamma": GAMMA, "min_snr_floor": 0.0, "noise_offset": 0.0,
                 "caption_dropout": 0.0, "flow_timesteps": "uniform", "logit_mean": 0.0, "logit_std": 1.0}
    module = DenoiseStage(bundle, curriculum, objective,
                          optimizer={"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8,
                                     "fused": device.type == "cuda"},
                          lr_scheduler={"name": "constant", "warmup_steps": 0},
                          guard={"action": "skip", "spike_factor": 10.0, "ema_beta": 0.98, "warmup": 20},
                          gradient_clip=1.0, max_steps=total)
    clock = _Clock(warmup)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision(device), max_steps=total,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock])
    batches = make_batches(total, frames, resolution, batch)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return clock.end - clock.start


def run_plain(case: str, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` timed steps of a diffusers-example-style loop on the same model and batches."""
    bundle, frames, resolution, batch = build(case)
    bundle.to(device)
    unet, text_encoder, vae, scheduler = bundle.denoiser, bundle.text_encoder, bundle.vae, bundle.scheduler
    text_encoder.requires_grad_(False)
    if vae is not None:
        vae.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device) == "bf16-mixed")
    prediction = scheduler.config.prediction_type
    start = None
    for step, b in enumerate(make_batches(warmup + steps, frames, resolution, batch)):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        video = b["video"].to(device)
        with torch.no_grad(), autocast:
            latents = bundle.encode_video(video)
            hidden, pooled = bundle.encode_text(b["caption"])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = {"epsilon": noise, "sample": latents}.get(prediction)
        if prediction == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        with autocast:
            pred = bundle.denoise(noisy, timesteps, hidden, pooled)
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / {"epsilon": snr, "v_prediction": snr + 1}.get(prediction, torch.ones_like(snr))
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def flops_per_sample(case: str, device: torch.device, frames: int | None = None) -> int:
    """The denoiser's forward + backward FLOPs for one sample of the case (or of `frames` frames), counted by
    torch's FlopCounterMode through Lightning's `measure_flops`."""
    bundle, case_frames, resolution, _ = build(case)
    frames = frames or case_frames
    bundle.to(device)
    x = torch.randn(1, *bundle.latent_shape(frames, resolution), device=device)
    hidden, pooled = bundle.encode_text(["a red circle moving left"])
    t = torch.tensor([500], device=device)
    return measure_flops(bundle.denoiser, lambda: bundle.denoise(x, t, hidden, pooled), lambda y: y.sum())


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(case: str, loop: str, steps: int, warmup: int) -> dict:
    """One loop of one case in this process: {seconds, samples_per_s, peak_bytes}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = {"lifecycle": run_lifecycle, "plain": run_plain}[loop](case, steps, warmup, device)
    return {"seconds": seconds, "samples_per_s": steps * CASES[case][3] / seconds, "peak_bytes": peak_memory(device),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": "bf16" if precision(device) == "bf16-mixed" else "fp32"}


def table(rows: list[dict]) -> str:
    header = ["case", "batch", "loop", "samples/s", "MFU", "peak memory (GiB)"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['case']} | {r['batch']} | {r['loop']} | {r['samples_per_s']:.1f} | {mfu} | "
                     f"{r['peak_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "LOOP"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.warmup)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, ratios = [], []
    for case in args.case:
        flops = flops_per_sample(case, device)
        peak = get_available_flops(device, torch.bfloat16 if precision(device) == "bf16-mixed" else torch.float32)
        result = {}
        for loop in ("plain", "lifecycle"):
            child = subprocess.run([sys.executable, "-m", __spec__.name, "--one", case, loop, "--steps", str(args.steps),
                                    "--warmup", str(args.warmup)], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"{case}/{loop} failed:\n{child.stderr[-3000:]}")
            result[loop] = json.loads(child.stdout.strip().splitlines()[-1])
            mfu = flops * result[loop]["samples_per_s"] / peak if peak else None
            rows.append({"case": case, "batch": CASES[case][3], "loop": loop, "mfu": mfu, **result[loop]})
        ratios.append((case, result["lifecycle"]["samples_per_s"] / result["plain"]["samples_per_s"],
                       result["lifecycle"]["peak_bytes"] / result["plain"]["peak_bytes"]))
    print(f"device: {rows[0]['device']} ({rows[0]['dtype']}); {args.steps} timed steps after {args.warmup} warm-up\n")
    print(table(rows))
    print("\n| case | lifecycle/plain samples/s | lifecycle/plain peak memory |\n|---|---|---|")
    for case, speed, memory in ratios:
        print(f"| {case} | {speed:.3f} | {memory:.3f} |")
    print(f"\ngeometric mean of the speed ratios: {math.prod(r for _, r, _ in ratios) ** (1 / len(ratios)):.3f}")


if __name__ == "__main__":
    main()
