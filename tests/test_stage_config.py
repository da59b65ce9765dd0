"""A stage is one module: conf/stage/<name>.yaml's `run` names `lifecycle.stages.<name>.run`, whose module holds the
stage's Config; its yaml and its Config never disagree on a default; what a Config declares drives the checks every
stage of that kind gets, for a stage outside the package too."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import MISSING, DictConfig, OmegaConf

from lifecycle.config import stage_config
from lifecycle.errors import ConfigError
from lifecycle.rewards import Reward
from lifecycle.stages.base import AlignmentConfig, StageConfig

from .helpers import CONF_DIR, compose_cfg

STAGES = sorted(p.stem for p in (Path(CONF_DIR) / "stage").glob("*.yaml"))


@pytest.fixture(scope="module")
def composed():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return {name: compose("config", overrides=[f"stage={name}"]) for name in STAGES}


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_lives_in_its_own_module(composed, name):
    stage = composed[name].stage
    assert stage.name == name and stage.run == f"lifecycle.stages.{name}.run"
    config = stage_config(stage)
    assert issubclass(config, StageConfig)


def disagreements(default, value, key="stage"):
    """Keys where the dataclass default and the yaml both give a value, and differ."""
    if isinstance(default, dict) and isinstance(value, dict):
        return [d for k in default.keys() & value.keys() for d in disagreements(default[k], value[k], f"{key}.{k}")]
    return [] if default == MISSING or default == value else [(key, default, value)]


@pytest.mark.parametrize("name", STAGES)
def test_one_set_of_defaults(composed, name):
    stage = composed[name].stage
    default = OmegaConf.to_container(OmegaConf.structured(stage_config(stage)), resolve=False)
    assert disagreements(default, OmegaConf.to_container(stage, resolve=False)) == []


class Judge(Reward):
    """A reward without gradients."""

    differentiable = False


@dataclass
class Config(AlignmentConfig):
    """An alignment stage declared outside the package: its `run` is this module's."""

    steps: int = MISSING

    backprop_through_reward: ClassVar[bool] = True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        super().check(cfg)
        if cfg.stage.steps > 1000:
            raise ConfigError(f"stage.steps: at most 1000, got {cfg.stage.steps}")


def run(cfg: DictConfig) -> dict:
    return {}


def outside(tmp_path, *overrides):
    """The validated config of a run of this module's stage: the VADER stage file's values for the keys it has."""
    from lifecycle.config import validate

    from .helpers import TINY

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={tmp_path}", *TINY, "stage=vader", *overrides])
    keys = OmegaConf.structured(Config).keys()
    cfg.stage = OmegaConf.create({k: v for k, v in cfg.stage.items() if k in keys} | {"run": f"{__name__}.run"})
    return validate(cfg)


def test_a_stage_outside_the_package_gets_its_own_and_its_kinds_checks(tmp_path):
    cfg = outside(tmp_path)
    assert stage_config(cfg.stage) is Config and cfg.stage.steps == 60
    with pytest.raises(ConfigError, match="stage.steps: at most 1000, got 5000"):
        outside(tmp_path, "stage.steps=5000")  # its own check
    with pytest.raises(ConfigError, match="stage.frames: must be positive"):
        outside(tmp_path, "stage.frames=0")  # the alignment base's
    with pytest.raises(ConfigError, match="reward.judge: .*Judge is not differentiable"):
        outside(tmp_path, f"+reward.judge={{_target_:{__name__}.Judge}}")  # its declared kind's
    with pytest.raises(ConfigError, match="stage.run: cannot import 'no.such'"):
        compose_cfg(tmp_path, "stage.run=no.such.run")
