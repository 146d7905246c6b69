"""Activation memory per layer, measured: the bytes autograd keeps for the backward of one
transformer block, per token, with each recompute granularity.

Measured with `torch.autograd.graph.saved_tensors_hooks` around one block's forward on a short
packed sequence: every tensor autograd saves is recorded once per storage (views share it), and
parameters (saved by the matmuls, but not activations) are left out. A recomputed region saves
only its inputs (non-reentrant checkpoint saves them through the same hooks), which is what the
numbers show. Linear in tokens up to the attention core, whose saved state is linear too
(flash-style: output and log-sum-exp).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from model.llama import Block, _maybe_recompute
from parallel.pipeline_schedule import max_in_flight


def _set_block_mode(block: Block, mode: str) -> None:
    selective = mode == "selective"
    block.recompute_norms = selective
    block.attention.recompute_core = selective
    block.mlp.recompute_act = selective


def saved_bytes(block: Block, tokens: int, mode: str, device, dtype, tp: int = 1,
                sequence_parallel: bool = False) -> int:  # fmt: skip
    """Bytes saved for backward by one forward of `block` over `tokens` tokens (two documents),
    on this rank. Collective under tensor parallelism: every TP rank must call it."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != 0:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    hidden = block.attention_norm.weight.shape[0]
    local = tokens // tp if sequence_parallel else tokens  # the residual stream's token shard
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(local, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    half = tokens // 2
    positions = torch.cat([torch.arange(half), torch.arange(tokens - half)]).to(device)
    cu = torch.tensor([0, half, tokens], dtype=torch.int32, device=device)
    old = (block.recompute_norms, block.attention.recompute_core, block.mlp.recompute_act)
    _set_block_mode(block, mode)
    # Dropout draws from the global generators: fork them so the run's random stream (restored
    # from a checkpoint, say) is the same with or without this measurement.
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = _maybe_recompute(
                    mode == "full", block, h, positions, cu, max(half, tokens - half)
                )
        del out
    finally:
        block.recompute_norms, block.attention.recompute_core, block.mlp.recompute_act = old
    return sum(saved.values())


def _drops(block: Block) -> bool:
    """Whether the block's hidden dropout is active (it then saves two masks for backward)."""
    return float(getattr(block.dropout, "p", 0.0)) > 0.0


def activation_report(
    model: nn.Module | list[nn.Module], tokens: int, device, dtype
) -> dict[str, float]:
    """Bytes per layer per token (of the micro-batch, held on this rank) for none / selective /
    full recompute: the mean over the model's local blocks (over every chunk's, given the list
    of an interleaved rank's model chunks). All blocks have the same shape, but
    a block without dropout (LIMA's bottom layer at rate 0, the first stage's first block) saves
    no dropout masks, so one block of each kind is measured and weighted by how many there are.
    Collective under tensor parallelism: every rank of the model must call it (the TP ranks of
    a stage hold the same layers, so they measure the same kinds in the same order)."""
    chunks = model if isinstance(model, list | tuple) else [model]
    blocks = [block for chunk in chunks for block in chunk.layers.values()]
    model = chunks[0]  # the chunks of a rank share tp and sequence parallelism
    kinds: dict[bool, list[Block]] = {}
    for block in blocks:
        kinds.setdefault(_drops(block), []).append(block)
    tp = getattr(model, "tp", 1)
    sp = getattr(model, "sequence_parallel", False)
    out = {}
    for mode in ("none", "selective", "full"):
        total = sum(len(members) * saved_bytes(members[0], tokens, mode, device, dtype, tp, sp)
                    for members in kinds.values())  # fmt: skip
        out[mode] = total / (len(blocks) * tokens)
    return out


def state_bytes(trainer) -> tuple[int, int, int]:
    """(weights, fp32 gradients, optimizer state) bytes this rank holds on its device; the
    gradients include the distributed optimizer's reduced pieces when they are a separate
    buffer."""
    weights = sum(p.numel() * p.element_size() for _, p in trainer.named_parameters())
    buf = trainer.grads
    grads = buf.buffer.numel() * 4
    if buf.local_grad.data_ptr() != buf.buffer.data_ptr():
        grads += buf.local_grad.numel() * 4
    return weights, grads, trainer.optimizer.state_bytes()


def state_memory_line(trainer) -> str:
    """One log line: the bytes of weights, fp32 gradients and optimizer state on this rank (what
    the distributed optimizer divides by DP is the last)."""
    gib = 2**30
    weights, grads, optim = state_bytes(trainer)
    buf = trainer.grads
    how = f"distributed over dp {buf.dp_size}" if buf.sharded else "replicated on each DP rank"
    host = getattr(trainer.optimizer, "host_state_bytes", lambda: 0)()
    if host:
        how += f"; {host / gib:.3f} GiB more in host memory"
    return (f"states on this rank: weights {weights / gib:.3f} GiB, fp32 gradients "
            f"{grads / gib:.3f} GiB, optimizer {optim / gib:.3f} GiB ({how})")  # fmt: skip


@dataclass
class PeakEstimate:
    """What one rank should hold at the peak of a step, in bytes (an estimate: allocator
    fragmentation and kernel workspaces come on top)."""

    states: float  # allocated now: weights, gradient buffer, optimizer state on the device
    activations: float  # saved for backward by the micro-batches in flight
    logits: float  # the last stage's logits of one micro-batch, their gradient, the head's output
    in_flight: int  # (micro-batch, chunk) forwards awaiting their backward at most
    layers: float  # per chunk
    mode: str  # recompute granularity

    @property
    def total(self) -> float:
        return self.states + self.activations + self.logits


def peak_estimate(trainer, per_token: dict[str, float], mode: str | None = None) -> PeakEstimate:
    """The peak of a step on this rank, from the states allocated now, the activation bytes per
    token and layer `per_token` measured by `activation_report`, and the pipeline's in-flight
    bound. With --recompute_method block only the first recompute_num_layers of a chunk are
    fully recomputed; the others keep everything. mode: the recompute granularity the layers
    were set to, when not the run's (a benchmark switching them)."""
    rc, dims = trainer.rc, trainer.dims
    loop = rc.loop
    tokens = rc.data.micro_batch_size * rc.data.seq_length
    chunks = len(trainer.stages)
    layers = sum(len(s.layers) for s in trainer.stages) / chunks
    mode = mode or loop.recompute_granularity
    if mode == "full" and loop.recompute_method == "block":
        full = min(loop.recompute_num_layers, layers)
        per_layer = (full * per_token["full"] + (layers - full) * per_token["none"]) / layers
    else:
        per_layer = per_token[mode]
    in_flight = max_in_flight(dims.pp, dims.pp_rank, loop.num_microbatches, chunks)
    # plus, during one layer's backward, what its recomputation rebuilds on top of what it kept
    recomputed = max(per_token["none"] - min(per_token[mode], per_layer), 0.0) * tokens
    activations = per_layer * tokens * layers * in_flight + recomputed
    logits = 0.0
    if dims.is_last_stage:
        width = trainer.padded_vocab // dims.tp
        logits = 3.0 * tokens * width * torch.finfo(trainer.dtype).bits / 8
    device = trainer.device
    if device.type == "cuda":
        states = float(torch.cuda.memory_allocated(device))
    else:
        states = float(sum(state_bytes(trainer)))
    return PeakEstimate(states, activations, logits, in_flight, layers, mode)


def peak_line(est: PeakEstimate, device) -> tuple[str, bool]:
    """(log line, whether it looks too large for the device: over 92% of its memory)."""
    gib = 2**30
    line = (f"memory estimate at the step's peak on this rank: states {est.states / gib:.2f} + "
            f"activations {est.activations / gib:.2f} ({est.in_flight} micro-batch chunk(s) in "
            f"flight x {est.layers:g} layers, {est.mode} recompute) + logits "
            f"{est.logits / gib:.2f} = {est.total / gib:.2f} GiB")  # fmt: skip
    device = torch.device(device)
    if device.type != "cuda":
        return line, False
    capacity = torch.cuda.get_device_properties(device).total_memory
    line += f" of {capacity / gib:.1f} GiB on {device}"
    return line, est.total > 0.92 * capacity
