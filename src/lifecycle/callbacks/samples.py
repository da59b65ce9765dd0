"""Sample videos for fixed prompts and seeds, written to disk, scored, and sent to the loggers."""

from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from ..metrics.oracle import prompt_fidelity
from ..outputs import current
from ..outputs.export import write_samples as export
from .ema import EMA


def to_uint8(videos: torch.Tensor) -> list[np.ndarray]:
    """(B, F, C, H, W) in [0, 1] -> list of uint8 (F, H, W, C)."""
    return list((videos.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy())


def write_samples(out: Path, videos: torch.Tensor, prompts: list[str], scores: dict, fps: int = 8,
                  name: str = "fidelity.json") -> None:
    """`out/`: an mp4 and a gif per video, filmstrip.png with the prompts, prompts.json, the scores and
    provenance.json, under the output policy (lifecycle.outputs: content filter, watermark, provenance)."""
    export(out, to_uint8(videos), prompts, scores, fps, name, current())


class SampleVideos(L.Callback):
    """At the end of training (and every `every_n_steps` if > 0) sample `prompts` with EMA weights.

    Writes `samples/<tag>/` with `write_samples` (mp4 + gif per prompt, a filmstrip PNG, `fidelity.json` with
    the pixel-oracle prompt fidelity where the prompts are synthetic-world captions) and logs the written files.
    """

    def __init__(self, out_dir, prompts: list[str], frames: int, resolution: int, num_steps: int = 25,
                 guidance_scale: float = 3.0, seed: int = 0, every_n_steps: int = 0, fps: int = 8,
                 batch_size: int = 32, oracle: bool = True):
        self.out_dir, self.prompts = Path(out_dir), list(prompts)
        self.frames, self.resolution, self.num_steps = frames, resolution, num_steps
        self.guidance_scale, self.seed, self.every_n_steps = guidance_scale, seed, every_n_steps
        self.fps, self.batch_size, self.oracle = fps, batch_size, oracle
        self.results: dict[str, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and f"step{step:06d}" not in self.results:
            self.run(trainer, pl_module, f"step{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.run(trainer, pl_module, "final")

    @torch.no_grad()
    def run(self, trainer, pl_module, tag: str) -> dict:
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
        if trainer.is_global_zero:
            write_samples(self.out_dir / tag, videos, self.prompts, result, self.fps)
            self._log(trainer, tag, len(videos), result)
        self.results[tag] = result
        return result


    def _log(self, trainer, tag: str, count: int, result: dict) -> None:
        """Metrics, and the first 8 videos as written (filtered and watermarked) to wandb or TensorBoard."""
        step = trainer.global_step
        metrics = {f"samples/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float)) and k != "step"}
        files = [self.out_dir / tag / f"{i:03d}" for i in range(min(count, 8))]
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            name = type(logger).__name__
            if name == "WandbLogger":
                paths = [str(f.with_suffix(".mp4")) for f in files]
                logger.log_video("samples/videos", videos=paths, step=step, caption=self.prompts[: len(files)])
            elif name == "TensorBoardLogger":
                # TensorBoard shows an image summary whose bytes are a GIF as an animation (its own
                # add_video needs moviepy 1.x for the same encoding).
                from tensorboard.compat.proto.summary_pb2 import Summary

                values = []
                for i, f in enumerate(files):
                    gif = f.with_suffix(".gif")
                    with Image.open(gif) as image:
                        width, height = image.size
                    values.append(Summary.Value(tag=f"samples/{i:02d}", image=Summary.Image(
                        height=height, width=width, colorspace=3, encoded_image_string=gif.read_bytes())))
                logger.experiment.file_writer.add_summary(Summary(value=values), step)
