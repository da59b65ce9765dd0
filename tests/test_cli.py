"""The Hydra entry point as a user runs it: composition, overrides, errors before compute, multirun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lifecycle.errors import ConfigError

from .helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cfg_job_prints_the_composed_config_with_overrides():
    out = cli("stage=pretrain", "model=tiny_unet3d", "trainer.max_steps=50", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.trainer.max_steps == 50
    assert cfg.model.denoiser._target_ == "diffusers.UNet3DConditionModel"
    assert [p.name for p in cfg.stage.curriculum] == ["low", "full"]
    assert {"stage", "model", "data", "trainer", "logger"} <= set(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+trainer.max_stepz=3", "trainer.max_stepz"),
        ("stage.guard.action=ignore", "stage.guard.action"),
        ("stage.objective.loss_space=x0", "stage.objective.loss_space"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, message):
    # in-process: tests/test_config_errors.py runs the CLI once to show these stop it before compute
    with pytest.raises(ConfigError, match=message):
        compose_cfg(tmp_path, override)


def test_post_training_stages_compose_rewards_and_prompts():
    out = cli("stage=vader", "reward=[vivid,colour]", "reward.colour.weight=0.5", "stage.sampling.grad_steps=2",
              "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert set(cfg.reward) == {"vivid", "colour"} and cfg.reward.colour.weight == 0.5
    assert len(cfg.prompts.train) == len(cfg.prompts.test) == 24
    assert not set(cfg.prompts.train) & set(cfg.prompts.test)  # the test prompts are held out
    assert cfg.stage.sampling.grad_steps == 2
    sft = OmegaConf.create(cli("stage=sft", "--cfg", "job").stdout)
    assert sft.stage.lora.rank == 16 and sft.stage.optimizer.lr < 1e-3 and sft.stage.select.where.background == ["black"]


@pytest.mark.parametrize("override, message", [
    ("stage.sampling.grad_steps=0", "stage.sampling.grad_steps"),
    ("stage.memory.frozen_dtype=int8", "stage.memory.frozen_dtype"),
    ("stage.export=zip", "stage.export"),
])
def test_vader_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        compose_cfg(tmp_path, "stage=vader", override)


def test_unknown_stage_is_named(tmp_path):
    with pytest.raises(Exception, match="stage/nope"):
        compose_cfg(tmp_path, "stage=nope")


def test_frame_count_the_model_cannot_take_is_a_config_error(tmp_path, synthetic_shards):
    from lifecycle.stages.pretrain import run as fit

    cfg = compose_cfg(tmp_path, "stage.curriculum=[{name:a,resolution:16,frames:4,batch_size:2,steps:1}]",
                      shards=synthetic_shards)
    with pytest.raises(ConfigError, match=r"stage.curriculum\[0\].frames"):
        fit(cfg)


def test_multirun_runs_one_job_per_combination_in_its_own_directory(tmp_path):
    out = cli("-m", "stage=synthetic", f"data.shards={tmp_path}/shards_${{data.generate.num_clips}}",
              "data.generate.num_clips=20,30", "data.generate.clips_per_shard=10",
              f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode == 0, out.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((tmp_path / "sweep" / j / ".hydra" / "overrides.yaml").exists() for j in jobs)
    assert len(list((tmp_path / "shards_20").glob("*.tar"))) == 2
    assert len(list((tmp_path / "shards_30").glob("*.tar"))) == 3
