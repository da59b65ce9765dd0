"""`run_stage`: how a composed config becomes a stage run, the one path `python -m lifecycle`, every recipe stage
and the benches take."""

from collections.abc import Callable

from hydra.utils import get_method
from omegaconf import DictConfig

from .config import validate
from .outputs import configure as configure_outputs
from .secrets import protect


def run_stage(cfg: DictConfig, on_start: Callable[[DictConfig], None] | None = None) -> dict:
    """Mask the config's secrets in every log (and in Hydra's records of the run), validate it (ConfigError on the
    first bad key), set the output policy (watermark, content filter, provenance) from it and run `stage.run`.
    `on_start(cfg)` is called with the validated config just before the stage starts. Returns the stage's result."""
    protect(cfg)
    cfg = validate(cfg)
    configure_outputs(cfg)
    if on_start is not None:
        on_start(cfg)
    return get_method(cfg.stage.run)(cfg)
