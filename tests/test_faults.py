"""Fault injection on a short pre-training run: SIGKILL, a kill inside a checkpoint write, SIGTERM and SIGINT, a
SLURM requeue, a full disk, NaN/Inf gradients, corrupt data. Each ends with what the README's reliability table
promises.

The random step and checkpoint write are drawn from a seed printed with any failure; set
LIFECYCLE_FAULT_SEED to replay one.
"""

import csv
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lifecycle.checkpointing import newest_checkpoint
from lifecycle.data.shards import list_shards
from lifecycle.data.video_io import encode_video
from lifecycle.stages.pretrain import DenoiseStage
from lifecycle.errors import CheckpointWriteError, DivergenceError
from lifecycle.stages.pretrain import run as fit

from .helpers import TINY, compose_cfg

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("LIFECYCLE_FAULT_SEED", random.SystemRandom().randrange(10**6)))
STEPS = 8  # checkpoints every 2 steps: step00000N.ckpt, then last.ckpt
SHORT = [
    f"stage.curriculum=[{{name:low,resolution:16,frames:8,batch_size:4,steps:{STEPS}}}]",
    "stage.validation.num_steps=2", "stage.validation.prompts.n=2", "stage.lr_scheduler.warmup_steps=2",
    "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "data.num_workers=0", "stage.ema.decay=0.9",
]


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _trained(run_dir) -> dict:
    """Everything the run's final checkpoint holds that decides what comes next."""
    ckpt = _load(Path(run_dir) / "checkpoints" / "last.ckpt")
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["shadow"]
    moments = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()]
    return {"step": ckpt["global_step"], "weights": ckpt["state_dict"], "ema": ema, "moments": moments,
            "lifecycle": ckpt["lifecycle"]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    for part in ("weights", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part} {name}"
    assert all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"], strict=True))
    assert a["lifecycle"] == b["lifecycle"]


def _killed(run_dir, shards, *fault: str, env=None) -> subprocess.CompletedProcess:
    """`python -m lifecycle` on the test model in a fresh process, through tests/fault_driver.py with `fault`
    (its name, its number, then any further overrides); `env`: added to the environment."""
    overrides = [*TINY, *SHORT, f"data.shards={shards}", "data.generate=null", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(torch.get_num_threads()),  # as in-process
           **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), *fault, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # its own process group: ctrl-c-at-step signals it


@pytest.fixture(scope="module")
def straight(tmp_path_factory, synthetic_shards):
    """The uninterrupted run every interrupted one must end at."""
    run_dir = tmp_path_factory.mktemp("straight")
    fit(compose_cfg(run_dir, *SHORT, shards=synthetic_shards))
    return _trained(run_dir)


def test_sigkill_at_a_random_step_then_resume_ends_with_the_same_weights(tmp_path, synthetic_shards, straight):
    step = random.Random(SEED).randint(1, STEPS - 1)
    killed = _killed(tmp_path, synthetic_shards, "kill-at-step", str(step))
    assert killed.returncode == -9, f"seed {SEED}, step {step}: {killed.stderr[-2000:]}"
    assert not (tmp_path / "export").exists()
    kept = _load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] if step >= 2 else None
    assert kept == (step // 2 * 2 if step >= 2 else None), f"seed {SEED}"  # the last checkpoint before the kill

    fit(compose_cfg(tmp_path, *SHORT, "trainer.resume=last", shards=synthetic_shards))  # a new process resumes
    _assert_same(straight, _trained(tmp_path))
    logged = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/loss")]
    assert logged == list(range(STEPS)), f"seed {SEED}"  # rows past the checkpoint were dropped, then relogged


def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, synthetic_shards, straight):
    write = random.Random(SEED).randint(3, 6)  # writes: step2, last@2, step4, last@4, step6, last@6, ...
    killed = _killed(tmp_path, synthetic_shards, "kill-in-checkpoint-write", str(write))
    assert killed.returncode == -9, f"seed {SEED}, write {write}: {killed.stderr[-2000:]}"
    ckpts = tmp_path / "checkpoints"
    torn = list(ckpts.glob(".*.ckpt.tmp"))
    assert len(torn) == 1, f"seed {SEED}: {sorted(p.name for p in ckpts.iterdir())}"
    with pytest.raises(Exception):  # noqa: B017 - the torn half is not a checkpoint, whatever the loader raises
        _load(torn[0])
    last_written = (write - 1) // 2 * 2  # last.ckpt's step before the kill
    assert _load(ckpts / "last.ckpt")["global_step"] == last_written, f"seed {SEED}, write {write}"

    fit(compose_cfg(tmp_path, *SHORT, "trainer.resume=last", shards=synthetic_shards))
    _assert_same(straight, _trained(tmp_path))
    assert not list(ckpts.glob(".*.tmp")), "the torn staging file outlived the run"


