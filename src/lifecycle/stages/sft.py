"""`stage=sft`: supervised fine-tuning is pre-training's objective, curriculum and validation on a curated subset
(`stage.select`), with LoRA and a lower learning rate (conf/stage/sft.yaml): the same config and run."""

from .pretrain import Config, run

__all__ = ["Config", "run"]
