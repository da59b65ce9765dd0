"""`make gpu-check --dry-run`: the GPU check's every section on the CPU at tiny shapes (its wiring, before any GPU
call), the real recipes composing, and where stages evaluate."""

import json
import os
import re
import subprocess
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lifecycle.bench.gpu_check import REAL
from lifecycle.config import validate
from lifecycle.recipes import RECIPES_DIR, load_recipe
from lifecycle.stages.runner import stage_device

from .helpers import CONF_DIR

REAL_RECIPES = ["modelscope_vader", "svd_vader_long", "sd15_dpo", "sd15_ddpo", "wan_lora", "wan_grpo"]
ENV = ("PICKAPIC_PAIRS", "SVD_IMAGES", "WAN_VIDEOS", "WAN_PAIRS")  # the recipes' data a user brings: folders


def test_every_real_recipe_exists_and_each_stage_composes(tmp_path, monkeypatch):
    """Every stage of every real recipe composes with the recipe's overrides (a renamed or misspelt key fails here);
    each recipe's first stage also passes the start-up checks, given its data folders."""
    for key in ENV:
        (tmp_path / key).mkdir()
        (tmp_path / key / "000000.tar").touch()
        monkeypatch.setenv(key, str(tmp_path / key))
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} >= set(REAL_RECIPES)
    assert set(REAL) <= set(REAL_RECIPES)
    for name in REAL_RECIPES:
        recipe = load_recipe(name)
        for i, s in enumerate(recipe.stages):
            overrides = [re.sub(r"\{run:([\w-]+)\}", str(tmp_path / name / r"\1"), o)
                         for o in [*recipe.overrides, *s.overrides]]
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=[f"run_dir={tmp_path / name / s.name}", *overrides])
            assert cfg.model.pretrained, f"{name}/{s.name}: a real recipe names its hub model"
            OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            if i == 0:
                validate(cfg)


def test_stage_device_is_the_trainers_or_this_ranks_gpu(monkeypatch):
    cfg = OmegaConf.create({"trainer": {"accelerator": "gpu"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert stage_device(cfg) == torch.device("cuda", 3)
    cfg.trainer.accelerator = "cpu"
    assert stage_device(cfg) == torch.device("cpu")

    class Trainer:  # after fit: wherever the strategy trained, not where Lightning's teardown left the module
        class strategy:
            root_device = torch.device("cuda", 1)

    assert stage_device(cfg, Trainer()) == torch.device("cuda", 1)


def dry_run(tmp_path, section: str) -> tuple[dict, str]:
    """`gpu_check --dry-run --sections <section>`: that section's report entry and the markdown report."""
    recipe = tmp_path / "one_stage.yaml"  # the smoke section's wiring on one short stage (make smoke runs them all)
    recipe.write_text(json.dumps({"stages": [{"name": "pretrain", "overrides": [
        "stage=pretrain", "model.text_encoder.config.num_hidden_layers=1",
        "stage.curriculum=[{name: a, resolution: 16, frames: 8, batch_size: 4, steps: 2}]",
        "stage.validation.prompts.n=2", "stage.validation.num_steps=2", f"data.shards={tmp_path / 'shards'}",
        "data.generate.num_clips=32", "data.generate.clips_per_shard=16"]}]}))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lifecycle.bench.gpu_check", "--dry-run", "--out", str(out),
                           "--smoke-recipe", str(recipe), "--sections", section], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert list(report["sections"]) == [section]
    return report["sections"][section], (out / "gpu-check.md").read_text()


def test_dry_run_smoke(tmp_path):
    sec, text = dry_run(tmp_path, "smoke")
    assert [r["stage"] for r in sec["stages"]] == ["pretrain"] and "| pretrain |" in text


def test_dry_run_fsdp_kill_and_resume(tmp_path):
    fsdp, text = dry_run(tmp_path, "fsdp")  # killed after the step-10 checkpoint, resumed: the same curve, exactly
    assert fsdp["steps"] == 20 and fsdp["max_relative_loss_difference"] == 0.0
    # every step from the step-10 checkpoint on was logged again; the row of the step that ended as the checkpoint
    # was written (9) can be lost with the process (the CSV logger flushes at checkpoints, not after every row)
    assert set(fsdp["steps_missing_from_the_resumed_log"]) <= {9}
    assert fsdp["last_step_logged_before_the_kill"] < 19
    assert "__0_0.distcp" in fsdp["checkpoint_files"] and "## fsdp" in text


def test_dry_run_real_recipes(tmp_path):
    sec, text = dry_run(tmp_path, "real")
    rows = {r["recipe"]: r for r in sec["rows"]}
    assert set(rows) == set(REAL)
    for name, row in rows.items():
        assert "error" not in row and row["seconds_per_step"] > 0 and row["optimizer_steps"] >= 2, name
    assert rows["modelscope_vader"]["keys"]["decode_frames"] == 2  # the recipe's memory keys reached the stage
    assert rows["modelscope_vader"]["keys"]["memory.frozen_dtype"] == "bf16"
    assert rows["svd_vader_long"]["keys"]["memory.offload_activations"] is True
    assert "| modelscope_vader | vader | 4 x 32 |" in text
    assert rows["wan_grpo"]["stage"] == "grpo" and rows["wan_grpo"]["keys"]["lora.rank"] == 32  # the recipe's LoRA


def test_dry_run_bench(tmp_path):
    sec, text = dry_run(tmp_path, "bench")
    assert [r["loop"] for r in sec["rows"]] == ["plain", "lifecycle"] and "speed ratio" in text


def test_hub_kernels_are_off_unless_asked_for():
    """transformers would otherwise fetch layer kernels (code) from the hub in every from_pretrained; on the GPU
    machine, without the `kernels` package, every transformers model failed to load."""
    from transformers.integrations.hub_kernels import _kernels_enabled

    assert os.environ["USE_HUB_KERNELS"] == "0" and not _kernels_enabled()
