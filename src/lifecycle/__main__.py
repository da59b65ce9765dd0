"""`python -m lifecycle stage=... [key=value ...]` or `recipe=<name>`: one Hydra entry point for every stage."""

import json
import logging
import sys
from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from . import CONF_DIR
from .data.video_io import write_atomically
from .errors import CheckpointWriteError, ConfigError, DataError, DivergenceError
from .launch import run_stage
from .recipes import run_recipe
from .rundir import claim
from .secrets import protect, redact, secret_values
from .signals import Interrupted
from .summary import summary

log = logging.getLogger("lifecycle")


@rank_zero_only  # data-parallel ranks share run_dir: rank 0 writes
def write_result(result, cfg: DictConfig) -> None:
    """`<run_dir>/result.json` (secrets redacted), written beside and swapped in; `python -m lifecycle.sweep`
    tables a multirun's."""
    text = json.dumps(redact(result, secret_values(cfg)), indent=2, default=str) + "\n"
    write_atomically(Path(cfg.run_dir) / "result.json", text.encode())


def reason(error: Exception) -> str:
    """An error's own message: one raised in a DataLoader worker arrives re-raised by torch with the worker's
    traceback in its text, whose last line is `<module>.<Type>: <message>`."""
    text = str(error).strip()
    if "DataLoader worker" not in text:
        return text
    return text.splitlines()[-1].split(f"{type(error).__name__}: ", 1)[-1]


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    """Exit status: 0 done, 1 stopped by the run itself or failed, 2 a configuration error, 128 + the signal's
    number when stopped by SIGTERM or SIGINT. Every error is logged here, through the handlers that mask
    secrets: an exception reaching Hydra would make it write the command line's overrides, unmasked, to stderr
    ("Error executing job with overrides: [...]")."""
    protect(cfg)  # before anything is logged: secrets masked in logs and in .hydra/*.yaml
    lock = None
    try:
        lock = claim(cfg)  # one run per run directory; a finished one is not silently overwritten
        if cfg.get("recipe"):
            result = run_recipe(cfg)
        else:
            result = run_stage(cfg)
        write_result(result, cfg)
    except ConfigError as e:
        log.error("config error: %s", e)
        sys.exit(2)
    except (DivergenceError, CheckpointWriteError, DataError) as e:
        log.error("stopped: %s", reason(e))  # the run stopped itself; its last checkpoint is intact
        sys.exit(1)
    except Interrupted as e:  # SIGTERM or SIGINT, at a step boundary
        again = "" if cfg.get("recipe") else " trainer.resume=last"  # a recipe resumes its stages itself
        if rank_zero_only.rank == 0:  # every rank stopped at the same step
            log.error("%s; to resume, run the same command with%s hydra.run.dir=%s", e, again, cfg.run_dir)
        sys.exit(e.exit_status)
    except Exception:  # logged here, secrets masked; Hydra would print the overrides unmasked
        log.exception("failed")
        sys.exit(1)
    finally:
        if lock is not None:
            lock.release()
    name = f"recipe {cfg.recipe}" if cfg.get("recipe") else cfg.stage.name
    log.info("%s done:\n%s", name, summary(result, Path(cfg.run_dir), cfg.get("recipe") or cfg.stage.name))
    return result


if __name__ == "__main__":
    main()
