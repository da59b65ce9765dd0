"""`python tests/fault_driver.py <fault> <n> [overrides]`: `python -m lifecycle [overrides]` that SIGKILLs itself.

- `kill-at-step n`: as the training step after optimizer step n begins;
- `kill-in-checkpoint-write n`: halfway through writing the n-th checkpoint file (its first half on disk).

SIGKILL cannot be caught: no exception handler, `finally` or Lightning teardown runs, as on a preempted node.
"""

import io
import os
import signal
import sys

import torch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(n: int) -> None:
    from lifecycle.stages.denoise import DenoiseStage

    original = DenoiseStage.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == n:
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
    fault, n, *overrides = sys.argv[1:]
    {"kill-at-step": kill_at_step, "kill-in-checkpoint-write": kill_in_checkpoint_write}[fault](int(n))
    sys.argv = ["lifecycle", *overrides]
    from lifecycle.__main__ import main

    main()
