"""A resume states what changed: the config a checkpoint was trained with, compared with the one resuming it.

Every checkpoint holds its run's config (as composed, interpolations unresolved, secrets redacted) in `RunConfig`'s
callback state. On resume
the keys that differ are logged in one line; those that cannot change (the model's weights and shapes, the
stage kind, LoRA, which parts train) are refused in one line before any weight is loaded (a width change used
to fail with a 205-line log); the others take effect as asked. Lightning restores the optimizer's
hyper-parameters and the LR schedule's `base_lrs` from the checkpoint, so a changed `stage.optimizer.lr` (or
betas, weight decay, eps) would silently keep the old value: `RunConfig.on_train_start` writes the configured
values back once the state is restored, and puts each group's current lr on the (rebuilt) schedule at the
resumed step. The export's lineage lists each resume's changes with its step (`resumed`).
"""

import logging

import lightning as L
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .secrets import redact, secret_values

log = logging.getLogger(__name__)
# keys a run cannot change on resume: the weights' shapes and sources, the stage kind, what trains
FIXED = ("model.pretrained", "model.denoiser", "model.vae", "model.text_encoder", "model.tokenizer",
         "model.image_encoder", "stage.name", "stage.run", "stage.lora", "stage.train_text_encoder",
         "stage.architecture", "stage.conv", "stage.clip")
IGNORED = ("run_dir", "overwrite", "trainer.resume")  # differ between attempts by design
OPTIMIZER_KEYS = ("weight_decay", "eps")  # besides lr and betas, set on each param group as configured


def flat(node, prefix: str = "") -> dict:
    """A nested dict as {dotted key: value}; lists stay whole values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changes(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for every key that differs (missing on one side: None)."""
    a, b = flat(old), flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not under(k, IGNORED)}


def under(key: str, prefixes) -> bool:
    """Whether `key` is one of `prefixes` or inside one (`stage.clip.hidden` is under `stage.clip`; `stage.clips`
    is not)."""
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def describe(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())


class RunConfig(L.Callback):
    """The run's config in its checkpoints; on resume, the configured optimizer values applied over the restored
    ones, and the history of what each resume changed."""

    def __init__(self, cfg: DictConfig):
        # unresolved: a key that follows run_dir (logger.csv.save_dir: ${run_dir}) does not differ in a moved run
        self.config = redact(OmegaConf.to_container(cfg, resolve=False), secret_values(cfg))
        self.optimizer = OmegaConf.to_container(cfg.stage.optimizer) if "optimizer" in cfg.stage else None
        self.history: list[dict] = []  # [{step, changed: {key: [old, new]}}], oldest first

    def check(self, stored: dict | None, checkpoint, step: int) -> None:
        """Compare the checkpoint's config with this run's: refuse a fixed key's change, log the others."""
        if stored is None:  # a checkpoint from before configs were stored
            return
        changed = changes(stored, self.config)
        fixed = {k: v for k, v in changed.items() if under(k, FIXED)}
        if fixed:
            raise ConfigError(f"trainer.resume: {checkpoint} was trained with {describe(fixed)}; the model, the stage "
                              f"and what trains cannot change on resume (use another run directory, or overwrite=true)")
        if changed:
            log.warning("resuming step %d with a changed config: %s", step, describe(changed))
            self.history.append({"step": step, "changed": {k: list(v) for k, v in changed.items()}})

    def state_dict(self) -> dict:
        return {"config": self.config, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state.get("history", []) + self.history  # earlier resumes, then this one

    def on_train_start(self, trainer, pl_module) -> None:
        """After Lightning restored the optimizer and schedule: the configured values, not the checkpoint's."""
        if self.optimizer is None:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["initial_lr"] = self.optimizer["lr"]
                group["betas"] = tuple(self.optimizer["betas"])
                group.update({k: self.optimizer[k] for k in OPTIMIZER_KEYS if k in group})
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [self.optimizer["lr"]] * len(scheduler.optimizer.param_groups)
            lambdas = getattr(scheduler, "lr_lambdas", None)  # diffusers' schedules: LambdaLR at last_epoch steps
            if lambdas is not None:
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
