"""The real models' configs (conf/model/{modelscope_t2v,sd15,svd_xt,wan2_1_t2v_1_3b}.yaml): every key reaches the
class it configures (diffusers drops an unknown key with a warning only), at real size and as a miniature saved and
loaded back through `from_pretrained` as the hub folder would be."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lifecycle.data.preferences import write_pairs
from lifecycle.data.raw_world import write_raw
from lifecycle.models import ModelBundle
from lifecycle.models.stand_ins import MINIATURES, REWARD_KEYS, model_config, model_folder, recipe_rewards, \
    reward_folder
from lifecycle.recipes import load_recipe

from .test_dpo import colour_pairs

PARTS = ("denoiser", "vae", "scheduler", "text_encoder", "image_encoder")


def settings(cfg) -> dict[str, dict]:
    """{part: {key: value}} as the yaml states them (a transformers part's keys are those of its `config`)."""
    out = {}
    for part in PARTS:
        node = cfg.get(part)
        if node is None:
            continue
        node = node.config if "config" in node else node
        out[part] = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    return out


def loaded(module, key):
    config = module.config
    value = config[key] if isinstance(config, dict) else getattr(config, key)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", list(MINIATURES))
def test_every_key_of_the_real_config_reaches_its_class(name):
    cfg = model_config(name)
    with torch.device("meta"):  # real size, nothing allocated
        parts = {p: instantiate(cfg[p], _convert_="all") for p in PARTS if cfg.get(p) and p != "scheduler"}
    parts["scheduler"] = instantiate(cfg.scheduler, _convert_="all")
    for part, keys in settings(cfg).items():
        config = parts[part].config
        # transformers configs keep any keyword as an attribute: a misspelt key must not pass as "set"
        known = None if isinstance(config, dict) else type(config)().to_dict()
        for key, value in keys.items():
            assert known is None or key in known, f"model={name}: {part}.config.{key} is no {type(config).__name__} key"
            assert loaded(parts[part], key) == value, f"model={name}: {part}.{key}"


@pytest.mark.parametrize("name", list(MINIATURES))
def test_miniature_saves_and_loads_as_a_hub_folder(name, tmp_path):
    folder = model_folder(name, tmp_path / name)
    bundle = ModelBundle.from_pretrained(str(folder))
    cfg = model_config(name, miniature=True)
    modules = {"denoiser": bundle.denoiser, "vae": bundle.vae, "scheduler": bundle.scheduler,
               "text_encoder": bundle.text_encoder, "image_encoder": bundle.image_encoder}
    for part, keys in settings(cfg).items():
        for key, value in keys.items():
            assert loaded(modules[part], key) == value, f"model={name}: {part}.{key} after from_pretrained"
    assert (folder / "model_index.json").is_file() and (folder / bundle.denoiser_folder).is_dir()


# -- whole recipes as miniatures -------------------------------------------------------------------
# One set of reductions per stage kind (frames, pixels, steps); everything else is the recipe's own.
SHRINK = {
    "curate": ["stage.unit_size=64"],
    "latent_cache": ["stage.frames=5", "stage.resolution=32", "stage.batch_size=8"],
    "sft": ["stage.curriculum=[{name: sft, resolution: 32, frames: 5, batch_size: 2, steps: 2}]",
            "stage.validation.prompts.n=2", "stage.validation.num_steps=2", "stage.validation.batch_size=2"],
    "dpo": ["stage.frames=5", "stage.resolution=32", "stage.steps=2", "stage.accumulate=1", "stage.evaluation.num_steps=2"],
    "grpo": ["stage.frames=5", "stage.resolution=32", "stage.epochs=1", "stage.sample.num_steps=2",
             "stage.evaluation.num_steps=2"],
    "eval": ["stage.frames=5", "stage.resolution=32", "stage.evaluation.num_steps=2", "stage.metrics=false"],
}
CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
       "prompts.train=[a cat playing the piano,a dog riding a bicycle]", "prompts.test=[a koala drinking coffee]"]


def miniature_recipe(name: str, out: Path) -> Path:
    """recipes/<name>.yaml with each stage's SHRINK overrides appended (nothing else changed)."""
    recipe = OmegaConf.to_container(load_recipe(name), resolve=False)
    for s in recipe["stages"]:
        kind = next(o.split("=", 1)[1] for o in s["overrides"] if o.startswith("stage="))
        image = "stage.frames=1" in s["overrides"]  # an image model keeps its one frame
        s["overrides"] += [o for o in SHRINK[kind] if not (image and o.startswith("stage.frames="))]
    OmegaConf.save(OmegaConf.create(recipe), out)
    return out


