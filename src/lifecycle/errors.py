"""The project's error types, on the ground floor: every module may raise them, `__main__` maps them to exit
statuses (2: a configuration error; 1: a run that stopped itself)."""


class ConfigError(ValueError):
    """A configuration problem, reported as `key: what is wrong`."""


class DataError(RuntimeError):
    """The data cannot feed the run (reads keep failing, or a pass over the shards reads nothing): stop, not spin."""


class DivergenceError(RuntimeError):
    """Raised when the loss guard is set to stop; the last good checkpoint is left untouched."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one at that path (if any) is intact."""
