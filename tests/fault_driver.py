"""`python tests/fault_driver.py <fault> <n> [overrides]`: `python -m lifecycle [overrides]` that signals itself.

- `kill-at-step n`: SIGKILL as the training step after optimizer step n begins;
- `kill-in-checkpoint-write n`: SIGKILL halfway through writing the n-th checkpoint file (its first half on disk);
- `sigterm-at-step n`, `sigint-at-step n`: that signal to rank 0 as the training step after optimizer step n begins;
- `ctrl-c-at-step n`: SIGINT to the whole process group half a second after step n + 1 begins, with loader workers
  that take a second per batch (the test starts the driver in a process group of its own);
- `requeue-at-step n`: SIGUSR1 (SLURM's warning before a time limit or preemption; the test sets SLURM's
  environment) as step n + 1 begins, then, once Lightning has written its requeue checkpoint, SIGKILL.

SIGKILL cannot be caught: no exception handler, `finally` or Lightning teardown runs, as on a preempted node.
"""

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(n: int) -> None:
    from lifecycle.stages.pretrain import DenoiseStage

    original = DenoiseStage.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == n:
            die()
        return original(self, batch, batch_idx)

    DenoiseStage.training_step = training_step


def signal_at_step(n: int, signum: int, group: bool = False) -> None:
    from lifecycle.stages.pretrain import DenoiseStage

    original = DenoiseStage.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == n and self.global_rank == 0 and not getattr(self, "_signalled", False):
            self._signalled = True  # once (the step is done again after a resume); rank 0 only: the others must follow
            if group:  # as Ctrl+C in a terminal: every process of the group, loader workers included, a little later
                threading.Timer(0.5, os.killpg, (os.getpgrp(), signum)).start()  # while waiting for a batch
            else:
                os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    DenoiseStage.training_step = training_step
    if group:
        slow_data()


def slow_data() -> None:
    """Loader workers that take a second per batch: the main process spends its time waiting for them."""
    from lifecycle.data.shards import CurriculumStream

    original = CurriculumStream.__iter__

    def slow(self):
        for batch in original(self):
            time.sleep(1.0)
            yield batch

    CurriculumStream.__iter__ = slow


def requeue_at_step(n: int) -> None:
    from lifecycle.stages.pretrain import DenoiseStage

    original = DenoiseStage.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == n:
            os.kill(os.getpid(), signal.SIGUSR1)
            while not list(Path(self.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")):
                time.sleep(0.01)  # Lightning's handler writes it
            die()
        return original(self, batch, batch_idx)

    DenoiseStage.training_step = training_step


def kill_in_checkpoint_write(n: int) -> None:
    real_save, writes = torch.save, []

    def save(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith(".ckpt.tmp"):  # a checkpoint file being written
            writes.append(f.name)
            if len(writes) == n:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    if "LIFECYCLE_FAULT" not in os.environ:  # the ranks Lightning launches run this file again, and inherit it
        os.environ["LIFECYCLE_FAULT"] = " ".join(sys.argv[1:3])
        del sys.argv[1:3]
    fault, n = os.environ["LIFECYCLE_FAULT"].split()
    {"kill-at-step": kill_at_step, "kill-in-checkpoint-write": kill_in_checkpoint_write,
     "sigterm-at-step": lambda n: signal_at_step(n, signal.SIGTERM),
     "sigint-at-step": lambda n: signal_at_step(n, signal.SIGINT),
     "ctrl-c-at-step": lambda n: signal_at_step(n, signal.SIGINT, group=True),
     "requeue-at-step": requeue_at_step}[fault](int(n))
    from lifecycle.__main__ import main

    main()
