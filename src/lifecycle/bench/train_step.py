"""The pre-training step against a plain diffusers + PyTorch loop, same model and batch (`make bench`).

    python -m lifecycle.bench.train_step [--gpu] [--steps 20] [--warmup 5] [--case NAME ...] [--json FILE]

Two loops per case, each in its own process (so each has its own peak memory):
  * lifecycle: the project's pre-training module (`stages.pretrain.DenoiseStage`: guard, clipping,
    LR schedule, Min-SNR-γ in the loss space) under a Lightning Trainer; on a GPU with bf16 autocast,
    the compiled denoiser (`stage.compile`) and fused AdamW;
  * plain: the loop diffusers' example scripts write: fp32 master weights, autocast (bf16 where the
    device has it), AdamW (PyTorch's default implementation), `DDPMScheduler.add_noise`, Min-SNR-γ
    weights from `diffusers.training_utils.compute_snr` (flow matching: unweighted), frozen text
    encoder and VAE, gradient clipping.
Both train the same model config from the same initial weights on the same pre-built batches
(random data: the step is measured, not data loading), with Min-SNR γ = 5, no noise offset, no
caption dropout and no EMA. CPU cases are tiny configs; `--gpu` cases are the published
architectures' denoisers with random weights, fed latents and text embeddings as from a latent cache.
Prints samples/s (the batch over the median step time after `warmup` steps), MFU (the denoiser's
forward + backward FLOPs per sample, counted by torch's FlopCounterMode as the stage counts them,
over the device's dense peak; "—" where none is known, e.g. CPUs), peak memory (CUDA allocator, or the process's
resident-set high-water mark on CPU) and the lifecycle/plain ratios.
"""

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from diffusers.training_utils import compute_snr
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import get_available_flops
from transformers import CLIPTextConfig, CLIPTextModel

from .. import CONF_DIR
from ..config import TrainerSchema
from ..data.curriculum import Curriculum
from ..data.prompts import vocabulary
from ..models import ModelBundle, build_bundle, word_tokenizer
from ..stages.pretrain import DenoiseStage, denoiser_flops

GAMMA = 5.0


@dataclass(frozen=True)
class Case:
    """One bench case: a model, a clip size and a batch size.

    `model` is a config group under conf/model (CPU cases) or a key of ARCHITECTURES (real-size
    denoisers with random weights, `--gpu`). `latents` (C, F, h, w) marks a case fed from a latent
    cache: batches carry latents and text embeddings (`text`: tokens, width), so neither loop runs a
    VAE or text encoder and the step measured is the denoiser's.
    """

    model: str
    frames: int
    resolution: int | tuple[int, int]
    batch: int
    latents: tuple[int, int, int, int] | None = None
    text: tuple[int, int] | None = None


