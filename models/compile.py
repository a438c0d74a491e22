"""Regional compilation: `torch.compile` on each transformer block instead of on the whole model.

Every encoder and decoder block of a model (timm's `Block`, the class of MAE's encoder, decoder and fine-tuning
classifier blocks) is compiled in place with `nn.Module.compile`. Blocks of one shape share one compiled graph
(torch inlines module parameters as graph inputs), so the cold start costs about one encoder block and one decoder
block, forward and backward, instead of the whole model; the glue between blocks (patch embedding, masking,
gather/unshuffle, loss) stays eager. This is PyTorch's recipe for repeated layers
(https://pytorch.org/tutorials/recipes/regional_compilation.html).

For a block-masked MAE, `compile_blocks` also compiles the mask generator (`make_noise`): it loops over a fixed
number of rounds with no host read-back (models/masking.py), so the compiled version is a few fused kernels
instead of a few hundred small eager launches.

`compile_enabled(setting, device)`: the run's `run.compile` (True, False or None) -> whether to compile; None
means on for CUDA devices, off elsewhere (inductor's CPU code generation costs minutes on a small CPU box).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block,)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in module order (not nested in one another)."""
    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile each transformer block of `model` in place (`nn.Module.compile(**compile_kwargs)`), and a block
    MAE's mask generator; returns the number of blocks compiled. Call it before wrapping the model (DDP,
    Accelerate's prepare): the wrappers keep the compiled blocks."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks ({[t.__name__ for t in BLOCK_TYPES]})")
    for block in blocks:
        block.compile(**compile_kwargs)
    if getattr(model, "mask_type", None) == "block" and hasattr(model, "make_noise"):
        model.make_noise = torch.compile(model.make_noise, **compile_kwargs)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """True once `nn.Module.compile` has been applied to `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_enabled(setting: bool | None, device: torch.device | str) -> bool:
    """run.compile -> compile or not: True/False as given; None (the default) = on for CUDA, off otherwise."""
    if setting is None:
        return torch.device(device).type == "cuda"
    return bool(setting)


__all__ = ["BLOCK_TYPES", "compile_blocks", "compile_enabled", "is_compiled", "transformer_blocks"]
