"""A resume states what changed: keys that differ from the checkpoint's config are listed, those that cannot
change are refused in one line, and those that can (lr, max steps) take effect as asked."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler

from lifecycle.stages.pretrain import run as fit

from .helpers import TINY, compose_cfg

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SHORT = ["stage.curriculum=[{name:low,resolution:16,frames:8,batch_size:4,steps:8}]", "stage.validation.num_steps=2",
         "stage.validation.prompts.n=2", "stage.lr_scheduler.warmup_steps=2", "trainer.checkpoint_every_n_steps=2",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.num_workers=0"]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, synthetic_shards):
    """A run stopped after 4 of its steps at lr 1e-4 (its last.ckpt at step 4)."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    fit(compose_cfg(run_dir, *SHORT, "trainer.max_steps=4", "stage.optimizer.lr=1e-4", shards=synthetic_shards))
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "export")  # as if it had been stopped before the end
    return tmp_path / "run"


def _lr_schedule(lr: float, steps: int) -> list[float]:
    """The lr the stage logs after each optimizer step (cosine, 2 warm-up steps, `steps` in all)."""
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=steps)
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_a_changed_lr_and_max_steps_take_effect_and_are_listed(four_steps, tmp_path, synthetic_shards, caplog):
    """Before: the restored schedule kept the checkpoint's lr while lineage.json recorded the new one."""
    run = _copy(four_steps, tmp_path)
    caplog.set_level("WARNING", logger="lifecycle.resume")
    fit(compose_cfg(run, *SHORT, "trainer.resume=last", "trainer.max_steps=8", "stage.optimizer.lr=1e-3",
                    shards=synthetic_shards))
    assert ("resuming step 4 with a changed config: stage.optimizer.lr: 0.0001 -> 0.001, "
            "trainer.max_steps: 4 -> 8") in caplog.text
    logged = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/lr")}
    assert [logged[s] for s in range(4, 8)] == pytest.approx(_lr_schedule(1e-3, 8)[4:], rel=1e-6)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-3]
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3
    made = json.loads((run / "export" / "lineage.json").read_text())
    assert made["config"]["stage"]["optimizer"]["lr"] == 1e-3
    assert made["resumed"] == [{"step": 4, "changed": {"stage.optimizer.lr": [1e-4, 1e-3], "trainer.max_steps": [4, 8]}}]


def test_a_changed_model_width_is_refused_in_one_line(four_steps, tmp_path, synthetic_shards):
    """Before: the resume failed loading the weights, with a 205-line log."""
    run = _copy(four_steps, tmp_path)
    wider = [o.replace("[16,32]", "[32,64]") for o in TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "lifecycle", *wider, *SHORT, f"data.shards={synthetic_shards}",
                           "data.generate=null", f"hydra.run.dir={run}", "trainer.resume=last"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if "config error:" in line]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert lines[0].endswith(f"config error: trainer.resume: {run / 'checkpoints' / 'last.ckpt'} was trained with "
                             f"model.denoiser.unet_config.block_out_channels: [16, 32] -> [32, 64]; the model, the "
                             f"stage and what trains cannot change on resume (use another run directory, or "
                             f"overwrite=true)")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # untouched
