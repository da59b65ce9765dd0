"""`stage=synthetic`: write the configured dataset's shards (`data.generate`) and stop."""

from dataclasses import dataclass

from hydra.utils import instantiate
from omegaconf import DictConfig

from ..errors import ConfigError
from .base import StageConfig


@dataclass
class Config(StageConfig):
    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        if cfg.data.get("generate") is None:
            raise ConfigError("data.generate: this data config has no generator to run")


def run(cfg: DictConfig) -> dict:
    """Write the shards (a no-op when they exist)."""
    return {"shards": len(instantiate(cfg.data.generate))}
