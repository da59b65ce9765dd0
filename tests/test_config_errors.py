"""Bad configuration and input stop a run at start-up, before any model is built, with one line naming the key.

CASES is the README's table of checked cases: (case, overrides, the start of the message). `{empty}`, `{pairs}`,
`{cache}` and `{prompts}` stand for an empty folder, a folder of pair shards, a latent cache and a prompt file
without prompts (the `folders` fixture).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.errors import ConfigError
from lifecycle.rewards import Reward

from .helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
JUDGE = f"+reward.judge={{_target_:{__name__}.Judge}}"


class Judge(Reward):
    """A reward that scores without gradients (a classifier's decision, a human rating)."""

    differentiable = False


CASES = [
    ("unknown top-level key", ["+foo=1"], "foo: unknown top-level key"),
    ("unknown key in a section", ["+model.foo=1"], "model.foo: Key 'foo' not in 'ModelSchema'"),
    ("unknown stage key", ["+stage.foo=1"], "stage.foo: Key 'foo' not in"),
    ("unknown prompt set", ["+prompts.extra=[a]"], "prompts.extra: unknown prompt set"),
    ("unknown reward argument", ["stage=vader", "+reward.colour.foo=1"], "reward.colour.foo: lifecycle.rewards"),
    ("unknown logger argument", ["+logger.csv.foo=1"], "logger.csv.foo: lifecycle.loggers.CSVLogger takes no"),
    ("unknown SFT selection rule", ["stage=sft", "+stage.select.best=3"], "stage.select.best: unknown rule"),
    ("wrong type", ["trainer.max_steps=abc"], "trainer.max_steps: Value 'abc' of type 'str' could not be"),
    ("wrong type", ["stage.optimizer.lr=fast"], "stage.optimizer.lr: Value 'fast'"),
    ("wrong type", ["seed=abc"], "seed: must be an integer"),
    ("wrong type", ["stage=vader", "reward.colour.weight=heavy"], "reward.colour.weight: must be a number"),
    ("value out of range", ["trainer.precision=17"], "trainer.precision: '17' is not one of"),
    ("unimportable class", ["stage=vader", "reward.colour._target_=no.such.Reward"],
     "reward.colour._target_: cannot import 'no.such.Reward'"),
    ("missing required argument", ["stage=vader", "reward=object_removal", "~reward.object_removal.target"],
     "reward.object_removal.target: missing (a required argument of lifecycle.rewards.detector.ObjectReward)"),
    ("missing model folder", ["model.pretrained=/no/such/model"], "model.pretrained: no such folder"),
    ("missing data", ["data.shards=/no/such/shards", "data.generate=null"],
     "data.shards: '/no/such/shards' does not exist"),
    ("missing checkpoint", ["trainer.resume=/no/such.ckpt"], "trainer.resume: no checkpoint"),
    ("missing prompt file", ["stage=vader", "prompts.train=/no/prompts.txt"], "prompts.train: no prompt file"),
    ("missing reward weights", ["stage=vader", "reward=aesthetic", "reward.aesthetic.head=/no/head.pth"],
     "reward.aesthetic.head: no weights file"),
    ("missing reward backbone", ["stage=vader", "reward=object_removal", "reward.object_removal.model=./no/yolos"],
     "reward.object_removal.model: no such folder"),
    ("missing learned reward", ["stage=vader", "reward=learned", "reward.learned.path=/no/export"],
     "reward.learned.path: no such folder"),
    ("missing curation input", ["stage=curate", "stage.input=/no/media", "stage.generate=null"], "stage.input:"),
    ("missing safety classifier", ["stage=curate", "stage/safety=classifier", "stage.safety.model=./no/nsfw"],
     "stage.safety.model: no such folder"),
    ("missing SFT key list", ["stage=sft", "+stage.select.keys=/no/keys.txt"], "stage.select.keys: no key list"),
    ("DPO without preference data", ["stage=dpo"], "stage.pairs: missing value"),
    ("DPO without preference data", ["stage=dpo", "stage.pairs={empty}"], "stage.pairs: no pair shards"),
    ("VADER with a non-differentiable reward", ["stage=vader", JUDGE],
     "reward.judge: tests.test_config_errors.Judge is not differentiable; stage=vader backpropagates"),
    ("DDPO on a flow-matching model", ["stage=ddpo", "model=tiny_wan"], "model: stage=ddpo trains the stochastic DDIM"),
    ("DPO on an image-to-video model", ["stage=dpo", "model=tiny_svd", "stage.pairs={pairs}"],
     "model: stage=dpo is for text-to-video models"),
    ("latent cache with a trained text encoder", ["data.shards={cache}"], "stage.train_text_encoder: data.shards is a"),
    ("latent cache at other frames/resolution", ["data.shards={cache}", "stage.train_text_encoder=false"],
     "stage.curriculum[0]: 8 frames at 16 px, but the latent cache holds 8 frames at 32 px"),
    ("latent cache of a latent cache", ["stage=latent_cache", "data.shards={cache}", "stage.out={empty}/out"],
     "data.shards: '{cache}' is already a latent cache"),
    ("LoRA adapter export without LoRA", ["+stage.export=adapter"], "stage.export: 'adapter' saves a LoRA adapter"),
    ("missing FID reference videos", ["metrics.reference.shards=/no/reference"],
     "metrics.reference.shards: no shards at '/no/reference'"),
    ("missing metric feature extractor", ["metrics.features.model=./no/dinov2"],
     "metrics.features.model: no such folder './no/dinov2'"),
    ("best checkpoint by a score validation does not log", ["stage.validation.best=val/clip_score"],
     "stage.validation.best: 'val/clip_score' is not one of ['val/colour_accuracy'"),
    ("evaluation of a folder without an export", ["stage=eval", "stage.models=[{empty}]"],
     "stage.models[0]: no exported bundle in '{empty}'"),
    ("value that cannot work", ["trainer.max_steps=0"], "trainer.max_steps: must be >= 1, or null for the stage's"),
    ("value that cannot work", ["trainer.max_steps=-1"], "trainer.max_steps: must be >= 1"),
    ("value that cannot work", ["stage.optimizer.lr=-1e-3"], "stage.optimizer.lr: must be >= 0, got -0.001"),
    ("value that cannot work", ["stage=sft", "stage.lora.rank=0"], "stage.lora.rank: must be >= 1, got 0"),
    ("value that cannot work", ["stage.ema.decay=1.5"], "stage.ema.decay: must be in [0, 1), or null for no EMA"),
    ("value that cannot work", ["stage=dpo", "stage.pairs={pairs}", "stage.guard.max_skips_in_a_row=0"],
     "stage.guard.max_skips_in_a_row: must be >= 1"),
    ("value that cannot work", ["data.max_bad_share=0"], "data.max_bad_share: must be in (0, 1]"),
    ("resolution the patch size does not divide", ["stage.curriculum=[{name:a,resolution:18,frames:8,batch_size:4,steps:2}]"],
     "stage.curriculum[0].resolution: 18 px is not a multiple of 4 (the denoiser's patch_size is 4, in model)"),
    ("resolution the patch size does not divide", ["stage=vader", "model=tiny_wan", "stage.resolution=30"],
     "stage.resolution: 30 px is not a multiple of 4 (the denoiser's patch_size is 4, in model)"),
    ("resolution the VAE and patch size do not divide",
     ["model=tiny_dit", "stage.curriculum=[{name:a,resolution:18,frames:1,batch_size:4,steps:2}]"],
     "stage.curriculum[0].resolution: 18 px is not a multiple of 4 (the VAE down-samples 2x and the denoiser's "
     "patch_size is 2, in model)"),
    ("empty prompt file", ["stage=vader", "prompts.train={prompts}"], "prompts.train: the prompt set is empty"),
    ("shards folder without shards", ["data.shards={empty}", "data.generate=null"],
     "data.shards: no shards at '{empty}' (the folder holds no *.tar)"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty").mkdir()
    (root / "pairs").mkdir()
    (root / "pairs" / "pairs-000000.tar").touch()
    (root / "cache").mkdir()
    (root / "cache" / "cache.json").write_text(json.dumps({"frames": 8, "resolution": 32}))
    (root / "prompts").write_text("# comments and blank lines only\n\n")
    return {name: str(root / name) for name in ("empty", "pairs", "cache", "prompts")}


def fill(text: str, folders: dict) -> str:
    for name, path in folders.items():
        text = text.replace(f"{{{name}}}", path)
    return text


@pytest.mark.parametrize("case, overrides, message", CASES, ids=[f"{c}: {' '.join(o)}" for c, o, _ in CASES])
def test_bad_config_fails_at_start_up_with_one_line_naming_the_key(tmp_path, folders, case, overrides, message):
    overrides = [fill(o, folders) for o in overrides]
    tiny = not any(o.startswith("model=") for o in overrides)  # the TINY overrides fit the default model only
    with pytest.raises(ConfigError) as err:
        compose_cfg(tmp_path, *overrides, tiny=tiny)
    assert str(err.value).startswith(fill(message, folders)) and "\n" not in str(err.value)


def test_the_cli_exits_before_compute_with_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "lifecycle", "stage=vader", JUDGE, f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "config error" in line]
    assert out.returncode == 2 and len(errors) == 1
    assert "config error: reward.judge: tests.test_config_errors.Judge is not differentiable" in errors[0]
    assert not (tmp_path / "samples").exists() and not (tmp_path / "checkpoints").exists()


def test_a_recipe_validates_every_stage_before_its_first_stage_runs(tmp_path):
    """Before: each stage was validated only when reached, so a bad stage 2 failed after stage 1 trained."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - {name: pretrain, overrides: [stage=pretrain]}\n"
                      "  - {name: sft, overrides: [stage=sft, 'data.shards={run:pretrain}/shards', data.generate=null,"
                      " stage.optimizer.lr=-1e-3]}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "lifecycle", f"recipe={recipe}", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "config error" in line]
    assert out.returncode == 2 and len(errors) == 1, (out.stdout + out.stderr)[-3000:]
    assert errors[0].endswith("config error: recipe stage sft: stage.optimizer.lr: must be >= 0, got -0.001")
    assert not (tmp_path / "run" / "pretrain").exists()  # nothing trained


def test_the_whole_tiny_recipe_validates_before_any_stage_ran(tmp_path):
    """The paths its later stages read ({run:curate}/shards, {run:preferences}/pairs, exports) do not exist yet;
    they are not looked up, everything else is."""
    from hydra import compose, initialize_config_dir

    from lifecycle.recipes import load_recipe, validate_all

    from .helpers import CONF_DIR

    recipe = load_recipe("tiny")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["recipe=tiny", f"run_dir={tmp_path}"])
        validate_all(cfg, recipe, tmp_path)
        recipe.stages[-2].overrides.append("stage.resolution=30")  # VADER, 7th of 8, at a resolution 4 does not divide
        with pytest.raises(ConfigError, match=r"^recipe stage vader: stage.resolution: 30 px is not a multiple of 4"):
            validate_all(cfg, recipe, tmp_path)