CPU_CASES = {
    "tiny_video": Case("tiny_video", 8, 32, 32),
    "tiny_image": Case("tiny_image", 1, 64, 32),
    "tiny_unet3d": Case("tiny_unet3d", 4, 32, 8),
    "tiny_dit": Case("tiny_dit", 1, 64, 32, latents=(4, 1, 32, 32), text=(16, 64)),
}
DDPM = {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False}
# The published architectures' denoiser configs (random weights); the text encoder is a one-layer stand-in
# of the right width, used only for the empty caption and the FLOP count.
ARCHITECTURES = {
    "sd15": (DDPM, {"_target_": "diffusers.UNet2DConditionModel", "sample_size": 64, "in_channels": 4,
                    "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                    "cross_attention_dim": 768, "attention_head_dim": 8}),
    # DiT-XL/2 blocks (28 x 1152, 16 heads, patch 2) with text cross-attention: the PixArt-alpha layout
    "dit_xl2": ({**DDPM, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                {"_target_": "diffusers.PixArtTransformer2DModel", "sample_size": 32, "patch_size": 2,
                 "in_channels": 4, "out_channels": 4, "num_layers": 28, "num_attention_heads": 16,
                 "attention_head_dim": 72, "cross_attention_dim": 1152, "caption_channels": 1152}),
    "modelscope": (DDPM, {"_target_": "diffusers.UNet3DConditionModel", "sample_size": 32, "in_channels": 4,
                          "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                          "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                          "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
                          "cross_attention_dim": 1024, "attention_head_dim": 64}),
    "wan_1_3b": ({"_target_": "diffusers.FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
                 {"_target_": "diffusers.WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
                  "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                  "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
                  "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}),
}
GPU_CASES = {
    "sd15_256": Case("sd15", 1, 256, 64, latents=(4, 1, 32, 32), text=(77, 768)),
    "sd15_512": Case("sd15", 1, 512, 32, latents=(4, 1, 64, 64), text=(77, 768)),
    "dit_xl2_256": Case("dit_xl2", 1, 256, 64, latents=(4, 1, 32, 32), text=(120, 1152)),
    "modelscope_16f_256": Case("modelscope", 16, 256, 8, latents=(4, 16, 32, 32), text=(77, 1024)),
    "wan_1_3b_33f_480x832": Case("wan_1_3b", 33, (480, 832), 1, latents=(16, 9, 60, 104), text=(512, 4096)),
}
CASES = {**CPU_CASES, **GPU_CASES}
H100_SXM_DENSE = {torch.bfloat16: 989.4e12, torch.float32: 66.9e12}  # FLOP/s, NVIDIA's datasheet


def build(case: Case, device: torch.device, seed: int = 0) -> ModelBundle:
    """The case's bundle on `device`, weights from `seed`."""
    torch.manual_seed(seed)
    if case.model not in ARCHITECTURES:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"model={case.model}"])
        return build_bundle(cfg.model).to(device)
    scheduler, denoiser = ARCHITECTURES[case.model]
    length, width = case.text
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=width, intermediate_size=width,
                                        num_hidden_layers=1, num_attention_heads=width // 64,
                                        max_position_embeddings=length, pad_token_id=0, bos_token_id=2,
                                        eos_token_id=3))
    with torch.device(device):  # real-size weights are initialised where they train
        return ModelBundle(instantiate(denoiser, _convert_="all"), text.to(device),
                           word_tokenizer(vocabulary(), max_length=length), instantiate(scheduler))


def make_batches(case: Case, n: int, seed: int = 1) -> list[dict]:
    """`n` random batches: videos and captions, or (latent-cache cases) latents and text embeddings."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "circle", "square", "moving", "left", "right", "slowly", "quickly"]
    out = []
    for _ in range(n):
        captions = [" ".join(words[j] for j in torch.randint(len(words), (6,), generator=g).tolist())
                    for _ in range(case.batch)]
        batch = {"caption": captions, "phase": 0, "skipped": 0}
        if case.latents:
            batch |= {"latents": torch.randn(case.batch, *case.latents, generator=g),
                      "hidden": torch.randn(case.batch, *case.text, generator=g),
                      "pooled": torch.randn(case.batch, case.text[1], generator=g)}
        else:
            batch["video"] = torch.rand(case.batch, case.frames, 3, case.resolution, case.resolution, generator=g)
        out.append(batch)
    return out


def precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"


def sync(device: torch.device) -> float:
    """The time once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class _Clock(L.Callback):
    """The end time of every training batch."""

    def __init__(self):
        self.ends = []

    def on_train_batch_end(self, trainer, *args):
        self.ends.append(sync(trainer.strategy.root_device))


def run_lifecycle(case: Case, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` timed steps of the project's pre-training module, with its speed features on a GPU
    (bf16 autocast, `stage.compile`, fused AdamW)."""
    bundle = build(case, device)
    if device.type == "cuda":
        bundle.denoiser.compile()  # what `stage.compile=true` does
    total = warmup + steps
    # a phase is square; with a latent cache its resolution is only a label (the latents fix the size)
    size = case.resolution if isinstance(case.resolution, int) else max(case.resolution)
    curriculum = Curriculum([{"name": "bench", "resolution": size, "frames": case.frames, "batch_size": case.batch,
                              "steps": total}])
    objective = {"loss_space": None, "min_snr_gamma": GAMMA, "min_snr_floor": 0.0, "noise_offset": 0.0,
                 "caption_dropout": 0.0, "flow_timesteps": "uniform", "logit_mean": 0.0, "logit_std": 1.0}
    module = DenoiseStage(bundle, curriculum, objective,
                          optimizer={"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8,
                                     "fused": device.type == "cuda"},
                          lr_scheduler={"name": "constant", "warmup_steps": 0},
                          guard={"action": "skip", "spike_factor": 10.0, "ema_beta": 0.98, "warmup": 20},
                          gradient_clip=1.0, max_steps=total, latent_shapes=[case.latents] if case.latents else None)
    clock = _Clock()
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision(device), max_steps=total,
                        logger=False, log_every_n_steps=TrainerSchema.log_every_n_steps, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(make_batches(case, total), batch_size=None))
    return [b - a for a, b in zip(clock.ends[warmup - 1 :], clock.ends[warmup:])]


def run_plain(case: Case, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` timed steps of a diffusers-example-style loop on the same model and batches."""
    bundle = build(case, device)
    unet, text_encoder, vae, scheduler = bundle.denoiser, bundle.text_encoder, bundle.vae, bundle.scheduler
    text_encoder.requires_grad_(False)
    if vae is not None:
        vae.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device) == "bf16-mixed")
    flow = bundle.is_flow
    prediction = None if flow else scheduler.config.prediction_type
    ends = []
    for b in make_batches(case, warmup + steps):
        if case.latents:
            latents, hidden, pooled = b["latents"].to(device), b["hidden"].to(device), b["pooled"].to(device)
        else:
            with torch.no_grad(), autocast:
                latents = bundle.encode_video(b["video"].to(device))
                hidden, pooled = bundle.encode_text(b["caption"])
        noise = torch.randn_like(latents)
        if flow:  # diffusers' flow-matching examples: x_t = (1 - σ) x0 + σ ε, target ε - x0, unweighted
            sigmas = torch.rand(len(latents), device=device)
            sigmas = scheduler.config.shift * sigmas / (1 + (scheduler.config.shift - 1) * sigmas)
            s = sigmas.view(-1, 1, 1, 1, 1)
            noisy, target, timesteps = (1 - s) * latents + s * noise, noise - latents, sigmas * 1000
            weights = torch.ones_like(sigmas)
        else:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = {"epsilon": noise, "sample": latents}.get(prediction)
            if prediction == "v_prediction":
                target = scheduler.get_velocity(latents, noise, timesteps)
            snr = compute_snr(scheduler, timesteps)
            weights = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
            weights = weights / {"epsilon": snr, "v_prediction": snr + 1}.get(prediction, torch.ones_like(snr))
        with autocast:
            pred = bundle.denoise(noisy, timesteps, hidden, pooled)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(sync(device))
    return [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])]


def flops_per_sample(case: Case, device: torch.device, frames: int | None = None) -> int:
    """The denoiser's forward + backward FLOPs for one sample of the case (or of `frames` frames), as the
    pre-training stage counts them for its throughput log."""
    bundle = build(case, device)
    return denoiser_flops(bundle, case.latents or bundle.latent_shape(frames or case.frames, case.resolution))


def peak_flops(device: torch.device) -> float | None:
    """The device's dense peak for the bench's dtype: Lightning's table, except for H200s, which it lists with
    their sparse bf16 figure under names the driver does not report; an H200 has an H100 SXM's tensor cores."""
    dtype = torch.bfloat16 if precision(device) == "bf16-mixed" else torch.float32
    if device.type == "cuda" and "h200" in torch.cuda.get_device_name(device).lower():
        return H100_SXM_DENSE[dtype]
    return get_available_flops(device, dtype)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(name: str, loop: str, steps: int, warmup: int) -> dict:
    """One loop of one case in this process: {step_seconds, samples_per_s (from the median step, robust to
    a busy machine's hiccups), peak_bytes, ...}; the plain loop's process also counts the FLOPs per sample
    (after its timed steps)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = CASES[name]
    seconds = {"lifecycle": run_lifecycle, "plain": run_plain}[loop](case, steps, warmup, device)
    result = {"step_seconds": seconds, "samples_per_s": case.batch / statistics.median(seconds),
              "peak_bytes": peak_memory(device),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": "bf16" if precision(device) == "bf16-mixed" else "fp32"}
    if loop == "plain":
        result["flops_per_sample"] = flops_per_sample(case, device)
    return result


def table(rows: list[dict]) -> str:
    header = ["case", "batch", "loop", "samples/s", "MFU", "peak memory (GiB)"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['case']} | {r['batch']} | {r['loop']} | {r['samples_per_s']:.2f} | {mfu} | "
                     f"{r['peak_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def run_case(name: str, steps: int, warmup: int, peak: float | None) -> list[dict]:
    """Both loops of one case, each in a child process: two table rows."""
    rows = []
    for loop in ("plain", "lifecycle"):
        child = subprocess.run([sys.executable, "-m", __spec__.name, "--one", name, loop, "--steps", str(steps),
                                "--warmup", str(warmup)], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{name}/{loop} failed:\n{child.stderr[-3000:]}")
        rows.append({"case": name, "batch": CASES[name].batch, "loop": loop,
                     **json.loads(child.stdout.strip().splitlines()[-1])})
    flops = rows[0]["flops_per_sample"]
    for r in rows:
        r["mfu"] = flops * r["samples_per_s"] / peak if peak else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the real-size cases (needs CUDA)")
    parser.add_argument("--case", nargs="+", choices=list(CASES), help="default: every CPU (or --gpu) case")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--json", help="also write the rows here, after each case")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "LOOP"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup: at least 1 (the first step's end starts the clock)")
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.warmup)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu and device.type != "cuda":
        raise SystemExit("--gpu: no CUDA device here")
    peak = peak_flops(device)
    rows = []
    for name in args.case or list(GPU_CASES if args.gpu else CPU_CASES):
        rows += run_case(name, args.steps, args.warmup, peak)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"device: {rows[0]['device']} ({rows[0]['dtype']}); {args.steps} timed steps after {args.warmup} warm-up\n")
    print(table(rows))
    print("\n| case | lifecycle/plain samples/s | lifecycle/plain peak memory |\n|---|---|---|")
    ratios = []
    for plain, life in zip(rows[::2], rows[1::2]):
        ratios.append(life["samples_per_s"] / plain["samples_per_s"])
        print(f"| {plain['case']} | {ratios[-1]:.3f} | {life['peak_bytes'] / plain['peak_bytes']:.3f} |")
    print(f"\ngeometric mean of the speed ratios: {math.prod(ratios) ** (1 / len(ratios)):.3f}")


if __name__ == "__main__":
    main()
