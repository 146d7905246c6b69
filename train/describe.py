"""Human-readable lines about a run: the resolved configuration (--dry_run and start-up), the
predicted per-rank state footprint, and the notes on where the same flags train differently
from Megatron-LLM."""

from train.config import RunConfig
from train.footprint import GIB, footprint


def _epochs_line(prefix: str, seq_length: int, packing: bool, rows: int) -> str | None:
    """How many epochs of the training split `rows` rows (or samples: packing=False) are (None
    when the split is not here): one sample per row without packing; with packing at least
    tokens / seq_length rows an epoch (samples longer than a row are cut to it), so the figure
    is an upper bound."""
    from data.errors import DataError
    from data.indexed import IndexedDataset

    try:
        sizes = IndexedDataset(f"{prefix}-text").sizes.astype("int64")
    except (DataError, OSError, ValueError):
        return None
    if len(sizes) == 0:
        return None
    per_epoch = -(-int(sizes.clip(max=seq_length).sum()) // seq_length) if packing else len(sizes)
    about = "at most " if packing else ""
    return f"{about}{rows / per_epoch:.2f} epochs of its {len(sizes):,} samples"


def megatron_differences(ns, prefix: str, valid: str | None, global_bs: int,
                          train_iters: int) -> list[str]:  # fmt: skip
    """Where the same flags train differently from Megatron-LLM by design (../shared/DESIGN.md),
    said where a user sees it: the dry run and the start-up log print these notes."""
    rows = train_iters * global_bs
    out = [
        "learning rate: optimizer step s runs at lr(s); Megatron-LLM's ran at lr(s - 1), so its "
        "first step had lr 0 under warm-up (train/lr.py)"
    ]
    by_rows = ns.packing and ns.global_batch_unit == "rows"
    if by_rows:
        out.append(
            f"--global_batch_unit rows: a step is {global_bs} rows of {ns.seq_length} tokens, "
            "each packed with whole samples; Megatron-LLM took one padded sample per row, so "
            "the same --global_batch_size and --train_iters see several times as many samples "
            "and epochs (the default, --global_batch_unit samples, keeps its meaning)"
        )
    elif ns.packing:
        out.append(
            f"--packing: a step is {global_bs} samples (Megatron-LLM's one padded sample per "
            f"row), packed into as many rows of {ns.seq_length} tokens as they fill: the same "
            "samples and epochs, without the padding's compute; so a step runs the micro-batches "
            f"of {ns.micro_batch_size} rows those rows need, fewer than [loop] num_microbatches "
            "(the unpacked count, an upper bound) when samples are short"
        )
    epochs = _epochs_line(prefix, ns.seq_length, by_rows, rows)
    if epochs is not None:
        unit = "rows" if by_rows else "samples"
        out.append(f"--train_iters {train_iters} x {global_bs} {unit} = {epochs} ({prefix})")
    if valid is not None:
        out.append(
            f"validation reads {valid} and training all of {prefix}; Megatron-LLM given this one "
            "--data_path split it by --split (default 969,30,1): it trained on 96.9% and "
            "validated on 3% of it"
        )
    return out


def _human(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def state_footprint_line(rc: RunConfig) -> str:
    """The largest rank's weights, gradients and optimizer state, predicted (train.footprint)."""
    par = rc.parallel
    padded = rc.model.padded_vocab_size(par.tp)
    virtual = rc.model.num_layers // (par.pp * par.virtual_stage_layers) if (
        par.virtual_stage_layers
    ) else 1  # fmt: skip

    def fp(distributed: bool, offload: bool = False):
        return footprint(rc.model, padded, par.tp, par.pp, par.dp, rc.loop.bf16, distributed,
                         virtual, offload)  # fmt: skip

    where = "bf16 weights on GPU" if rc.loop.bf16 else "fp32 weights"
    ours = fp(rc.optim.distributed, rc.optim.cpu_offload)
    line = f"states on the largest rank ({where}, GiB): {ours.line()}, before activations"
    if par.dp > 1 and not rc.optim.distributed:
        line += f"; --use_distributed_optimizer would make it {fp(True).total_bytes / GIB:.2f}"
    return line


def describe(rc: RunConfig) -> str:
    """Human-readable resolved configuration (printed by --dry_run and at start-up)."""
    lines = ["------------------------ resolved configuration ------------------------"]
    for section, values in rc.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"  {k} {'.' * max(2, 40 - len(k))} {v}")
    m, tp = rc.model, rc.parallel.tp
    n = rc.param_count()
    per_rank = n / (tp * rc.parallel.pp)
    lines.append(
        f"parameters: {n:,} ({_human(n)}) with the vocabulary padded to "
        f"{m.padded_vocab_size(tp)} (vocab {m.vocab_size}, tp {tp}); per (tp, pp) rank about "
        f"{_human(per_rank)}"
    )
    lines.append(state_footprint_line(rc))
    for title, items in (
        ("notes", rc.notes),
        ("cannot run yet", rc.deferred),
        ("not checked here", rc.unchecked),
    ):
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  - {x}" for x in items)
    lines.append("-------------------------------------------------------------------------")
    return "\n".join(lines)
