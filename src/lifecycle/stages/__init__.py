"""Stages: `stage=<name>` is the module `lifecycle.stages.<name>` (its Config, checks, LightningModule and `run`),
built on `base` (config bases and declared kinds), `runner` (the training sequence every training stage
follows), `optim` (optimizer, guarded step, per-step seeds) and `guard` (the loss guard)."""
