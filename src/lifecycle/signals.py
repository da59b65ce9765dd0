"""SIGTERM and SIGINT stop a training run at the next step boundary, with a checkpoint and a non-zero status.

SIGTERM is what SLURM preemption and time limits, `kill`, `docker stop` and Kubernetes send; SIGINT is Ctrl+C.
Lightning's own SIGTERM handling raises `SIGTERMException`, a `SystemExit` without a code: the process ended
with status 0, no checkpoint and no message, and a recipe went on as if the stage had succeeded. Ctrl+C became
a `KeyboardInterrupt` wherever it landed, possibly halfway through an optimizer step.

`StopOnSignal` records the signal in its handler and acts on it in `on_train_batch_end`, where the step is
complete (Lightning's own step checkpoints are written at the same point): the ranks agree through
`Strategy.reduce_boolean_decision` (a signal to any rank stops all of them, at the same step), every rank
writes `last.ckpt` through `trainer.save_checkpoint`, and `Interrupted` ends `trainer.fit`.
`python -m lifecycle` turns it into one line and exit status 128 + the signal's number (143 for SIGTERM,
130 for SIGINT), as a shell reports a process killed by that signal.

SIGUSR1 under SLURM is left to Lightning's `SLURMEnvironment` auto-requeue (it writes `hpc_ckpt_<n>.ckpt` in the
run directory and requeues the job); `trainer.resume=last` picks the newest valid checkpoint of any kind
(`lifecycle.checkpointing.newest_checkpoint`).
"""

import signal
import threading

import lightning as L

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Training stopped on a signal at a step boundary, with a checkpoint of that step."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def worker_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a worker ignores SIGINT and dies of SIGTERM, whatever it inherited.

    Workers are forked while `StopOnSignal`'s handlers are in place, and would inherit them: a worker that records
    SIGTERM instead of dying cannot be stopped by `multiprocessing`'s terminate() at exit, and the process hangs.
    Ctrl+C reaches every process of the terminal's group; the main process ends its workers itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class StopOnSignal(L.Callback):
    """Checkpoint to `checkpoint` and raise `Interrupted` at the first step boundary after SIGTERM or SIGINT.

    A second SIGINT while waiting for the boundary interrupts at once (the default handler is back).
    """

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_start(self, trainer, pl_module) -> None:
        """After Lightning registered its own handlers (in `Trainer.fit`), which this replaces while training."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = self.signum is not None or trainer.received_sigterm  # Lightning's flag: a SIGTERM before training
        if not trainer.strategy.reduce_boolean_decision(received, all=False):
            return
        signum = self.signum or signal.SIGTERM  # a rank told by another one stops as that one does
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        raise Interrupted(signum, trainer.global_step, self.checkpoint)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
