"""The training datamodule: webdataset shards read as curriculum batches."""

import os

import lightning as L
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..signals import worker_signals
from .curriculum import Curriculum
from .select import Selection
from .shards import CurriculumStream, list_shards


class ShardDataModule(L.LightningDataModule):
    """Reads `shards`; if they are missing and `generate` is set (the embedded default), writes them first.

    The stream starts at the training module's `batches_seen`, so a resumed run sees exactly
    the batches an uninterrupted one would. Each phase's batch size is the global batch, split
    evenly over the ranks (`split`: see `CurriculumStream`). `balance` ({key, classes}) draws each class
    of a metadata field equally often.
    """

    def __init__(self, shards: str, curriculum: Curriculum, seed: int = 0, num_workers: int = 1,
                 shuffle_buffer: int = 256, accumulate: int = 1, generate=None, select: dict | None = None,
                 split: str = "global", balance: dict | None = None, caption_key: str = "caption",
                 decoded_cache_mb: float = 0, max_bad_in_a_row: int = 1000, max_bad_share: float = 0.5):
        super().__init__()
        self.shards, self.curriculum, self.seed, self.split = shards, curriculum, seed, split
        self.num_workers, self.shuffle_buffer, self.accumulate = num_workers, shuffle_buffer, accumulate
        self.generate, self.balance, self.caption_key = generate, balance, caption_key
        self.decoded_cache_mb, self.max_bad_in_a_row, self.max_bad_share = decoded_cache_mb, max_bad_in_a_row, max_bad_share
        self.select = Selection(**select) if select else None

    def prepare_data(self) -> None:
        if self.generate is not None and not os.path.exists(self.shards):
            instantiate(self.generate)

    def setup(self, stage: str) -> None:
        self.urls = list_shards(self.shards)
        world = self.trainer.world_size
        for i, p in enumerate(self.curriculum.phases):
            if p.batch_size % world:
                raise ConfigError(f"stage.curriculum[{i}].batch_size: the global batch {p.batch_size} does not split "
                                  f"evenly over {world} ranks")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = CurriculumStream(
            self.urls, self.curriculum, seed=self.seed, start_batch=trainer.lightning_module.batches_seen,
            shuffle_buffer=self.shuffle_buffer, accumulate=self.accumulate,
            rank=trainer.global_rank, world_size=trainer.world_size, select=self.select, split=self.split,
            balance=self.balance, caption_key=self.caption_key, decoded_cache_mb=self.decoded_cache_mb,
            max_bad_in_a_row=self.max_bad_in_a_row, max_bad_share=self.max_bad_share,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                          worker_init_fn=worker_signals)
