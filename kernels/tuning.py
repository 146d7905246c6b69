"""Per-card launch settings, measured once on the card and committed as data.

The memory-bound kernels (rmsnorm, swiglu, rotary) pick their launch settings from a heuristic
unless `kernels/tuned/<card>.json` names better ones for the shape at hand. Those files are
written by `python -m bench.tune` (also a section of `make gpu-check`), which times every
candidate setting a kernel family offers on the card and keeps the fastest.

Why a committed table and not `triton.autotune` at run time: the settings of a reduction (warps,
row groups) change its rounding, so a timing-noise-dependent choice would make runs differ from
each other and tensor-parallel ranks that normalise the same replicated rows differ from one
another. A table fixes the choice per card: every rank and every run uses the same settings.

File layout (JSON):
    {"card": "NVIDIA H200", "commit": "...", "date": "...",
     "ops": {"rmsnorm_bwd": {"hidden=8192": {"warps": 16, "programs_per_sm": 2}, ...}, ...}}
An op's kernel module says which keys and parameters it understands (its `_config`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name for a card."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(card_name: str, directory: Path = TUNED_DIR) -> Path:
    return directory / f"{card_slug(card_name)}.json"


@functools.lru_cache(maxsize=8)
def load_table(path: Path) -> dict[str, dict[str, dict]]:
    """The `ops` mapping of a table file; {} when the file does not exist.

    Cached per path (a table is read once per process); `bench.tune` clears the cache after
    writing a new table so the same process measures with it."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix it or delete it and rerun "
            "`python -m bench.tune`"
        ) from e
    ops = data.get("ops") if isinstance(data, dict) else None
    if not isinstance(ops, dict) or not all(
        isinstance(v, dict) and all(isinstance(p, dict) for p in v.values()) for v in ops.values()
    ):
        raise ValueError(
            f"{path}: expected {{'ops': {{op: {{key: {{param: value}}}}}}}}; fix it or delete it "
            "and rerun `python -m bench.tune`"
        )
    return ops


@functools.lru_cache(maxsize=8)
def _card_table_path(index: int, directory: Path) -> Path:
    # Cached: lookup runs on every kernel launch, so no device query or regex per call.
    return table_path(torch.cuda.get_device_name(index), directory)


def lookup(op: str, key: str, device: torch.device, directory: Path = TUNED_DIR) -> dict | None:
    """The tuned parameters of `op` at `key` on `device`'s card, or None (use the heuristic).

    Only CUDA devices have tables: the interpreter and CPU paths always use the heuristic."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return load_table(_card_table_path(index, directory)).get(op, {}).get(key)


def apply(defaults, params: dict | None, source: str):
    """`defaults` (a NamedTuple config) with the fields named in `params` replaced.

    An unknown field or a value of the wrong type is an error naming `source` (the table file and
    entry), so a stale table fails loudly instead of being half applied."""
    if not params:
        return defaults
    fields = type(defaults)._fields
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown parameter(s) {unknown}; this kernel takes {list(fields)}. "
            "Rerun `python -m bench.tune` to rewrite the table."
        )
    for name, value in params.items():
        want = type(getattr(defaults, name))
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(
                f"{source}: parameter {name}={value!r} should be {want.__name__}. "
                "Rerun `python -m bench.tune` to rewrite the table."
            )
    return defaults._replace(**params)


def tuned_config(op: str, key: str, device: torch.device, defaults):
    """`defaults` overridden by the card's table entry for (op, key), if any."""
    params = lookup(op, key, device)
    if params is None:
        return defaults
    return apply(defaults, params, f"{TUNED_DIR}/<card>.json ops[{op!r}][{key!r}]")
