"""Fully sharded data parallel (FSDP2) for the training stages, with sharded checkpoints.

`trainer=fsdp` runs Lightning's ModelParallelStrategy as pure FSDP2: one data-parallel mesh
dimension over every rank. FSDP2 rather than Lightning's FSDPStrategy (FSDP1): each parameter
is sharded as its own DTensor, so frozen weights and LoRA adapters can share a block, the
optimizer and EMA see plain per-parameter shards, and it runs on CPU with gloo as well as on
CUDA with NCCL.

Checkpoints are torch.distributed.checkpoint (DCP) folders: each rank writes its shards of the
trained weights, the optimizer state and the EMA weights; rank 0 adds `meta.pt` (loops, data
position, schedules). DCP reshards on load, so a run saved on N ranks resumes on M. The folder
is written next to its final name and swapped in, so a crash never leaves half a checkpoint.
Frozen weights are not saved: they are rebuilt from their sources on resume.
"""

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from .callbacks.ema import EMA
from .checkpointing import staging_path, write_errors


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def shard(module, components: list[nn.Module]) -> None:
    """Under `trainer=fsdp` (the module has a device mesh), FSDP2-shard each of `components`: every block
    (each element of the outermost ModuleLists) is its own unit, all-gathered just before it runs; the rest
    of the component is one more unit. A no-op under other strategies."""
    if module.device_mesh is None:
        return
    mesh = module.device_mesh["data_parallel"]  # a 2-D mesh would make fully_shard replicate (HSDP)
    for component in components:
        for block in _blocks(component):
            fully_shard(block, mesh=mesh)
        fully_shard(component, mesh=mesh)


def _blocks(module: nn.Module):
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _blocks(child)


def gather_bundle(bundle: nn.Module, rebuild) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded `bundle` on rank 0, None elsewhere; every rank must call it.

    `rebuild()` makes an unsharded bundle of the same structure (LoRA included), into which the full
    weights are loaded. For export at the end of training: the only time the weights meet on one rank.
    """
    full = get_model_state_dict(bundle, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank():
        return None
    copy = rebuild()
    copy.load_state_dict(full)
    return copy


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with data parallelism over all ranks (no tensor parallelism) and checkpoints that
    hold only the trained state (see the module docstring). Stages shard their components in `configure_model`."""

    def __init__(self, **kwargs):
        super().__init__(tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.lightning_module.named_parameters() if p.requires_grad}

    def _ema(self) -> EMA | None:
        return next((c for c in self.lightning_module.trainer.callbacks if isinstance(c, EMA)), None)

    def lightning_module_state_dict(self) -> dict:
        trainable = self._trainable()
        return {k: v for k, v in super().lightning_module_state_dict().items() if k in trainable}

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        staging = staging_path(path)
        if self.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        state = {"model": checkpoint.pop("state_dict"),
                 **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
        ema = self._ema()
        if ema is not None and ema.state_key in checkpoint.get("callbacks", {}):
            state["ema"] = checkpoint["callbacks"][ema.state_key].pop("shadow")
        with write_errors(path, staging):
            dcp.save(state, checkpoint_id=staging)
            if self.global_rank == 0:
                torch.save(checkpoint, staging / _METADATA_FILENAME)
                old = path.with_name(f".{path.name}.old")  # the swap is two renames; a crash between keeps both
                _remove(old)
                if path.exists():
                    path.rename(old)
                staging.rename(path)
                _remove(old)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        trainable = self._trainable()
        model = {k: v for k, v in get_model_state_dict(self.model).items() if k in trainable}
        state = {"model": model, **{f"optimizer_{i}": get_optimizer_state_dict(self.model, o)
                                    for i, o in enumerate(self.optimizers)}}
        ema = self._ema()
        if ema is not None:
            state["ema"] = {n: p.detach().clone() for n, p in trainable.items()}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"])
        meta = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        meta["state_dict"] = state["model"]  # loaded above; for the stages' check that every trained weight is there
        if ema is not None:
            meta["callbacks"][ema.state_key]["shadow"] = state["ema"]
        return meta
