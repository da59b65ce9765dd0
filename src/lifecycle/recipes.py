"""Recipes: an ordered list of stages run as one job, each starting from the previous stage's export.

`python -m lifecycle recipe=tiny` reads `recipes/tiny.yaml` (or `recipe=<path to a yaml file>`):

    overrides: [seed=0]            # optional: applied to every stage
    stages:
      - {name: pretrain, overrides: [stage=pretrain]}
      - {name: sft, overrides: [stage=sft]}
      - {name: reward_model, overrides: [stage=reward_model, "stage.pairs={run:preferences}/pairs"]}

Stage `name` runs in `<run_dir>/<name>/` with its `overrides` on top of the recipe's and the
command line's, and
with `model.pretrained` set to the newest export of a bundle so far (the first stage builds its
model from config). `{run:<stage>}` in an override is that stage's run directory. A finished stage
leaves `done.json` and is skipped when the recipe runs again; an unfinished one resumes from its
last checkpoint (`trainer.resume=last`), so re-running an interrupted recipe continues it.
"""

import json
import logging
import os
import re
import time
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import later, validate
from .errors import ConfigError
from .launch import run_stage

log = logging.getLogger(__name__)
RECIPES_DIR = Path(os.environ.get("LIFECYCLE_RECIPES", Path(__file__).resolve().parents[2] / "recipes"))
DONE = "done.json"


def load_recipe(name: str) -> DictConfig:
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"recipe: no recipe {name!r} (no file {str(path)!r}; known: {known})")
    recipe = OmegaConf.load(path)
    stages = recipe.get("stages")
    if not stages:
        raise ConfigError(f"recipe: {path} lists no stages")
    names = [s.get("name") for s in stages]
    for i, s in enumerate(stages):
        if not s.get("name") or not s.get("overrides"):
            raise ConfigError(f"recipe.stages[{i}]: needs a name and overrides (at least stage=...)")
    if len(set(names)) != len(names):
        raise ConfigError(f"recipe.stages: stage names must be unique, got {names}")
    return recipe


def _fill(override: str, dirs: dict[str, Path]) -> str:
    """Replace each `{run:<stage>}` with that stage's run directory."""
    def run_dir(match: re.Match) -> str:
        if match[1] not in dirs:
            raise ConfigError(f"recipe: {override!r} refers to stage {match[1]!r} before it has run")
        return str(dirs[match[1]])

    return re.sub(r"\{run:([\w-]+)\}", run_dir, override)


def _user_overrides() -> list[str]:
    """The command line's overrides, minus `recipe=` and Hydra's own."""
    task = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return [o for o in task if not o.split("=", 1)[0].lstrip("+~").startswith(("recipe", "hydra."))]


def _overrides(cfg: DictConfig, recipe: DictConfig, s: DictConfig, run_dir: Path, dirs: dict, model: str | None):
    """What stage `s` composes: the recipe's overrides, the command line's, the stage's own, its run directory,
    and the newest export so far as its model."""
    overrides = [*recipe.get("overrides", []), *_user_overrides(), *(_fill(o, dirs) for o in s.overrides),
                 f"run_dir={run_dir}", f"recipe={cfg.recipe}", "trainer.resume=last"]
    return overrides + ([f"model.pretrained={model}"] if model is not None else [])


def _export_of(run_dir: Path) -> str | None:
    return str(run_dir / "export") if (run_dir / "export" / "model_index.json").is_file() else None


def validate_all(cfg: DictConfig, recipe: DictConfig, root: Path) -> None:
    """Compose and validate every stage not done yet, before the first one runs: a bad value in stage 3 stops the
    recipe at start-up, not after stages 1 and 2 trained. What earlier stages will write (their run directories:
    shards, pairs, exports) is not looked up yet; a stage whose model is an export still to come is checked
    against the configured model, which is what that export will be built from."""
    dirs, model, pending = {}, None, []
    for s in recipe.stages:
        run_dir = root / s.name
        if not (run_dir / DONE).is_file():
            pending.append(run_dir)
            try:
                with later(*pending):
                    validate(compose("config", overrides=_overrides(cfg, recipe, s, run_dir, dirs, model)))
            except ConfigError as e:
                raise ConfigError(f"recipe stage {s.name}: {e}") from None
        dirs[s.name] = run_dir
        model = _export_of(run_dir) or (None if pending else model)


def run_recipe(cfg: DictConfig) -> dict:
    """Run (or continue) every stage of `cfg.recipe` in order under `cfg.run_dir`."""
    recipe = load_recipe(cfg.recipe)
    root = Path(cfg.run_dir)
    validate_all(cfg, recipe, root)
    dirs = {}
    model, results, start = None, {}, time.time()
    for s in recipe.stages:
        run_dir = root / s.name
        done = run_dir / DONE
        if done.is_file():
            results[s.name] = json.loads(done.read_text())
            log.info("recipe %s: stage %s already done, skipped", cfg.recipe, s.name)
        else:
            log.info("recipe %s: stage %s in %s", cfg.recipe, s.name, run_dir)
            began = time.time()
            result = run_stage(compose("config", overrides=_overrides(cfg, recipe, s, run_dir, dirs, model))) or {}
            results[s.name] = {**result, "seconds": round(time.time() - began, 1)}
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(results[s.name], indent=2, default=str))
            tmp.replace(done)
        dirs[s.name] = run_dir
        model = _export_of(run_dir) or model
    summary = {"recipe": cfg.recipe, "seconds_this_run": round(time.time() - start, 1), "stages": results}
    (root / "recipe.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
