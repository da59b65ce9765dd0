"""`python -m lifecycle stage=... [key=value ...]` or `recipe=<name>`: one Hydra entry point for every stage."""

import logging
import sys

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from .checkpointing import CheckpointWriteError
from .config import CONF_DIR, ConfigError, validate
from .outputs import configure as configure_outputs
from .recipes import run_recipe
from .secrets import protect
from .stages.guard import DivergenceError

log = logging.getLogger("lifecycle")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    protect(cfg)  # before anything is logged: secrets masked in logs and in .hydra/*.yaml
    try:
        if cfg.get("recipe"):
            result = run_recipe(cfg)
        else:
            cfg = validate(cfg)
            configure_outputs(cfg)
            result = get_method(cfg.stage.run)(cfg)
    except ConfigError as e:
        log.error("config error: %s", e)
        sys.exit(2)
    except (DivergenceError, CheckpointWriteError) as e:  # the run stopped itself; its last checkpoint is intact
        log.error("stopped: %s", e)
        sys.exit(1)
    log.info("%s done: %s", f"recipe {cfg.recipe}" if cfg.get("recipe") else cfg.stage.name, result)
    return result


if __name__ == "__main__":
    main()
