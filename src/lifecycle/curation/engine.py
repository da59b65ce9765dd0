"""The Ray side of the data engine: a Ray started by the stage (or a cluster joined) and the pipeline's steps
composed as Ray Data operators - a CPU step as tasks, a model step as an actor pool with its own resources.

Local Ray (`stage.ray.address: null`): `stage.workers` CPUs, no dashboard, a bounded object store (spilling
beyond it), its session folder and logs in the run directory's `ray/`, stopped when the stage ends. (Ray puts
Unix sockets in its session folder, whose paths hold at most 107 bytes: under a longer run directory the
session lives in the system temp folder and its logs are copied to `ray/logs` at the end.) A cluster
(`stage.ray.address: auto` or `ray://<head>:10001`): joined, and left running.
"""

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import ray
import ray.data

log = logging.getLogger(__name__)
# what Ray appends to its folder for its longest socket path (a 7-digit PID at most): the folder's own path may take the
# rest of the 107 bytes a Unix socket path holds
SOCKET_SUFFIX = "/session_2026-12-04_21-31-04_899384_1234567/sockets/plasma_store"
SOCKET_PATH_ROOM = 107 - len(SOCKET_SUFFIX)  # 43


def session_folder(log_dir: Path) -> Path | None:
    """`log_dir` when Ray's socket paths under it fit in 107 bytes, else None (Ray then uses a temp folder)."""
    return log_dir if len(str(log_dir)) <= SOCKET_PATH_ROOM else None


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int, object_store_mb: int, log_dir: Path):
    """Ray for the stage: joins `address`, or starts a local Ray of `cpus` CPUs logging to `log_dir`; stops
    what it started on exit. An already initialised Ray (the caller's own) is used as it is."""
    started, temp = not ray.is_initialized(), None
    if started and address is None:
        log_dir = log_dir.resolve()
        session = session_folder(log_dir) or Path(temp := tempfile.mkdtemp(prefix="ray-"))
        session.mkdir(parents=True, exist_ok=True)
        log.info("curate: a local Ray of %d CPUs (logs: %s)", cpus, log_dir)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user Ray: no token to set up
        os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default, 15, starves the steps on a busy machine
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
                 _temp_dir=str(session), log_to_driver=False, logging_level=logging.WARNING)
    elif started:
        log.info("curate: joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results come back in input order: units are written as they end
    ctx.enable_progress_bars = False  # the stage shows one bar of units written instead
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        if temp is not None:
            if (logs := Path(temp) / "session_latest" / "logs").is_dir():
                shutil.copytree(logs, log_dir / "logs", dirs_exist_ok=True)
            shutil.rmtree(temp, ignore_errors=True)


def add_step(ds: ray.data.Dataset, fn, batch_size: int, actor: dict | None = None, **kwargs) -> ray.data.Dataset:
    """`ds` with `fn` applied to batches of `batch_size` rows: as tasks of one CPU when `actor` is None, else
    `fn` is a class built once per actor of a pool of `actor.actors`, each holding `actor.num_cpus` CPUs and
    `actor.num_gpus` GPUs, called on `actor.batch_size` rows. `kwargs`: the function's or constructor's."""
    if actor is None:
        return ds.map_batches(fn, batch_size=batch_size, fn_kwargs=kwargs, num_cpus=1)
    return ds.map_batches(fn, batch_size=actor["batch_size"], fn_constructor_kwargs=kwargs,
                          compute=ray.data.ActorPoolStrategy(size=actor["actors"]), num_cpus=actor["num_cpus"],
                          num_gpus=actor["num_gpus"])
