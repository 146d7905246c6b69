"""Short texts between ranks (start-up checks, save agreements) through a tensor all-reduce.

Not all_gather_object / broadcast_object_list: under torch 2.4 and 2.5 with gloo, a process that
used an object collective can hang in destroy_process_group (measured here, 3 ranks, 10 runs
each: 2 to 7 runs hung after object collectives, none after the same exchange as a tensor
all-reduce; torch 2.11 and 2.13 never hung). A run that trained and saved would then never
exit.
"""

import torch
import torch.distributed as dist

WIDTH = 1024  # bytes of each rank's text that travel; longer texts are cut


def _device() -> torch.device:
    """Where the backend wants collective tensors: NCCL takes CUDA tensors only."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_texts(text: str | None, width: int = WIDTH) -> list[str | None]:
    """Collective over the world group: every rank's `text` (None: nothing to say), by global
    rank, on every rank. One all-reduce of a (world, 1 + width) int32 tensor in which each rank
    fills its own row: the length + 1 (0 for None), then the UTF-8 bytes."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = torch.zeros(world, 1 + width, dtype=torch.int32)
    if text is not None:
        data = text.encode()[:width]
        rows[rank, 0] = len(data) + 1
        if data:  # torch.frombuffer refuses an empty buffer: "" is the length row alone
            rows[rank, 1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = rows.to(_device())
    dist.all_reduce(rows)
    out: list[str | None] = []
    for row in rows.cpu():
        n = int(row[0]) - 1
        # a cut inside a multi-byte character is replaced, not an error
        out.append(None if n < 0 else bytes(row[1 : 1 + n].to(torch.uint8).tolist()).decode(
            errors="replace"))  # fmt: skip
    return out


def rank_span(ranks: list[int]) -> str:
    """ "rank 3", "ranks 0-7, 9": sorted global ranks, runs collapsed (1024 ranks stay one line)."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


def agree(problem: str | None, width: int = WIDTH) -> str | None:
    """Collective over the world group in place of a barrier: None when no rank has a problem,
    else one text, the same on every rank, saying which ranks failed and why. Ranks with the
    same text are named together ("ranks 0-3, 6: ..."); when every rank says the same, the text
    alone (then it is no rank's peculiarity, and a one-process run says it that way too)."""
    views = gather_texts(problem, width)
    failed: dict[str, list[int]] = {}
    for r, text in enumerate(views):
        if text is not None:
            failed.setdefault(text, []).append(r)
    if not failed:
        return None
    if len(failed) == 1 and len(next(iter(failed.values()))) == len(views):
        return next(iter(failed))
    return "; ".join(f"{rank_span(ranks)}: {text}" for text, ranks in failed.items())
