"""The one step that makes a Llama tensor/sequence parallel, and moving weights between the full
(TP=1) layout and the sharded one.

    model = Llama(cfg)                      # full model, any padded vocabulary >= cfg.vocab_size
    model.init_weights(generator)           # or load a full state dict
    model = parallelize(model, dims, sequence_parallel=True)

`parallelize` slices the model's own weights, so a TP run starts from exactly the slices of the
TP=1 model built from the same seed. A model built on the meta device is sharded on meta (no full
tensor is ever materialised); fill it afterwards with `materialize(model, device)` (not plain
`to_empty`, which replaces the parameters and drops their layout attributes) and
`load_full_state_dict` or a sharded checkpoint.

The vocabulary is re-padded to `cfg.padded_vocab_size(tp)`: rows below `cfg.vocab_size` are
copied, padding rows are zero. Padding rows never matter: ids there raise in the embedding and
the loss excludes their logits.
"""

from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from model.llama import Llama
from parallel.comm import all_gather_dim0, group_rank, group_size
from parallel.dims import ParallelDims
from parallel.layers import (
    LAYOUT_ATTRS,
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelDropout,
    VocabParallelEmbedding,
    check_token_ids,
    mark_sharded,
)


def _mark_full(model: Llama) -> None:
    """TP=1: every parameter is the whole tensor. Matrices keep their would-be TP dim (so the
    checkpoint metadata is the same at any TP size), norms are replicated."""
    cfg = model.cfg
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    f = cfg.ffn_hidden_size
    for name, p in model.named_parameters():
        if name.endswith("attention.wqkv.weight"):
            mark_sharded(p, 0, [(0, q), (q, kv), (q + kv, kv)], p.shape, 0)
        elif name.endswith("mlp.w13.weight"):
            mark_sharded(p, 0, [(0, f), (f, f)], p.shape, 0)
        elif name.endswith(("attention.wo.weight", "mlp.w2.weight")):
            mark_sharded(p, 1, [(0, p.shape[1])], p.shape, 0)
        elif name in ("embed.weight", "output.weight"):
            mark_sharded(p, 0, [(0, p.shape[0])], p.shape, 0)
            p.vocab_rows = cfg.vocab_size
        else:
            mark_sharded(p, None, [], p.shape, 0)


def _embed_id_check(vocab_size: int):
    def hook(module, args):
        # `check_ids = False`: the caller checked the host copy (see VocabParallelEmbedding)
        if getattr(module, "check_ids", True):
            check_token_ids(args[0], vocab_size)

    return hook


