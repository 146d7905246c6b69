"""Sweep the launch settings of the memory-bound kernels on this card; write its tuning table.

    python3 -m bench.tune [--full] [--budget-s 90] [--dry-run]

For each (op, shape) it times every candidate the kernel family offers (`candidates_fwd` /
`candidates_bwd` in kernels/rmsnorm.py, `candidates` in swiglu.py and rotary.py,
`candidates_stats` / `candidates_grad` in cross_entropy.py) from CUDA-graph
replays, checks each candidate's output against the heuristic's, and keeps the fastest. A
candidate must beat the heuristic by MARGIN to replace it, so timing noise does not churn the
table. The result goes to kernels/tuned/<card>.json (commit it: the kernels read it through
kernels/tuning.py) and to $OUT when that is set. `make gpu-check` runs this as a section before
the kernel benchmarks, so those measure the tuned settings.

Order: two passes, the first FIRST_PASS candidates of every sweep (each family lists its
likeliest first), then the rest of each, so a budget that runs out has still timed every sweep's
likeliest settings; within a pass the shapes whose goals were missed on the last run come first.
--full adds the other model shapes (7B/13B/70B and the 70B tensor-parallel-8 shard).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import OURS, Row, Timing, graph_stream, seeded, time_graph

DTYPE = torch.bfloat16
EPS = 1e-5
THETA = 10000.0
SEQ = 4096  # packed sequence length: rotary positions restart every SEQ tokens
MARGIN = 0.02  # a candidate must be this much faster than the heuristic to replace it
MAX_REL_ERR = 1e-2  # a candidate's output against the heuristic's (bf16; reductions reorder)
REP_MS = 30  # timing per candidate: 10-call graphs replayed for about this long


@dataclass
class Sweep:
    """One op at one shape: the candidates (the heuristic first) and a call that runs one."""

    op: str  # the tuning table's op, e.g. "rmsnorm_bwd"
    key: str  # the table key the kernel looks up, e.g. "hidden=8192"
    shape: str  # for the rows
    nbytes: int  # minimum bytes moved (the GB/s denominator)
    candidates: Sequence  # NamedTuple configs
    make: Callable[[], Callable[[object], list[torch.Tensor]]]  # inputs once -> run(cfg)


def _rmsnorm_sweeps(shapes: list[tuple[int, int]], device: str) -> list[Sweep]:
    from kernels import rmsnorm as m

    out = []
    for tokens, hidden in shapes:

        def make_fwd(t=tokens, h=hidden):
            x, w = seeded(device, 1, ((t, h), DTYPE), ((h,), DTYPE))
            return lambda cfg: list(m._rmsnorm_fwd(x, w, EPS, cfg=cfg))

        def make_bwd(t=tokens, h=hidden):
            x, w, dy = seeded(device, 2, ((t, h), DTYPE), ((h,), DTYPE), ((t, h), DTYPE))
            rstd = torch.rsqrt(x.float().square().mean(-1) + EPS)
            return lambda cfg: list(m._rmsnorm_bwd(dy, x, w, rstd, cfg=cfg))

        b = torch.finfo(DTYPE).bits // 8
        key, shape = m.tune_key(hidden), f"{tokens}x{hidden}"
        out.append(
            Sweep(
                "rmsnorm_fwd",
                key,
                shape,
                m.rmsnorm_bytes(tokens, hidden, b),
                m.candidates_fwd(hidden),
                make_fwd,
            )
        )
        out.append(
            Sweep(
                "rmsnorm_bwd",
                key,
                shape,
                m.rmsnorm_bytes(tokens, hidden, b, True),
                m.candidates_bwd(hidden),
                make_bwd,
            )
        )
    return out


def _swiglu_sweeps(
    shapes: list[tuple[int, int]], device: str, passes=("fwd", "bwd")
) -> list[Sweep]:
    from kernels import swiglu as m

    out = []
    for tokens, ffn in shapes:

        def make_fwd(t=tokens, f=ffn):
            (gu,) = seeded(device, 3, ((t, 2 * f), DTYPE))
            return lambda cfg: [m._swiglu_fwd(gu, cfg=cfg)]

        def make_bwd(t=tokens, f=ffn):
            gu, dout = seeded(device, 4, ((t, 2 * f), DTYPE), ((t, f), DTYPE))
            return lambda cfg: [m._swiglu_bwd(dout, gu, cfg=cfg)]

        b = torch.finfo(DTYPE).bits // 8
        for p, make in (("fwd", make_fwd), ("bwd", make_bwd)):
            if p in passes:
                out.append(
                    Sweep(
                        f"swiglu_{p}",
                        m.tune_key(ffn),
                        f"{tokens}x{ffn}",
                        m.swiglu_bytes(tokens, ffn, b, p == "bwd"),
                        m.candidates(ffn),
                        make,
                    )
                )
    return out


def _rotary_sweeps(shapes: list[tuple[int, int, int, int]], device: str) -> list[Sweep]:
    from kernels import rotary as m

    out = []
    for tokens, heads, kv_heads, head_dim in shapes:

        def make(t=tokens, h=heads, kv=kv_heads, d=head_dim):
            q, k = seeded(device, 5, ((t, h, d), DTYPE), ((t, kv, d), DTYPE))
            pos = torch.arange(t, device=device) % SEQ
            # The model's table (kernels/rotary.py): each setting reads it or computes cos/sin
            # as its `cached` field says, so the sweep times both.
            table = m.cos_sin_table(SEQ, d, THETA, 1.0, torch.device(device))
            return lambda cfg: list(m._rotary_apply(q, k, pos, THETA, 1.0, cfg=cfg, cos_sin=table))

        b = torch.finfo(DTYPE).bits // 8
        out.append(
            Sweep(
                "rotary",  # the forward and the backward are the same kernel
                m.tune_key(heads, kv_heads, head_dim),
                f"{tokens}x{heads}/{kv_heads}x{head_dim}",
                m.rotary_bytes(tokens, heads, kv_heads, head_dim, b),
                m.candidates(heads, kv_heads, head_dim),
                make,
            )
        )
    return out


def _cross_entropy_sweeps(shapes: list[tuple[int, int, int]], device: str) -> list[Sweep]:
    from kernels import cross_entropy as m

    out = []
    for tokens, local, valid in shapes:

        def inputs(t=tokens, n=local, v=valid):
            (z,) = seeded(device, 6, ((t, n), DTYPE))
            labels = torch.randint(0, v, (t,), generator=torch.Generator().manual_seed(6))
            return z * 4, labels.to(device)

        def make_stats(v=valid):
            z, labels = inputs()
            return lambda cfg: list(m.ce_stats(z, labels, 0, v, cfg=cfg))

        def make_grad(v=valid):
            z, labels = inputs()
            mx, sm, _ = m.ce_stats(z, labels, 0, v)
            dloss = torch.ones(z.shape[0], device=z.device)
            return lambda cfg: [m.ce_grad(z, labels, 0, v, mx, sm, dloss, cfg=cfg)]

        b = torch.finfo(DTYPE).bits // 8
        key, shape = m.tune_key(local), f"{tokens}x{local}"
        for op, make, cands, backward in (
            ("cross_entropy_stats", make_stats, m.candidates_stats(local), False),
            ("cross_entropy_grad", make_grad, m.candidates_grad(local), True),
        ):
            nbytes = m.cross_entropy_bytes(tokens, local, b, backward)
            out.append(Sweep(op, key, shape, nbytes, cands, make))
    return out


def sweeps(full: bool, device: str) -> list[Sweep]:
    """Missed goals first (rmsnorm at 8192/4096, rotary, swiglu forward), then model shapes."""
    if device == "cpu":  # interpreter plumbing check: tiny shapes
        return (
            _rmsnorm_sweeps([(6, 96)], device)
            + _swiglu_sweeps([(4, 200)], device)
            + _rotary_sweeps([(5, 4, 2, 16)], device)
            + _cross_entropy_sweeps([(4, 384, 300)], device)
        )
    out = (
        _rmsnorm_sweeps([(8192, 8192), (16384, 4096)], device)
        + _rotary_sweeps([(16384, 32, 8, 128), (8192, 64, 8, 128)], device)
        # the backward met its goals (96% of copy, 1.55x compile): forward only in quick mode
        + _swiglu_sweeps([(8192, 28672), (16384, 11008)], device, passes=("fwd",))
        + _cross_entropy_sweeps([(8192, 32128, 32007)], device)
    )
    if full:
        out += (
            _swiglu_sweeps([(8192, 28672), (16384, 11008)], device, passes=("bwd",))
            + _rotary_sweeps(
                [(32768, 8, 1, 128), (16384, 32, 32, 128), (8192, 40, 40, 128)], device
            )
            + _rmsnorm_sweeps([(16384, 5120)], device)
            + _swiglu_sweeps([(16384, 3584), (8192, 13824)], device)
            + _cross_entropy_sweeps([(8192, 4016, 3895)], device)  # a TP 8 shard
        )
    return out


def _label(cfg) -> str:
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg._asdict().items())


def _graph_time(run: Callable[[], object]) -> Timing:
    with graph_stream():
        run()  # compile outside the capture
        return time_graph(run, rep=REP_MS)


FIRST_PASS = 6  # candidates of every sweep timed before the rest of any sweep


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _schedule(todo: list[Sweep], first_pass: int) -> list[tuple[int, int]]:
    """(sweep, candidate) pairs in timing order: the first `first_pass` candidates of every
    sweep (each family lists its likeliest first, the heuristic at 0), then the rest of each."""
    head = [(i, j) for i, sw in enumerate(todo) for j in range(min(first_pass, len(sw.candidates)))]
    tail = [(i, j) for i, sw in enumerate(todo) for j in range(first_pass, len(sw.candidates))]
    return head + tail


def run_sweeps(
    todo: list[Sweep],
    ceilings: dict,
    deadline: float | None = None,
    timer: Callable[[Callable[[], object]], Timing] = _graph_time,
    first_pass: int = FIRST_PASS,
) -> tuple[dict[str, dict[str, dict]], list[Row]]:
    """Time the candidates of every sweep; (the table's ops mapping, rows).

    Two passes (see `_schedule`), so a budget that runs out has still timed every sweep's
    likeliest settings instead of all of the first sweeps' and none of the last ones'. Rows: one
    per timed candidate (impl = its settings), plus an `ours` row per sweep for the chosen
    settings with its ratio to the heuristic. A candidate that fails or disagrees with the
    heuristic's output is reported and never chosen; a sweep whose heuristic fails, or that the
    budget never reached, keeps no entry."""
    ops: dict[str, dict[str, dict]] = {}
    rows: list[Row] = []
    started: dict[int, dict] = {}  # sweep index -> its inputs' run(), reference outputs, timings
    for i, j in _schedule(todo, first_pass):
        if deadline is not None and time.time() > deadline:
            break
        sw, cfg = todo[i], todo[i].candidates[j]
        st = started.setdefault(i, {"timed": []})
        if "run" not in st:
            try:  # inputs and the heuristic's outputs: a failure here loses this sweep only
                st["run"] = sw.make()
                st["refs"] = [t.clone() for t in st["run"](sw.candidates[0])]
            except Exception as e:
                st["run"], st["error"] = None, _why(e)
        run = st["run"]
        if run is None:
            continue
        row = Row("tune", f"{sw.op} {sw.key}", "bf16", "-", _label(cfg), bytes=sw.nbytes)
        try:
            if row.check_result(run(cfg), st["refs"], MAX_REL_ERR, "the heuristic's settings"):
                t = timer(lambda cfg=cfg, run=run: run(cfg))
                row.ms, row.ms_p20, row.ms_p80 = t.ms, t.p20, t.p80
                row.fill_rates(ceilings)
                st["timed"].append((t.ms, cfg, row))
        except Exception as e:  # e.g. out of registers / shared memory for this setting
            row.error = _why(e)
        rows.append(row)
    for i, sw in enumerate(todo):
        what = f"{sw.op} {sw.key}"
        st = started.pop(i, None)
        if st is None:
            rows.append(Row("tune", what, "bf16", "-", OURS, error="skipped: budget spent"))
            continue
        timed, base = st["timed"], sw.candidates[0]
        base_ms = next((ms for ms, cfg, _ in timed if cfg == base), None)
        if base_ms is None:
            why = f": {st['error']}" if st.get("error") else ""
            rows.append(
                Row("tune", what, "bf16", "-", OURS, error=f"the heuristic's settings failed{why}")
            )
            continue
        best_ms, best, best_row = min(timed, key=lambda x: x[0])
        if best_ms * (1 + MARGIN) > base_ms:  # not clearly faster: keep the heuristic
            best_ms, best = base_ms, base
            best_row = next(r for ms, cfg, r in timed if cfg == base)
        ops.setdefault(sw.op, {})[sw.key] = {
            k: (bool(v) if isinstance(v, bool) else v) for k, v in best._asdict().items()
        }
        untimed = len(sw.candidates) - len([r for r in rows if r.shape == what])
        chosen = Row(
            "tune",
            what,
            "bf16",
            "-",
            OURS,
            ms=best_ms,
            ms_p20=best_row.ms_p20,
            ms_p80=best_row.ms_p80,
            bytes=sw.nbytes,
            note=f"{sw.shape}: {_label(best)}"
            + (" (the heuristic)" if best == base else "")
            + (f"; {untimed} candidates not reached" if untimed else ""),
        )
        chosen.fill_rates(ceilings)
        chosen.ratio_vs["heuristic"] = base_ms / best_ms
        rows.append(chosen)
    return ops, rows


def write_table(ops: dict, card: str, directory: Path, extra: dict | None = None) -> Path:
    """Write (merging into any existing table of this card) and return the table's path."""
    from kernels import tuning

    path = tuning.table_path(card, directory)
    old = tuning.load_table(path) if path.exists() else {}
    merged = {op: dict(entries) for op, entries in old.items()}
    for op, entries in ops.items():
        merged.setdefault(op, {}).update(entries)
    doc = {
        "card": card,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        **(extra or {}),
        "ops": {op: dict(sorted(e.items())) for op, e in sorted(merged.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a table
    tuning.load_table.cache_clear()
    return path


def gpu_rows(
    ceilings: dict, quick: bool, deadline: float | None = None, device: str = "cuda"
) -> list[Row]:
    """The sweep as a bench.gpu_check section: writes the card's table, returns the rows.

    On CPU (the --cpu-smoke plumbing check) there is nothing to tune: no rows."""
    if device != "cuda":
        return []
    from bench.gpu_check import git_commit

    card = torch.cuda.get_device_name(0)
    ops, rows = run_sweeps(sweeps(not quick, device), ceilings, deadline)
    extra = {"commit": git_commit()["commit"], "torch": torch.__version__}
    import triton

    extra["triton"] = triton.__version__
    path = write_table(
        ops, card, Path(__file__).resolve().parent.parent / "kernels" / "tuned", extra
    )
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"]) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text())
    print(f"tune: wrote {path}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also the other model shapes")
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop starting sweeps after this")
    ap.add_argument("--dry-run", action="store_true", help="list the sweeps and candidates only")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run:
        for sw in sweeps(args.full, device):
            print(f"{sw.op:12s} {sw.key:32s} {sw.shape:20s} {len(sw.candidates)} candidates")
        return 0
    if device != "cuda":
        print("bench.tune: no CUDA device: nothing to tune here (--dry-run lists the sweeps)")
        return 0
    from bench.harness import format_table, measure_ceilings

    rows = gpu_rows(measure_ceilings(), not args.full, time.time() + args.budget_s)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
