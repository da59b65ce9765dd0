"""A CSV logger that keeps a run's history across resumes, and a wandb logger whose run metadata holds no secret."""

import csv
import os

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .secrets import masked_argv


class _ResumingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run appends to it instead.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that resuming into a run directory keeps its metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, except that the run starts with secrets masked in `sys.argv`, which wandb records
    in the run's metadata (`wandb-metadata.json`, uploaded by `wandb sync`), and that each stage gets a run of its
    own. No config is given to wandb."""

    @property
    def experiment(self):
        if self._experiment is not None:
            return super().experiment
        import wandb

        if wandb.run is not None:  # an earlier stage's run (Lightning never finishes it): Lightning would log into it
            wandb.finish()
        with masked_argv():  # wandb.init reads it
            return super().experiment


def drop_rows_from(path: str | os.PathLike, step: int) -> None:
    """Remove rows with `step` or later from a metrics CSV: what a run logged past its last checkpoint.

    Lightning logs the row of optimizer step k (1-based) as step k - 1.
    """
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if not r.get("step") or int(r["step"]) < step]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
