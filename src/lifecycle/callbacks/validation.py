"""Validation during training: fixed prompts and seeds sampled every n steps, written, scored and logged."""

import shutil
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from ..data.oracle import prompt_fidelity
from .ema import EMA
from ..outputs.samples import write_samples


class Validation(L.Callback):
    """Every `every_n_steps` optimizer steps (if > 0) and at the end of training, sample `prompts` with seeds from
    `seed` (EMA weights when EMA is on) and score them: the pixel oracle's prompt fidelity where the prompts are
    synthetic-world captions (`oracle`), and `quality` (a `metrics.quality.VideoQuality`: FID, KID, CLIP score,
    temporal consistency, motion) when given.

    Writes `samples/<tag>/` (`write_samples`: an mp4 per prompt, GIF previews, filmstrip, `fidelity.json`) and
    logs the scores as `val/<name>` and the first 8 videos, as written, to wandb or TensorBoard. The scores of a
    step also enter `trainer.callback_metrics`, where `best_checkpoint`'s ModelCheckpoint finds its monitor.
    """

    def __init__(self, out_dir, prompts: list[str], frames: int, resolution: int, num_steps: int = 25,
                 guidance_scale: float = 3.0, seed: int = 0, every_n_steps: int = 0, fps: int = 8,
                 batch_size: int = 32, oracle: bool = True, quality=None):
        self.out_dir, self.prompts = Path(out_dir), list(prompts)
        self.frames, self.resolution, self.num_steps = frames, resolution, num_steps
        self.guidance_scale, self.seed, self.every_n_steps = guidance_scale, seed, every_n_steps
        self.fps, self.batch_size, self.oracle, self.quality = fps, batch_size, oracle, quality
        self.results: dict[str, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and f"step{step:06d}" not in self.results:
            result = self.run(trainer, pl_module, f"step{step:06d}")
            # every rank scored the same videos, so a monitoring ModelCheckpoint decides alike everywhere
            pl_module.log_dict({f"val/{k}": v for k, v in result.items() if k != "step"}, on_step=True,
                               on_epoch=False, logger=False)

    def on_train_end(self, trainer, pl_module) -> None:
        last = f"step{trainer.global_step:06d}"
        if last not in self.results:
            self.run(trainer, pl_module, "final")
            return
        # the last step was validated with these very weights (EMA updates before this callback: it comes first
        # in the trainer's list): `final` is a copy of it, not a second sampling
        if trainer.is_global_zero:
            shutil.copytree(self.out_dir / last, self.out_dir / "final", dirs_exist_ok=True)
        self.results["final"] = self.results[last]

    @torch.no_grad()
    def run(self, trainer, pl_module, tag: str) -> dict:
        """Sample, score and write `samples/<tag>/`, and send the scores and videos to the loggers."""
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
        was_training = pl_module.training
        pl_module.eval()
        with ema.swapped(pl_module) if ema is not None and ema.shadow is not None else nullcontext():
            videos = pl_module.bundle.generate(
                self.prompts, frames=self.frames, resolution=self.resolution, num_steps=self.num_steps,
                guidance_scale=self.guidance_scale, seed=self.seed, batch_size=self.batch_size,
            )
        pl_module.train(was_training)
        result = {"step": trainer.global_step}
        if self.oracle:
            result.update(prompt_fidelity(videos, self.prompts))
        if self.quality is not None:
            result.update(self.quality(videos, self.prompts))
        if trainer.is_global_zero:
            write_samples(self.out_dir / tag, videos, self.prompts, result, self.fps)
            self._log(trainer, tag, len(videos), result)
        self.results[tag] = result
        return result

    def _log(self, trainer, tag: str, count: int, result: dict) -> None:
        """Scores, and the first 8 videos as written (filtered and watermarked) to wandb or TensorBoard."""
        step = trainer.global_step
        metrics = {f"val/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float)) and k != "step"}
        files = [self.out_dir / tag / f"{i:03d}" for i in range(min(count, 8))]
        gifs = [f.with_suffix(".gif") for f in files if f.with_suffix(".gif").is_file()]  # outputs.gif_previews
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            name = type(logger).__name__
            if name == "WandbLogger":
                paths = [str(f.with_suffix(".mp4")) for f in files]
                logger.log_video("val/videos", videos=paths, step=step, caption=self.prompts[: len(files)])
            elif name == "TensorBoardLogger":
                # TensorBoard shows an image summary whose bytes are a GIF as an animation (its own
                # add_video needs moviepy 1.x for the same encoding).
                from tensorboard.compat.proto.summary_pb2 import Summary

                values = []
                for i, gif in enumerate(gifs):
                    with Image.open(gif) as image:
                        width, height = image.size
                    values.append(Summary.Value(tag=f"val/{i:02d}", image=Summary.Image(
                        height=height, width=width, colorspace=3, encoded_image_string=gif.read_bytes())))
                logger.experiment.file_writer.add_summary(Summary(value=values), step)


def best_checkpoint(run_dir: Path, monitor: str, mode: str, every_n_steps: int) -> ModelCheckpoint:
    """`checkpoints/best.ckpt`: the validation step with the best `monitor` (a `val/*` score) so far."""
    return ModelCheckpoint(dirpath=Path(run_dir) / "checkpoints", filename="best", monitor=monitor, mode=mode,
                           every_n_train_steps=every_n_steps, save_top_k=1, save_last=False,
                           auto_insert_metric_name=False, enable_version_counter=False)
