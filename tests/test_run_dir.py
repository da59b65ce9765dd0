"""One owner per run directory: a lock, no silent overwrite of a finished run, export replacement that keeps the
old export until the new one is in, output files that honour the umask."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.data.video_io import write_atomically
from lifecycle.rundir import RunDirLock, claim, recover_export
from lifecycle.stages.pretrain import run as fit
from lifecycle.stages.runner import export

from .helpers import TINY, compose_cfg

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SHORT = ["stage.curriculum=[{name:low,resolution:16,frames:8,batch_size:4,steps:4}]", "stage.validation.num_steps=2",
         "stage.validation.prompts.n=2", "trainer.checkpoint_every_n_steps=2",
         "trainer.enable_progress_bar=false", "data.num_workers=0"]


def _cli(run_dir, *overrides: str, shards) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    began = time.time()
    done = subprocess.run([sys.executable, "-m", "lifecycle", *TINY, *SHORT, f"data.shards={shards}",
                           "data.generate=null", f"hydra.run.dir={run_dir}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, time.time() - began


def _error_line(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if "config error:" in line]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def test_a_second_run_on_a_live_run_directory_is_refused_in_one_line(tmp_path, synthetic_shards):
    """Before: both runs trained, then both crashed in the CSV logger, and neither exported."""
    run = tmp_path / "run"
    live = RunDirLock(run)  # a run in progress (this process) holds the directory
    try:
        done, _ = _cli(run, shards=synthetic_shards)
    finally:
        live.release()
    assert _error_line(done).endswith(f"config error: run_dir: {run} is in use by a running run (pid {os.getpid()} "
                                      f"on {socket.gethostname()}); wait for it to end, or choose another hydra.run.dir")
    assert not (run / "checkpoints").exists()


def test_a_stale_lock_from_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / ".lock").write_text("pid 999999 on gone-host\n")  # its holder was SIGKILLed: the flock went with it
    lock = RunDirLock(tmp_path)
    assert "taking over" in caplog.text and "pid 999999 on gone-host" in caplog.text
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    with pytest.raises(ConfigError, match="is in use by a running run"):
        RunDirLock(tmp_path)  # held now, even against another open of the file
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # a clean end leaves no holder to take over
    RunDirLock(tmp_path).release()


def _finished(run_dir: Path) -> None:
    """What an earlier, longer run left: an export, its last and step checkpoints, a requeue checkpoint."""
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "model_index.json").write_text("{}")
    (run_dir / "checkpoints").mkdir()
    for name in ("last.ckpt", "step000010.ckpt"):
        torch.save({"global_step": 10}, run_dir / "checkpoints" / name)
    torch.save({"global_step": 10}, run_dir / "hpc_ckpt_1.ckpt")


def test_rerunning_a_finished_directory_is_refused_unless_overwrite(tmp_path, synthetic_shards):
    """Before: the export, metrics and last.ckpt were silently replaced, and last-v1.ckpt and the stale step
    checkpoints were left beside the new ones."""
    run = tmp_path / "run"
    _finished(run)
    done, _ = _cli(run, shards=synthetic_shards)
    assert _error_line(done).endswith(f"config error: run_dir: {run} already holds a run (export, "
                                      f"checkpoints/last.ckpt); continue it with trainer.resume=last, or replace "
                                      f"it with overwrite=true")
    assert (run / "export" / "model_index.json").read_text() == "{}"

    cfg = compose_cfg(run, *SHORT, "overwrite=true", shards=synthetic_shards)
    with pytest.raises(ConfigError, match="overwrite: true starts the run over; it cannot be combined"):
        claim(compose_cfg(run, *SHORT, "overwrite=true", "trainer.resume=last", shards=synthetic_shards))
    with pytest.raises(ConfigError, match="overwrite: a recipe continues its run directory"):
        claim(compose_cfg(run, "overwrite=true", "recipe=tiny"))
    claim(cfg).release()
    assert fit(cfg)["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step000004.ckpt"]
    assert not list(run.glob("hpc_ckpt_*"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (run / "export" / "model_index.json").read_text() != "{}"  # the new export


class Bundle:
    def __init__(self, tag: str):
        self.tag = tag

    def save_pretrained(self, path: Path, lineage: dict, lora: str) -> None:
        path.mkdir()
        (path / "model_index.json").write_text(self.tag)


def test_replacing_an_export_keeps_the_old_one_until_the_new_one_is_in(tmp_path, monkeypatch):
    """Before: the old export was deleted before the new one was renamed in; a kill in between left none."""
    path = tmp_path / "export"
    export(Bundle("old"), path, {})
    export(Bundle("new"), path, {})
    assert (path / "model_index.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["export"]

    real_rename = Path.rename

    def killed_before_the_new_one_is_in(self, target):
        if self.name == ".export.tmp":
            raise KeyboardInterrupt  # the process dies between the two renames
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_one_is_in)
    with pytest.raises(KeyboardInterrupt):
        export(Bundle("newer"), path, {})
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not path.exists() and (tmp_path / ".export.old" / "model_index.json").read_text() == "new"
    recover_export(path)  # what the next run on the directory (or the next export) does first
    assert (path / "model_index.json").read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomically_written_files_honour_the_umask(tmp_path, umask):
    """Before: 0600 whatever the umask (mkstemp's mode), so a group could not read a shared run's outputs."""
    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "result.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o666 & ~umask
