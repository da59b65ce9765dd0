"""Memory options for training large denoisers.

- `enable_gradient_checkpointing`: recompute block activations in backward instead of storing them.
- `offload_activations`: keep the tensors saved for backward in CPU memory.
- `freeze_to_dtype`: store frozen weights in half precision while trainable (LoRA) weights stay
  fp32, as VADER does; run the forward under `torch.autocast(device_type, dtype)` so fp32
  activations meet half-precision weights.
"""

import types

import torch
from diffusers import UNet3DConditionModel
from torch import nn
from torch.utils.checkpoint import checkpoint

NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
HALF_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def enable_gradient_checkpointing(denoiser: nn.Module) -> nn.Module:
    """Activation checkpointing per block for every supported denoiser, in place."""
    if isinstance(denoiser, UNet3DConditionModel):
        # diffusers declares no checkpointing support for UNet3DConditionModel and its 3D blocks
        # never consult their `gradient_checkpointing` flag, so each block's forward is wrapped here.
        for block in [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]:
            if "forward" not in vars(block):  # not wrapped yet
                block.forward = types.MethodType(_checkpointed_forward, block)
    elif getattr(denoiser, "_supports_gradient_checkpointing", False):
        # UNet2D, UNetSpatioTemporal, Wan, and FramesAsChannelsUNet (this reaches its inner UNet2D blocks)
        denoiser.enable_gradient_checkpointing()
    else:
        raise ValueError(f"no gradient checkpointing for {type(denoiser).__name__}")
    return denoiser


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Bound with MethodType rather than a closure so that a deepcopy of the model (EMA, FSDP
    # wrapping) checkpoints its own block, not the original's.
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def offload_activations():
    """Context in which the tensors autograd saves for backward live in CPU memory (pinned on CUDA)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def freeze_to_dtype(module: nn.Module, dtype: torch.dtype | str = torch.bfloat16) -> nn.Module:
    """Cast the frozen (requires_grad=False) parameters to `dtype` (bf16, or fp16), in place.

    Trainable parameters keep their dtype (fp32 LoRA weights and their optimizer state), and so
    do normalization layers: their weights are tiny, and CPU autocast runs layer/group norm in
    the input's dtype, whose kernels take fp32 weights with any input but not half-precision
    weights with fp32 input.
    """
    dtype = HALF_DTYPES[dtype] if isinstance(dtype, str) else dtype
    for m in module.modules():
        if isinstance(m, NORM_LAYERS):
            continue
        for p in m.parameters(recurse=False):
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    return module
