"""Start-up check that every rank sees the same `--save` directory (a shared file system)."""

import os
import socket
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from parallel.host_text import gather_texts


def ranks_not_sharing(save_dir: str | os.PathLike, wait_s: float = 5.0) -> list[tuple[int, str]]:
    """Collective: the (global rank, host) of every rank that does not see a file global rank 0
    writes into `save_dir`; empty when all do (or without a process group).

    Every rank writes its shards into the directory rank 0 creates, and rank 0 renames it, so
    `--save` must be one directory on a file system all nodes share. On node-local storage the
    other nodes' writes fail only at the first save (after save_interval iterations, and with an
    error about disk space); this finds it before training. The probe's name is new to every
    rank (no NFS negative lookup cache to hide it); a rank that does not see it looks again for
    up to `wait_s` seconds, for file systems that publish a new file late."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    rank = dist.get_rank()
    token = gather_texts(uuid.uuid4().hex if rank == 0 else None)[0]
    probe = Path(save_dir) / f".shared_fs_probe_{token}"
    seen = False
    if rank == 0:
        try:
            probe.write_text(token)
            seen = True
        except OSError:  # reported as rank 0 not seeing it: the directory is not usable
            pass
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while rank != 0:
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    # "1host" / "0host"; also: every rank has looked
    views = gather_texts(f"{int(seen)}{socket.gethostname()}")
    if rank == 0:
        probe.unlink(missing_ok=True)
    return [(r, v[1:]) for r, v in enumerate(views) if v[0] != "1"]
