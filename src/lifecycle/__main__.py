"""`python -m lifecycle stage=... [key=value ...]` or `recipe=<name>`: one Hydra entry point for every stage."""

import logging
import sys

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from .config import CONF_DIR, ConfigError, validate
from .recipes import run_recipe

log = logging.getLogger("lifecycle")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    try:
        if cfg.get("recipe"):
            result = run_recipe(cfg)
        else:
            cfg = validate(cfg)
            result = get_method(cfg.stage.run)(cfg)
    except ConfigError as e:
        log.error("config error: %s", e)
        sys.exit(2)
    log.info("%s done: %s", f"recipe {cfg.recipe}" if cfg.get("recipe") else cfg.stage.name, result)
    return result


if __name__ == "__main__":
    main()