def run_miniature(name: str, tmp_path: Path, *overrides: str, env: dict) -> dict:
    """The miniature recipe on the CPU, its model and reward backbones random stand-ins at miniature width."""
    recipe = load_recipe(name).overrides
    model = next(o.split("=", 1)[1] for o in recipe if o.startswith("model="))
    # the recipe's reward selection again on the command line, so that its keys exist there
    rewards = [*(o for o in recipe if o.startswith("reward=")),
               *(f"{REWARD_KEYS[r]}={reward_folder(r, tmp_path / r)}" for r in recipe_rewards(recipe))]
    done = subprocess.run(
        [sys.executable, "-m", "lifecycle", f"recipe={miniature_recipe(name, tmp_path / f'{name}.yaml')}",
         f"hydra.run.dir={tmp_path / 'run'}", f"model.pretrained={model_folder(model, tmp_path / model)}",
         *rewards, *CPU, *overrides],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((tmp_path / "run" / "recipe.json").read_text())


def test_sd15_dpo_recipe_runs_as_a_miniature(tmp_path):
    write_pairs(tmp_path / "pairs", colour_pairs(4, frames=1, size=32), manifest={"reward": "colour"})
    result = run_miniature("sd15_dpo", tmp_path, env={"PICKAPIC_PAIRS": str(tmp_path / "pairs")})
    assert result["stages"]["dpo"]["steps"] == 2
    assert (tmp_path / "run" / "dpo" / "export" / "unet" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "dpo" / "export" / "lora_formats" / "formats.json").read_text())["kohya"]["keys"]


def test_wan_lora_recipe_runs_as_a_miniature(tmp_path):
    """curate -> latent cache -> LoRA SFT -> flow Diffusion-DPO -> eval on a miniature Wan2.1 (FSDP2, one process)."""
    write_raw(tmp_path / "raw", num_clips=48, frames=8, size=32, progress=False)
    write_pairs(tmp_path / "pairs", colour_pairs(4, frames=5, size=32), manifest={"reward": "colour"})
    result = run_miniature("wan_lora", tmp_path, env={"WAN_VIDEOS": str(tmp_path / "raw" / "media"),
                                                      "WAN_PAIRS": str(tmp_path / "pairs")})
    assert list(result["stages"]) == ["curate", "latent_cache", "sft", "dpo", "eval"]
    assert result["stages"]["sft"]["steps"] == 2 and result["stages"]["dpo"]["steps"] == 2
    lineage = json.loads((tmp_path / "run" / "dpo" / "export" / "lineage.json").read_text())
    assert "sft" in json.dumps(lineage)  # DPO started from the SFT export
    for stage in ("sft", "dpo"):  # FSDP2 gathered the LoRA for the ComfyUI file
        manifest = json.loads((tmp_path / "run" / stage / "export" / "lora_formats" / "formats.json").read_text())
        assert manifest["comfyui"]["modules_written"] == manifest["comfyui"]["modules_trained"] > 0


def test_wan_grpo_recipe_runs_as_a_miniature(tmp_path):
    """LoRA GRPO with weighted HPS + CLIP-score advantages per term -> eval on a miniature Wan2.1 (FSDP2, one
    process): groups of the recipe's size, its two updates an epoch, both reward terms in the tables."""
    result = run_miniature("wan_grpo", tmp_path, env={})
    assert list(result["stages"]) == ["grpo", "eval"]
    grpo = result["stages"]["grpo"]
    assert grpo["steps"] == 2 and grpo["epochs"] == 1 and grpo["reward_queries"] == 12  # one group of 12
    assert "after/train/reward" in grpo
    for prompts in ("train", "test"):  # the recipe's weights: HPS : CLIP score = 0.7 : 1.4
        row = result["stages"]["eval"]["grpo"][prompts]
        assert row["reward"] == pytest.approx(0.7 * row["reward/hps"] + 1.4 * row["reward/clip_score"], rel=1e-5)
    lineage = json.loads((tmp_path / "run" / "grpo" / "export" / "lineage.json").read_text())
    assert lineage["reward_queries"] == 12 and lineage["config"]["stage"]["per_term_advantages"] is True
    manifest = json.loads((tmp_path / "run" / "grpo" / "export" / "lora_formats" / "formats.json").read_text())
    # to_q, to_k, to_v, to_out.0 of the self- and the cross-attention of the one block
    assert manifest["comfyui"]["modules_written"] == manifest["comfyui"]["modules_trained"] == 8