def test_a_full_disk_during_checkpointing_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, synthetic_shards,
                                                                                            monkeypatch):
    real_save, writes = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith(".ckpt.tmp"):
            writes.append(f.name)
            if len(writes) == 4:  # last.ckpt at step 4: some bytes land, then the disk is full
                f.write(b"x" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*last\.ckpt: the disk is full .*"
                                                   r"the previous checkpoint .*last\.ckpt is intact"):
        fit(compose_cfg(tmp_path, *SHORT, shards=synthetic_shards))
    ckpts = tmp_path / "checkpoints"
    assert _load(ckpts / "last.ckpt")["global_step"] == 2
    assert not list(ckpts.glob(".*.tmp"))  # the partial file is removed, giving back its space


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_an_inf_gradient_triggers_the_guard(tmp_path, synthetic_shards, monkeypatch, action):
    original = DenoiseStage.manual_backward

    def backward(self, loss, *args, **kwargs):
        original(self, loss, *args, **kwargs)
        if self.batches_seen == 5:  # optimizer step 4: the loss is finite, a gradient is not
            next(p for p in self.parameters() if p.requires_grad).grad[0].fill_(float("inf"))

    monkeypatch.setattr(DenoiseStage, "manual_backward", backward)
    cfg = compose_cfg(tmp_path, *SHORT, f"stage.guard.action={action}", shards=synthetic_shards)
    if action == "stop":
        with pytest.raises(DivergenceError, match="step 4: gradient norm is inf; stopping"):
            fit(cfg)
        assert _load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4  # written before the bad step
        assert not (tmp_path / "export").exists()
        return
    assert fit(cfg)["steps"] == STEPS  # eight applied updates from nine batches
    ckpt = _load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["lifecycle"]["batches_seen"] == STEPS + 1 and ckpt["lifecycle"]["guard"]["rejected"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def _faulty_shards(src: str, out: Path) -> Path:
    """A shard with an undecodable mp4 and a caption-less sample, and a truncated shard: 53 samples."""
    out.mkdir()
    shards = list_shards(src)
    data = Path(shards[0]).read_bytes()
    (out / "truncated.tar").write_bytes(data[: len(data) // 3])  # cut mid-member
    with tarfile.open(shards[0]) as tin, tarfile.open(out / Path(shards[0]).name, "w") as tout:
        for member in tin.getmembers():
            payload = tin.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if key == "00000001" and ext == "npy":  # the clip as an mp4 that stops after its header
                video = encode_video(np.load(io.BytesIO(payload)), "mp4")
                member, payload = tarfile.TarInfo(f"{key}.mp4"), video[: len(video) // 4]
            if key == "00000002" and ext == "json":
                payload = json.dumps({k: v for k, v in json.loads(payload).items() if k != "caption"}).encode()
            member = tarfile.TarInfo(member.name)
            member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    return out


def test_corrupt_data_is_skipped_counted_and_training_continues(tmp_path, synthetic_shards, caplog):
    shards = _faulty_shards(synthetic_shards, tmp_path / "shards")
    caplog.set_level("WARNING", logger="lifecycle.data.shards")
    # 8 steps x 8 clips: more than the shards hold, so every sample is read at least once
    cfg = compose_cfg(tmp_path / "run", *SHORT, "data.shuffle_buffer=8",
                      f"stage.curriculum=[{{name:low,resolution:16,frames:8,batch_size:8,steps:{STEPS}}}]",
                      shards=str(shards))
    assert fit(cfg)["steps"] == STEPS
    warnings = [r.getMessage() for r in caplog.records if "skipping corrupt sample" in r.getMessage()]
    assert any("no caption" in w for w in warnings), warnings
    assert any("truncated.tar" in w or "ReadError" in w or "unexpected end" in w.lower() for w in warnings), warnings
    assert any("sample 00000001.mp4 of" in w and "cannot decode video" in w for w in warnings), warnings
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r.get("data/skipped_samples")]
    assert float(rows[-1]["data/skipped_samples"]) >= 3


def test_shards_that_are_not_tars_stop_the_cli_with_one_line_not_a_spin(tmp_path):
    """Before: the run never ended, writing ~150 MB of warnings a minute. Through a loader worker (the default)."""
    for i in range(2):
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"{i}.tar").write_bytes(b"not a tar" * 1000)
    overrides = [*TINY, *SHORT, "data.num_workers=1", f"data.shards={tmp_path / 'shards'}", "data.generate=null",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "lifecycle", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr  # Hydra's log goes to stdout
    assert done.returncode == 1, output[-2000:]
    stopped = [line for line in output.splitlines() if "stopped:" in line]
    assert len(stopped) == 1 and stopped[0].endswith("data.shards: a whole pass over 2 shard(s) read no sample "
                                                     "(2 failed reads so far)"), output[-2000:]
    assert output.count("skipping corrupt sample") == 2


def test_the_guard_stops_a_run_whose_every_update_is_skipped(tmp_path, synthetic_shards, monkeypatch):
    """All-NaN data from batch 3 on: before, the guard skipped every update forever and the step never advanced."""
    original = DenoiseStage.denoising_loss
    monkeypatch.setattr(DenoiseStage, "denoising_loss",
                        lambda self, batch, g: original(self, batch, g) * (float("nan") if self.batches_seen >= 2 else 1))
    cfg = compose_cfg(tmp_path, *SHORT, "stage.guard.action=skip", "stage.guard.max_skips_in_a_row=3",
                      shards=synthetic_shards)
    with pytest.raises(DivergenceError, match="step 2: loss is nan; the last 3 updates were all skipped"):
        fit(cfg)
    assert _load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


def _one_line(output: str, start: str) -> str:
    lines = [line for line in output.splitlines() if start in line]
    assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_checkpoint_at_the_next_step_and_exit_non_zero(tmp_path, synthetic_shards, straight, signum):
    """Before: SIGTERM ended the run with status 0, no checkpoint at the signal and no message (Lightning's
    SIGTERMException is a SystemExit without a code); Ctrl+C landed wherever it fell, mid-step included."""
    step = random.Random(SEED).randint(1, STEPS - 2)
    name = signal.Signals(signum).name
    stopped = _killed(tmp_path, synthetic_shards, f"{name.lower()}-at-step", str(step))
    assert stopped.returncode == 128 + signum, f"seed {SEED}: {stopped.stderr[-2000:]}"
    line = _one_line(stopped.stdout + stopped.stderr, "stopped by")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert line.endswith(f"stopped by {name} at step {step + 1}; checkpoint {last}; to resume, run the same "
                         f"command with trainer.resume=last hydra.run.dir={tmp_path}"), line
    assert _load(last)["global_step"] == step + 1  # the step in flight was finished and kept: none lost
    assert not (tmp_path / "export").exists() and not (tmp_path / "result.json").exists()

    fit(compose_cfg(tmp_path, *SHORT, "trainer.resume=last", shards=synthetic_shards))
    _assert_same(straight, _trained(tmp_path))


def test_ctrl_c_while_waiting_for_loader_workers_stops_at_the_step_boundary(tmp_path, synthetic_shards):
    """Ctrl+C reaches every process of the terminal's group, the loader workers included, here while the main
    process waits for a batch: the workers stay alive (they leave the signal to the main process), the batch
    arrives, and the run stops after that step."""
    stopped = _killed(tmp_path, synthetic_shards, "ctrl-c-at-step", "3", "data.num_workers=2")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    line = _one_line(stopped.stdout + stopped.stderr, "stopped by")
    step = _load(tmp_path / "checkpoints" / "last.ckpt")["global_step"]
    assert step in (4, 5) and f"stopped by SIGINT at step {step}; checkpoint" in line  # 4 + the step it waited for


def test_a_sigterm_to_rank_0_stops_every_rank_at_the_same_step(tmp_path, synthetic_shards):
    """Two DDP ranks; only rank 0 gets the signal (as after `kill <pid>`): the ranks agree through an all-reduce at
    every step boundary, so rank 1 stops at the same step instead of waiting forever in the next collective."""
    stopped = _killed(tmp_path, synthetic_shards, "sigterm-at-step", "3", "trainer.strategy=ddp", "trainer.devices=2")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    line = _one_line(stopped.stdout + stopped.stderr, "stopped by")  # rank 0's only
    assert "stopped by SIGTERM at step 4; checkpoint" in line
    assert _load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_an_interrupted_recipe_exits_non_zero_and_leaves_its_stage_unfinished(tmp_path, synthetic_shards):
    """Before: status 0 and no done.json, so `&&` chains and workflow engines took the recipe as finished."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - {name: pretrain, overrides: [stage=pretrain]}\n"
                      "  - {name: sft, overrides: [stage=sft]}\n")
    stopped = _killed(tmp_path / "run", synthetic_shards, "sigterm-at-step", "1", f"recipe={recipe}")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    line = _one_line(stopped.stdout + stopped.stderr, "stopped by")
    assert line.endswith(f"to resume, run the same command with hydra.run.dir={tmp_path / 'run'}"), line
    assert _load(tmp_path / "run" / "pretrain" / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not (tmp_path / "run" / "pretrain" / "done.json").exists() and not (tmp_path / "run" / "sft").exists()


def test_a_slurm_requeue_resumes_from_lightnings_requeue_checkpoint(tmp_path, synthetic_shards, straight):
    """SIGUSR1 under SLURM: Lightning writes hpc_ckpt_1.ckpt and requeues (scontrol is faked); the job is then
    killed. Before: `trainer.resume=last` ignored that file and restarted from the older last.ckpt."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    (fake / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "run"
    killed = _killed(run, synthetic_shards, "requeue-at-step", "5", env=slurm)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert _load(run / "hpc_ckpt_1.ckpt")["global_step"] == 5 and _load(run / "checkpoints" / "last.ckpt")["global_step"] == 4

    fit(compose_cfg(run, *SHORT, "trainer.resume=last", shards=synthetic_shards))  # the requeued job
    _assert_same(straight, _trained(run))
    assert not list(run.glob("hpc_ckpt_*"))  # superseded by the final checkpoint


def test_resume_last_picks_the_newest_valid_checkpoint_of_any_kind(tmp_path):
    def checkpoint(path, step):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step, "loops": {}, "optimizer_states": [], "state_dict": {}}, path)

    ckpts = tmp_path / "checkpoints"
    checkpoint(ckpts / "last.ckpt", 4)
    checkpoint(ckpts / "step000004.ckpt", 4)
    checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 3)
    assert newest_checkpoint(tmp_path) == (ckpts / "step000004.ckpt", 4)  # equal steps: the newer file
    checkpoint(tmp_path / "hpc_ckpt_2.ckpt", 6)
    assert newest_checkpoint(tmp_path) == (tmp_path / "hpc_ckpt_2.ckpt", 6)
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes((tmp_path / "hpc_ckpt_2.ckpt").read_bytes()[:200])  # torn
    torch.save({"global_step": 9, "loops": {}, "state_dict": {}}, ckpts / "weights.ckpt")  # weights only
    assert newest_checkpoint(tmp_path) == (tmp_path / "hpc_ckpt_2.ckpt", 6)
    for path in (ckpts / "last.ckpt", ckpts / "step000004.ckpt", tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"):
        path.unlink()
    with pytest.raises(ValueError, match="no checkpoint in .* can be resumed .*hpc_ckpt_3.ckpt"):
        newest_checkpoint(tmp_path)  # not a silent start from step 0
