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

A missing table, or one that cannot be read, does not parse, was measured on another card, or
has an entry that does not fit the kernel, never stops a run: the kernels warn once, naming the
file, and use their heuristics (`bench.tune` reads tables strictly, and refuses a bad one).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name for a card."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(card_name: str, directory: Path = TUNED_DIR) -> Path:
    return directory / f"{card_slug(card_name)}.json"


@functools.lru_cache(maxsize=8)
def load_table(
    path: Path, card: str | None = None, strict: bool = True
) -> dict[str, dict[str, dict]]:
    """The `ops` mapping of a table file; {} when the file does not exist.

    With `card` (the device's name), a table whose "card" field names another card is refused:
    its settings were measured elsewhere. A file that cannot be read or parsed, or has the wrong
    layout, is a ValueError naming the file (`strict`, as `bench.tune` reads it before merging),
    or (not `strict`, as the kernels read it at launch) a warning saying the heuristics are used
    instead, and {}: a bad table costs speed, never a crash.

    Cached per (path, card, strict) (a table is read once per process); `bench.tune` clears the
    cache after writing a new table so the same process measures with it."""
    try:
        return _read_ops(path, card)
    except ValueError as e:
        if strict:
            raise
        note(f"{e}; the kernels use their built-in heuristic launch settings instead")
        return {}


def _read_ops(path: Path, card: str | None) -> dict[str, dict[str, dict]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix it or delete it and rerun "
            "`python -m bench.tune`"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: cannot be read as a text file ({e}); fix it or delete it and rerun "
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
    written_for = data.get("card")
    if (
        card is not None
        and written_for is not None
        and card_slug(str(written_for)) != card_slug(card)
    ):
        raise ValueError(
            f"{path}: measured on {written_for!r}, not on this card ({card!r}); delete it and "
            "rerun `python -m bench.tune` on this card"
        )
    return ops


@functools.lru_cache(maxsize=64)
def note(message: str) -> None:
    """Warn once per distinct message (a lookup runs at every kernel launch)."""
    warnings.warn(message, UserWarning, stacklevel=3)


@functools.lru_cache(maxsize=8)
def _card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=8)
def _card_table_path(index: int, directory: Path) -> Path:
    # Cached: lookup runs on every kernel launch, so no device query or regex per call.
    return table_path(_card_name(index), directory)


def _card_table(device: torch.device, directory: Path) -> tuple[Path, dict[str, dict[str, dict]]]:
    """(the table's path, its ops) for a CUDA device's card; ops is {} for a missing or bad table."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = _card_table_path(index, directory)
    return path, load_table(path, _card_name(index), strict=False)


def lookup(op: str, key: str, device: torch.device, directory: Path = TUNED_DIR) -> dict | None:
    """The tuned parameters of `op` at `key` on `device`'s card, or None (use the heuristic).

    Only CUDA devices have tables: the interpreter and CPU paths always use the heuristic."""
    if device.type != "cuda":
        return None
    return _card_table(device, directory)[1].get(op, {}).get(key)


def apply(defaults, params: dict | None, source: str):
    """`defaults` (a NamedTuple config) with the fields named in `params` replaced.

    An unknown field or a value of the wrong type is an error naming `source` (the table file and
    entry), so a stale entry is never half applied (`tuned_config` then runs the heuristic)."""
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


def tuned_config(op: str, key: str, device: torch.device, defaults, check=None):
    """`defaults` overridden by the card's table entry for (op, key), if any.

    An entry that does not fit `defaults` (unknown or mistyped parameters, see `apply`) or that
    `check(config)` refuses (raises ValueError) is skipped with a warning: the heuristic runs."""
    params = lookup(op, key, device)
    if params is None:
        return defaults
    entry = f"ops[{op!r}][{key!r}]"
    try:
        cfg = apply(defaults, params, entry)
        try:
            check_launch_settings(cfg)
            if check is not None:
                check(cfg)
        except ValueError as e:
            raise ValueError(f"{entry}: {e}") from None
    except ValueError as e:
        where = f"{TUNED_DIR}/<card>.json"
        if device.type == "cuda" and torch.cuda.is_available():
            where = _card_table(device, TUNED_DIR)[0]
        note(f"{where} {e} The heuristic launch settings {defaults} are used instead.")
        return defaults
    return cfg


def check_launch_settings(cfg) -> None:
    """Raise ValueError unless the fields every family shares are launchable: `warps`, `rows`,
    `block` and `block_*` are powers of two (Triton's num_warps and tl.arange need them), `chunk`
    is 0 or a power of two, any other integer field is >= 1."""
    for name, value in cfg._asdict().items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        pow2 = value >= 1 and value & (value - 1) == 0
        if name in ("warps", "rows", "block") or name.startswith("block_"):
            ok = pow2
        elif name == "chunk":
            ok = value == 0 or pow2
        else:
            ok = value >= 1
        if not ok:
            raise ValueError(f"launch setting {name}={value} of {cfg} cannot be launched.")
