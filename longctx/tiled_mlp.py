"""The MLP of every decoder layer applied over sequence tiles, through DeepSpeed's `TiledMLP`.

A gated MLP's intermediate (tokens x intermediate_size, 3.5x the hidden size for Llama-3)
is the largest activation of a layer at long sequences. `TiledMLP` runs the MLP tile by tile
without grad in forward and recomputes each tile in backward, so only one tile's
intermediate exists at a time. The price is one more MLP forward per step, and a few kernel launches per tile;
below `AUTO_MIN_ELEMENTS` the memory saved is small and that price is not worth it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from longctx.activation_checkpointing import RngState
from longctx.config import TILED_MLP

# auto tiles once one intermediate (tokens x intermediate_size) is as large as an 8B layer's at 32K tokens: there
# its untiled intermediates (gate, up, act, product and their gradients) take ~6 GiB, growing linearly past it. A
# narrow MLP (SmolLM2's is 1,536 wide) saves little by tiling, and its tiles' launches bind the step to the host.
AUTO_MIN_ELEMENTS = 32768 * 14336


def auto_tile_from(intermediate_size: int) -> int:
    """Tokens per rank from which `train.tiled_mlp=auto` tiles an MLP of this width."""
    return -(-AUTO_MIN_ELEMENTS // intermediate_size)


def use_tiled_mlp(setting: str, tokens: int, intermediate_size: int) -> bool:
    """Whether `train.tiled_mlp` (auto | always | never) tiles an MLP of this width at this many tokens per rank."""
    if setting not in TILED_MLP:
        raise ValueError(f"train.tiled_mlp={setting!r}: must be one of {'|'.join(TILED_MLP)}")
    return setting == "always" or (setting == "auto" and tokens >= auto_tile_from(intermediate_size))


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _untiled(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, x)  # the class's own forward: the instance one is ours


class _SameRandomness:
    """The MLP of one tiled call, drawing in backward's recompute of each tile the random numbers (LoRA
    dropout masks) that tile drew in forward, as checkpointing does; else the gradient would belong to other
    masks than the output. TiledMLP runs the tiles in the same order in forward (without grad) and backward."""

    def __init__(self) -> None:
        self.states: list[RngState] = []

    def __call__(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # forward
            self.states.append(RngState(x.device))
            return _untiled(mlp, x)
        with self.states.pop(0).restored():  # the caller's random stream goes on untouched
            return _untiled(mlp, x)


def tiled_forward(mlp: torch.nn.Module, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)` computed over tiles of at most `tile_tokens` tokens (per row)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiles = math.ceil(x.shape[-2] / tile_tokens)
    if tiles <= 1:
        return _untiled(mlp, x)
    # Trainable parameters (LoRA adapters, or all weights) are named so that DeepSpeed ZeRO
    # takes their gradient once, after the last tile, not once per tile. The tokens of all rows are
    # tiled as one run, as TiledMLP's backward tiles them: tile i is then the same tokens both ways.
    trainable = [p for p in mlp.parameters() if p.requires_grad]
    flat = x.reshape(-1, x.shape[-1])
    if trainable and torch.is_grad_enabled() and not flat.requires_grad:
        # autograd sees only x among TiledMLP's inputs: without a gradient path through it (adapters on the
        # MLP alone, below every other trained layer), backward would never run and the adapters learn nothing
        flat = flat.detach().requires_grad_()
    return TiledMLP.apply(_SameRandomness(), mlp, flat, tiles, trainable).view(x.shape)


def apply_tiled_mlp(model: torch.nn.Module, tile_tokens: int) -> Callable[[], None]:
    """Tile every gated MLP (gate/up/down projections) of `model`; returns the undo."""
    if tile_tokens < 1:
        raise ValueError(f"train.mlp_tile_tokens={tile_tokens}: must be >= 1")
    mlps = [m for m in model.modules() if _is_gated_mlp(m)]
    if not mlps:
        raise ValueError(f"{type(model).__name__}: no gated MLP (gate_proj, up_proj, down_proj, act_fn) to tile")
    for mlp in mlps:
        mlp.forward = lambda x, mlp=mlp: tiled_forward(mlp, tile_tokens, x)

    def undo() -> None:
        for mlp in mlps:
            mlp.__dict__.pop("forward", None)

    return undo
