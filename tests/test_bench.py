"""make bench: the project's pre-training step and the plain diffusers loop, side by side."""

import subprocess
import sys

import torch

from lifecycle.bench.train_step import CASES, flops_per_sample


def test_bench_prints_both_loops_and_their_ratio():
    out = subprocess.run([sys.executable, "-m", "lifecycle.bench.train_step", "--case", "tiny_image", "--steps", "2",
                          "--warmup", "1"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| tiny_image | 32 |")]
    assert [r[2] for r in rows] == ["plain", "lifecycle"]
    assert all(float(r[3]) > 0 and r[4] == "—" for r in rows)  # samples/s; no known peak FLOPs on a CPU
    ratio = next(line for line in out.splitlines() if line.startswith("| tiny_image | 0.") or
                 line.startswith("| tiny_image | 1."))
    speed = float(ratio.split(" | ")[1])
    assert abs(speed - float(rows[1][3]) / float(rows[0][3])) < 0.01


def test_flops_per_sample_scale_with_the_clip_length():
    """UNet3D's convolutions and spatial attention cost the same per frame; its temporal attention grows with
    the frame count squared and its time/text embeddings not at all, both small: twice the frames, about
    twice the FLOPs (measured 1.999)."""
    cpu = torch.device("cpu")
    four, eight = (flops_per_sample(CASES["tiny_unet3d"], cpu, frames=f) for f in (4, 8))
    assert 1.95 < eight / four < 2.1
