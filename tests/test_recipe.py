"""Recipes: stages chained through their exports, finished stages skipped, an interrupted one resumed."""

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from lifecycle.errors import ConfigError
from lifecycle.recipes import _fill, load_recipe, run_recipe

from .helpers import CONF_DIR, TINY

PROMPTS = ["prompts.train=[a large green circle moving right quickly on a black background]",
           "prompts.test=[a large red triangle moving left quickly on a black background]"]


def _recipe(tmp_path, shards):
    common = [*TINY, f"data.shards={shards}", "data.generate=null", "data.num_workers=0", *PROMPTS]
    denoise = ["stage.curriculum=[{name: a, resolution: 16, frames: 8, batch_size: 4, steps: 2}]",
               "stage.validation.prompts.n=2", "stage.validation.num_steps=2"]
    recipe = {"overrides": common, "stages": [
        {"name": "pretrain", "overrides": ["stage=pretrain", *denoise]},
        {"name": "sft", "overrides": ["stage=sft", *denoise]},
        {"name": "vader", "overrides": ["stage=vader", "stage.steps=2", "stage.batch_size=1", "stage.sampling.num_steps=2",
                                        "stage.evaluation.num_steps=2", "stage.evaluation.batch_size=2",
                                        "trainer.checkpoint_every_n_steps=1", "reward=vivid"]},
    ]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _run(path, run_dir):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={path}", f"run_dir={run_dir}"])
        return run_recipe(cfg)


@pytest.mark.faults
def test_recipe_chains_exports_skips_finished_stages_and_resumes(tmp_path, synthetic_shards, monkeypatch):
    from lifecycle.stages.vader import VaderStage

    path, run = _recipe(tmp_path, synthetic_shards), tmp_path / "run"
    original = VaderStage.training_step

    def preempted(self, batch, batch_idx):
        if self.global_step == 1:
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(VaderStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        _run(path, run)
    assert (run / "pretrain" / "done.json").is_file() and (run / "sft" / "done.json").is_file()
    assert not (run / "vader" / "done.json").exists() and (run / "vader" / "checkpoints" / "last.ckpt").is_file()
    finished = {n: (run / n / "export" / "model_index.json").stat().st_mtime for n in ("pretrain", "sft")}

    monkeypatch.setattr(VaderStage, "training_step", original)
    summary = _run(path, run)
    assert summary["stages"]["vader"]["steps"] == 2
    assert {n: (run / n / "export" / "model_index.json").stat().st_mtime for n in finished} == finished  # not redone
    lineage = {n: json.loads((run / n / "export" / "lineage.json").read_text()) for n in ("pretrain", "sft", "vader")}
    assert lineage["pretrain"]["parent"] is None
    assert lineage["sft"]["parent"] == str(run / "pretrain" / "export")
    assert lineage["vader"]["parent"] == str(run / "sft" / "export")
    assert all(entry["recipe"] == path for entry in lineage.values())
    assert all(entry["stage"] == n and entry["data"] and entry["config"]["stage"]["name"] == n
               for n, entry in lineage.items())


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="refers to stage 'later' before it has run"):
        _fill("stage.pairs={run:later}/pairs", {"a": tmp_path})
    assert _fill("stage.pairs={run:a}/pairs", {"a": tmp_path}) == f"stage.pairs={tmp_path}/pairs"
    dup = tmp_path / "dup.yaml"
    dup.write_text(yaml.safe_dump({"stages": [{"name": "a", "overrides": ["stage=pretrain"]}] * 2}))
    with pytest.raises(ConfigError, match="unique"):
        load_recipe(str(dup))
    assert [s.name for s in load_recipe("tiny").stages][:2] == ["curate", "pretrain"]


def test_recipe_from_the_command_line_passes_user_overrides(tmp_path, synthetic_shards):
    from .test_cli import cli

    recipe = yaml.safe_load(open(_recipe(tmp_path, synthetic_shards)))
    recipe["stages"] = recipe["stages"][:1]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = cli(f"recipe={path}", "seed=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-2000:]
    lineage = json.loads((tmp_path / "run" / "pretrain" / "export" / "lineage.json").read_text())
    assert lineage["config"]["seed"] == 3 and lineage["recipe"] == str(path)
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["stages"]["pretrain"]["steps"] == 2
