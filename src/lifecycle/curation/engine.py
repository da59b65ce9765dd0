"""The Ray side of the data engine: a Ray started by the stage (or a cluster joined) and the pipeline's steps
composed as Ray Data operators - a CPU step as tasks, a model step as an actor pool with its own resources.

Local Ray (`stage.ray.address: null`): `stage.workers` CPUs, no dashboard, a bounded object store (spilling
beyond it), its session folder and logs under the run directory's `ray/` (or under the system temp folder
when that path is too long for Ray's sockets), stopped when the stage ends. A cluster
(`stage.ray.address: auto` or `ray://head:10001`): joined, and left running.
"""

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
SOCKET_PATH_ROOM = 60  # Ray puts sockets under its temp folder, and a Unix socket path holds at most 107 bytes


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int, object_store_mb: int, log_dir: Path):
    """Ray for the stage: joins `address`, or starts a local Ray of `cpus` CPUs logging under `log_dir`; stops
    what it started on exit. An already initialised Ray (the caller's own) is used as it is."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, single-user Ray: no token to set up
    started = not ray.is_initialized()
    if started and address is None:
        log_dir = log_dir.resolve()
        if len(str(log_dir)) > SOCKET_PATH_ROOM:
            log_dir = Path(tempfile.mkdtemp(prefix="ray-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log.info("curate: a local Ray of %d CPUs (logs: %s)", cpus, log_dir)
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
                 _temp_dir=str(log_dir), log_to_driver=False, logging_level=logging.WARNING)
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


def add_step(ds, fn, batch_size: int, actor: dict | None = None, **kwargs):
    """`ds` with `fn` applied to batches of `batch_size` rows: as tasks of one CPU when `actor` is None, else
    `fn` is a class built once per actor of a pool of `actor.actors`, each holding `actor.num_cpus` CPUs and
    `actor.num_gpus` GPUs, called on `actor.batch_size` rows. `kwargs`: the function's or constructor's."""
    import ray.data

    if actor is None:
        return ds.map_batches(fn, batch_size=batch_size, fn_kwargs=kwargs, num_cpus=1)
    return ds.map_batches(fn, batch_size=actor["batch_size"], fn_constructor_kwargs=kwargs,
                          compute=ray.data.ActorPoolStrategy(size=actor["actors"]), num_cpus=actor["num_cpus"],
                          num_gpus=actor["num_gpus"])
