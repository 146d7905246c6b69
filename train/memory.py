"""Activation memory per layer, measured: the bytes autograd keeps for the backward of one
transformer block, per token, with each recompute granularity.

Measured with `torch.autograd.graph.saved_tensors_hooks` around one block's forward on a short
packed sequence: every tensor autograd saves is recorded once per storage (views share it), and
parameters (saved by the matmuls, but not activations) are left out. A recomputed region saves
only its inputs (non-reentrant checkpoint saves them through the same hooks), which is what the
numbers show. Linear in tokens up to the attention core, whose saved state is linear too
(flash-style: output and log-sum-exp).
"""

import torch
import torch.nn as nn

from model.llama import Block, _maybe_recompute


def _set_block_mode(block: Block, mode: str) -> None:
    selective = mode == "selective"
    block.recompute_norms = selective
    block.attention.recompute_core = selective
    block.mlp.recompute_act = selective


def saved_bytes(block: Block, tokens: int, mode: str, device, dtype) -> int:
    """Bytes saved for backward by one forward of `block` over `tokens` tokens (two documents)."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != 0:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    hidden = block.attention_norm.weight.shape[0]
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    half = tokens // 2
    positions = torch.cat([torch.arange(half), torch.arange(tokens - half)]).to(device)
    cu = torch.tensor([0, half, tokens], dtype=torch.int32, device=device)
    old = (block.recompute_norms, block.attention.recompute_core, block.mlp.recompute_act)
    _set_block_mode(block, mode)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _maybe_recompute(
                mode == "full", block, h, positions, cu, max(half, tokens - half)
            )
        del out
    finally:
        block.recompute_norms, block.attention.recompute_core, block.mlp.recompute_act = old
    return sum(saved.values())


def activation_report(model: nn.Module, tokens: int, device, dtype) -> dict[str, float]:
    """Bytes per layer per token for none / selective / full recompute, from the model's first
    local block (all blocks have the same shape)."""
    block = next(iter(model.layers.values()))
    return {mode: saved_bytes(block, tokens, mode, device, dtype) / tokens
            for mode in ("none", "selective", "full")}  # fmt: skip