def parallelize(model: Llama, dims: ParallelDims, sequence_parallel: bool = False) -> Llama:
    """Replace the model's linear/embedding layers, in place, by their TP/SP versions.

    tp == 1: the model is returned unchanged apart from the layout attributes on every parameter
    and an id-range check on the embedding (sequence_parallel is then a no-op, as in Megatron).
    tp > 1: wqkv (per [q | k | v] segment, so each rank owns whole KV groups) and w13 (per
    [gate | up]) become column-parallel, wo and w2 row-parallel, the embedding vocab-parallel, and
    the output head column-parallel producing vocab-sharded logits (tokens, padded_vocab / tp)
    that are never gathered. With sequence_parallel the residual stream, the norms and the hidden
    dropout run on the token shard (tokens / tp, hidden); norm weights get `sequence_parallel =
    True`, and GradBuffer all-reduces their gradients over TP.
    """
    cfg, tp, group, rank = model.cfg, dims.tp, dims.tp_group, dims.tp_rank
    if tp > 1 and group_size(group) != tp:
        raise ValueError(
            f"ParallelDims says tp={tp} but its tp_group has {group_size(group)} ranks"
        )
    cfg.validate(tp)
    sp = sequence_parallel and tp > 1
    model.sequence_parallel = sp
    model.tp = tp
    if tp == 1:
        _mark_full(model)
        if model.embed is not None:
            model.embed.register_forward_pre_hook(_embed_id_check(cfg.vocab_size))
        return model

    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    vocab = cfg.padded_vocab_size(tp)

    def swap(old: nn.Module, make, vocab_rows: int | None = None) -> nn.Module:
        new = make(device=old.weight.device, dtype=old.weight.dtype)
        if vocab_rows is not None:
            new.weight.vocab_rows = vocab_rows
        if not old.weight.is_meta:
            with torch.no_grad():
                new.weight.copy_(take_shard(old.weight.detach(), new.weight))
        return new

    for block in model.layers.values():
        att, mlp = block.attention, block.mlp
        att.wqkv = swap(att.wqkv, partial(ColumnParallelLinear, h, [q, kv, kv], group, sp))
        att.wo = swap(att.wo, partial(RowParallelLinear, q, h, group, sp))
        att.n_heads = cfg.num_attention_heads // tp
        att.n_kv_heads = cfg.num_kv_heads // tp
        mlp.w13 = swap(mlp.w13, partial(ColumnParallelLinear, h, [f, f], group, sp))
        mlp.w2 = swap(mlp.w2, partial(RowParallelLinear, f, h, group, sp))
        if sp:
            block.dropout = SequenceParallelDropout(block.dropout.p, rank)
        for norm in (block.attention_norm, block.mlp_norm):
            _mark_norm(norm.weight, sp, tp, rank)
    if model.embed is not None:
        make = partial(VocabParallelEmbedding, vocab, h, cfg.vocab_size, group, sp)
        model.embed = swap(model.embed, make)
        if sp and isinstance(model.embed_dropout, nn.Dropout):  # on the embedding's token shard
            model.embed_dropout = SequenceParallelDropout(model.embed_dropout.p, rank)
    if model.norm is not None:
        _mark_norm(model.norm.weight, sp, tp, rank)
    if model.output is not None:
        make = partial(ColumnParallelLinear, h, [vocab], group, sp)
        model.output = swap(model.output, make, vocab_rows=cfg.vocab_size)
    model.padded_vocab = vocab
    return model


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model.to_empty(device)` keeping the layout attributes; values are uninitialised."""
    saved = {
        n: {a: getattr(p, a) for a in LAYOUT_ATTRS if hasattr(p, a)}
        for n, p in model.named_parameters()
    }
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        for a, v in saved[n].items():
            setattr(p, a, v)
    return model


def _mark_norm(p: nn.Parameter, sp: bool, tp: int, rank: int) -> None:
    mark_sharded(p, None, [], p.shape, rank)
    # Under SP each rank's norm-weight gradient covers only its tokens: GradBuffer sums over TP.
    p.sequence_parallel = sp
    p.tp_size = tp


def _fit_rows(full: torch.Tensor, rows: int, vocab_rows: int) -> torch.Tensor:
    """Re-pad a vocabulary-sized dim 0 to `rows`: real rows copied, padding rows zero."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] < vocab_rows:
        raise ValueError(
            f"vocabulary tensor has {full.shape[0]} rows, fewer than vocab_size {vocab_rows}"
        )
    # Only the real rows: the source's own padding rows (noise in a randomly initialised model)
    # would otherwise land in some of the new padding rows and not in others.
    out = full.new_zeros((rows, *full.shape[1:]))
    out[:vocab_rows] = full[:vocab_rows]
    return out


def take_shard(full: torch.Tensor, p: nn.Parameter, name: str = "") -> torch.Tensor:
    """This rank's local piece of the full tensor `full`, laid out like `p` (which carries the
    layout attributes). Vocabulary tensors may come at another padding."""
    vocab_rows = getattr(p, "vocab_rows", None)
    if vocab_rows is not None:
        full = _fit_rows(full, p.global_shape[0], vocab_rows)
    if tuple(full.shape) != tuple(p.global_shape):
        raise ValueError(
            f"{name or 'tensor'}: full shape {tuple(full.shape)} does not match the model's "
            f"{tuple(p.global_shape)}; was the state dict made for another model config?"
        )
    if p.tp_dim is None:
        return full
    parts = [full.narrow(p.tp_dim, start, n) for start, n in p.tp_pieces]
    return torch.cat(parts, dim=p.tp_dim) if len(parts) > 1 else parts[0]


def shard_state_dict(model: nn.Module, full_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The local shards of a full (TP=1) state dict for a parallelized model (any TP size).

    Keys the model lacks are ignored (a pipeline stage takes its own layers); a missing key raises.
    """
    missing = [n for n, _ in model.named_parameters() if n not in full_sd]
    if missing:
        raise KeyError(
            f"full state dict lacks {len(missing)} of the model's parameters: {missing[:5]}"
        )
    return {n: take_shard(full_sd[n], p, n) for n, p in model.named_parameters()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full_sd: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices of the full (TP=1) state dict `full_sd` into the parallel model."""
    local = shard_state_dict(model, full_sd)
    for n, p in model.named_parameters():
        p.copy_(local[n])


def gather_full(local: torch.Tensor, p: nn.Parameter, group) -> torch.Tensor:
    """The full tensor (p.global_shape) from every TP rank's `local` (laid out like `p`, e.g. the
    parameter itself or its main_grad). Collective over `group`."""
    if p.tp_dim is None or group_size(group) == 1:
        return local.reshape(p.global_shape) if p.tp_dim is None else local
    size, me = group_size(group), group_rank(group)
    d = p.tp_dim
    every = all_gather_dim0(local.movedim(d, 0).contiguous(), group)  # (size * local_d, ...)
    every = every.chunk(size, dim=0)
    out = local.new_empty(p.global_shape).movedim(d, 0)
    for r in range(size):
        offset = 0
        for start, n in p.tp_pieces:
            g = start + (r - me) * n
            out[g : g + n] = every[r][offset : offset + n]
            offset += n
    return out.movedim(0, d)


def full_state_dict(model: nn.Module, group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Gather every parameter (or, with grads, its main_grad / grad) to full size on every rank."""
    out = {}
    for n, p in model.named_parameters():
        t = (p.main_grad if hasattr(p, "main_grad") else p.grad) if grads else p.detach()
        out[n] = gather_full(t, p, group)
    return out


def sync_check(model: nn.Module, group) -> None:
    """Raise if replicated parameters differ across `group` (a debugging aid for layouts)."""
    if group_size(group) == 1:
        return
    for n, p in model.named_parameters():
        if getattr(p, "tp_replicated", False):
            ref = p.detach().clone()
            dist.broadcast(ref, src=dist.get_global_rank(group, 0), group=group)
            if not torch.equal(ref, p.detach()):
                raise RuntimeError(f"{n} differs across tensor-parallel ranks")
