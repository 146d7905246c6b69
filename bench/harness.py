"""One benchmark harness for every kernel family: timing, result rows, tables, JSON, ceilings.

Timing follows the lent-GPU method: on CUDA, `triton.testing.do_bench` (events around each
repetition, the L2 cache cleared before each one, warm-up first) and its median; on CPU a plain
timer, synchronising nothing because nothing is asynchronous there. Throughput is always the
effective rate at the minimum byte (or FLOP) count of the op, so it can be set against the
measured ceilings: a large device-to-device copy (bytes read + bytes written) for memory-bound
ops, an 8192^3 bf16 matmul for compute-bound ones.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

OURS = "ours"


@dataclass
class Timing:
    """Median and the 20th/80th percentiles of one measurement, in milliseconds."""

    ms: float
    p20: float
    p80: float


def time_quantiles(
    fn: Callable[[], object], warmup: int = 25, rep: int = 100, cuda: bool | None = None
) -> Timing:
    """Time `fn`. warmup and rep are milliseconds of running, as in do_bench.

    CUDA (the default when a device is present): do_bench's median and spread. CPU: `fn` once,
    then warm-up for `warmup` ms, then at least 3 and up to `rep` ms of timed calls.
    """
    if torch.cuda.is_available() if cuda is None else cuda:
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]
        )
        torch.cuda.synchronize()  # surface an asynchronous launch error here, not later
        return Timing(p50, p20, p80)
    fn()
    end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < end:
        fn()
    times: list[float] = []
    end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7])


def time_graph(fn: Callable[[], object], calls: int = 10, rep: int = 100) -> Timing:
    """Time `fn` from CUDA-graph replays: per-call median and spread, in milliseconds.

    For kernels of ~0.1 ms the host cost of a call (the autograd engine, Python launchers,
    allocations) is as long as the kernel itself, so event timing of eager calls measures the
    host. A graph of `calls` back-to-back calls replays with no host work in between; each
    replay's time / calls is one sample, replays repeat for about `rep` ms. Unlike do_bench the
    L2 is not cleared between calls: time inputs larger than L2 (every shape here is >= 100 MB).

    `fn` must already have run once (compilation, autotuning, cached tensors) and must run on the
    current stream, which must not be the legacy default stream (capture needs a side stream);
    whatever `fn` differentiates must have been built on that stream too, so its backward is
    captured with it. Callers use `graph_stream()` for both."""
    stream = torch.cuda.current_stream()
    fn()  # allocator warm-up on this stream before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    n = max(5, min(1000, int(rep / max(start.elapsed_time(end), 1e-3))))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) / calls for a, b in events]
    del graph
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7])


def graph_stream():
    """A context manager that makes a fresh side stream current (see time_graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(stream)


def release_cached_memory() -> None:
    """Hand the caching allocator's free blocks back to the device between measurements (the
    `finally` of every family's measurement; a no-op without CUDA).

    Never raises: after a sticky CUDA error (an illegal address in a kernel) every CUDA call
    fails, cudaFree too (the allocator's release_block is C10_CUDA_CHECK(cudaFree(...))), and a
    `finally` that raised would lose every row the section had measured. The error is already on
    the row that failed, and each later measurement fails on its own, loudly."""
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # torch.AcceleratorError, a poisoned context, is a RuntimeError
            pass


def time_ms(
    fn: Callable[[], object], warmup: int = 25, rep: int = 100, cuda: bool | None = None
) -> float:
    """Median time of `fn` in milliseconds (see time_quantiles)."""
    return time_quantiles(fn, warmup, rep, cuda).ms


@dataclass
class Row:
    """One measurement: an op at a shape, one pass, one implementation.

    ratio_vs maps a baseline's impl name to baseline_ms / ours_ms (> 1: ours is faster); it is
    filled on the `ours` row only. pct_of_ceiling is gbps over the measured copy bandwidth for
    memory-bound rows, tflops over the measured matmul rate for compute-bound ones. goals maps a
    metric ("pct_of_ceiling", "tflops" or a baseline's impl name) to its minimum; error is set
    when the measurement failed or its result disagreed with the reference.
    """

    op: str
    shape: str
    dtype: str
    pass_: str  # 'fwd' | 'bwd' | 'step', or a kernel of a pass (attn_kernels: 'dq', 'dkdv')
    impl: str
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    ms_rerun: float | None = None  # the same impl timed again later in the run (noise check)
    bytes: int | None = None
    flops: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_of_ceiling: float | None = None
    ratio_vs: dict[str, float] = field(default_factory=dict)
    rel_err: float | None = None  # ||out - reference|| / ||reference||
    goals: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def fill_rates(self, ceilings: dict) -> Row:
        """Set gbps / tflops / pct_of_ceiling from ms, bytes, flops and the measured ceilings."""
        if self.ms is None or self.ms <= 0:
            return self
        if self.bytes is not None:
            self.gbps = self.bytes / self.ms / 1e6
            if ceilings.get("copy_gbps"):
                self.pct_of_ceiling = 100.0 * self.gbps / ceilings["copy_gbps"]
        if self.flops is not None:
            self.tflops = self.flops / self.ms / 1e9
            if self.bytes is None and ceilings.get("matmul_tflops"):
                self.pct_of_ceiling = 100.0 * self.tflops / ceilings["matmul_tflops"]
        return self

    def check_result(self, result, refs, limit: float, against: str) -> bool:
        """Set rel_err of `result` against `refs`; past `limit`, set error (naming `against`,
        the implementation the reference came from) and return False."""
        self.rel_err = rel_err(result, refs)
        if self.rel_err <= limit:
            return True
        self.error = f"result differs from {against}: rel err {self.rel_err:.2e} > {limit:g}"
        return False

    def missed_goals(self) -> list[str]:
        """Goals this row does not meet (an unknown metric counts as missed)."""
        missed = []
        rates = {"pct_of_ceiling": self.pct_of_ceiling, "tflops": self.tflops}
        for metric, target in self.goals.items():
            value = rates[metric] if metric in rates else self.ratio_vs.get(metric)
            if value is None or not value >= target:
                shown = "?" if value is None else f"{value:.2f}"
                missed.append(f"{metric} {shown} < {target:g}")
        return missed


def case_key(row: Row) -> tuple[str, str, str, str]:
    return (row.op, row.shape, row.dtype, row.pass_)


def add_ratios(rows: list[Row], ours: str = OURS) -> None:
    """Fill ratio_vs on every `ours` row: each other impl's median over ours, same case."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(case_key(r), []).append(r)
    for group in groups.values():
        mine = [r for r in group if r.impl == ours and r.ms]
        for m in mine:
            for r in group:
                if r.impl != ours and r.ms:
                    m.ratio_vs[r.impl] = r.ms / m.ms


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines]
    return "\n".join(out)


def format_table(rows: Iterable[Row]) -> str:
    """Every row: op, shape, dtype, pass, impl, ms (p20-p80), GB/s, TFLOP/s, % ceiling, ratios."""
    lines = []
    for r in rows:
        spread = f" ({_fmt(r.ms_p20)}-{_fmt(r.ms_p80)})" if r.ms_p20 is not None else ""
        ratios = " ".join(f"{k}={v:.2f}x" for k, v in sorted(r.ratio_vs.items()))
        tail = f"ERROR: {r.error}" if r.error else ratios
        lines.append(
            [
                r.op,
                r.shape,
                r.dtype,
                r.pass_,
                r.impl,
                _fmt(r.ms, ".4g") + spread,
                _fmt(r.gbps, ".0f"),
                _fmt(r.tflops, ".1f"),
                _fmt(r.pct_of_ceiling, ".1f"),
                _fmt(r.rel_err, ".1e"),
                tail,
            ]
        )
    header = [
        "op",
        "shape",
        "dtype",
        "pass",
        "impl",
        "ms (p20-p80)",
        "GB/s",
        "TFLOP/s",
        "%ceil",
        "rel_err",
        "ratios (baseline/ours) or error",
    ]
    return _table(header, lines)


def format_summary(rows: list[Row], ours: str = OURS) -> str:
    """The short table: one line per case with ours' time, rate, % of ceiling, ratio to each
    baseline and the goals it misses; plus every failed row."""
    lines = []
    for r in rows:
        if r.impl != ours:
            continue
        rate = (
            f"{r.gbps:.0f} GB/s"
            if r.gbps is not None
            else (f"{r.tflops:.0f} TF/s" if r.tflops is not None else "-")
        )
        ratios = " ".join(f"{k}={v:.2f}" for k, v in sorted(r.ratio_vs.items()))
        missed = r.missed_goals()
        verdict = (
            "ERROR: " + (r.error or "")
            if r.error
            else ("MISSED " + "; ".join(missed) if missed else ("ok" if r.goals else ""))
        )
        lines.append(
            [
                r.op,
                r.shape,
                r.dtype,
                r.pass_,
                _fmt(r.ms, ".4g"),
                rate,
                _fmt(r.pct_of_ceiling, ".0f"),
                ratios,
                verdict,
            ]
        )
    for r in rows:
        if r.impl != ours and r.error:
            lines.append(
                [r.op, r.shape, r.dtype, r.pass_, "-", "-", "-", r.impl, "ERROR: " + r.error]
            )
    return _table(
        ["op", "shape", "dtype", "pass", "ms", "rate", "%ceil", "vs baselines (x)", "goals"], lines
    )


def print_table(rows: list[Row], file=None) -> None:
    print(format_table(rows), file=file or sys.stdout)


def write_json(rows: list[Row], meta: dict, path: str | Path) -> Path:
    """Write {"meta": ..., "rows": [...]} (plus any other top-level keys in meta["extra"])."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    extra = meta.pop("extra", {})
    doc = {"meta": meta, **extra, "rows": [r.to_dict() for r in rows]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)  # a process killed mid-write leaves the last whole file, never half a one
    return path


def read_json(path: str | Path) -> tuple[list[Row], dict]:
    """(rows, whole document) of a file written by write_json."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        # e.g. gpu_check's own <section>-rows.json logs, a bare list of rows: a ValueError, which
        # bench.plots reports as "not a gpu_check result" and skips, not an AttributeError
        raise ValueError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return [Row.from_dict(d) for d in doc.get("rows", [])], doc


def rel_err(outs, refs) -> float:
    """max over pairs of ||out - ref|| / ||ref||, in fp32 (the rows' `rel_err`)."""
    err = 0.0
    for o, r in zip(outs, refs):
        o, r = o.float(), r.float()
        e = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
        if math.isnan(e):  # max(0.0, nan) is 0.0: a NaN output would pass every check
            return e
        err = max(err, e)
    return err


def seeded(device: str, seed: int, *specs: tuple) -> list[torch.Tensor]:
    """Fresh normal tensors from one seed: specs are (shape, dtype) pairs. Never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        for shape, dtype in specs
    ]


def _randn(*shape, dtype, device) -> torch.Tensor:
    # Never zeros: they hide unwritten outputs and can run faster than real data.
    return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)


def measure_ceilings(device: str = "cuda", copy_mib: int = 2048, matmul_n: int = 8192) -> dict:
    """The two measured ceilings.

    copy_gbps: `dst.copy_(src)` of a copy_mib MiB buffer (far past L2), counted as bytes read +
    bytes written. matmul_tflops: bf16 (fp32 on CPU) `a @ b` at n^3, 2 n^3 FLOPs, random inputs.
    """
    cuda = device != "cpu"
    out: dict = {"device": device}
    n_bytes = copy_mib * 2**20
    t = _time_copy(n_bytes, device, cuda)
    out.update(copy_bytes=2 * n_bytes, copy_ms=t.ms, copy_gbps=2 * n_bytes / t.ms / 1e6)
    dtype = torch.bfloat16 if cuda else torch.float32
    t = _time_matmul(matmul_n, dtype, device, cuda)
    out.update(matmul_n=matmul_n, matmul_dtype=str(dtype), matmul_ms=t.ms)
    out["matmul_tflops"] = 2 * matmul_n**3 / t.ms / 1e9
    if cuda:
        torch.cuda.empty_cache()
    return out


def _time_copy(n_bytes: int, device: str, cuda: bool) -> Timing:
    src = _randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return time_quantiles(lambda: dst.copy_(src), warmup=25, rep=200, cuda=cuda)


def _time_matmul(n: int, dtype: torch.dtype, device: str, cuda: bool) -> Timing:
    a = _randn(n, n, dtype=dtype, device=device)
    b = _randn(n, n, dtype=dtype, device=device)
    return time_quantiles(lambda: a @ b, warmup=25, rep=200, cuda=cuda)


def telemetry(index: int = 0) -> dict:
    """Card, driver, clocks, power, memory and clock-limit reasons through nvidia-ml-py.

    Every field is read on its own, so a missing one is reported and the rest kept; without
    nvidia-ml-py or a driver, {"available": False, "reason": ...}.
    """
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py (pynvml) is not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver / no GPU
        return {"available": False, "reason": f"nvmlInit failed: {e}"}
    out: dict = {"available": True, "errors": {}}

    def read(key: str, fn: Callable[[], object]) -> None:
        try:
            v = fn()
            out[key] = v.decode() if isinstance(v, bytes) else v
        except Exception as e:
            out["errors"][key] = str(e)

    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        read("name", lambda: pynvml.nvmlDeviceGetName(h))
        read("driver", pynvml.nvmlSystemGetDriverVersion)
        read("cuda_driver", lambda: pynvml.nvmlSystemGetCudaDriverVersion_v2())
        read("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        read("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))
        read("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))
        read(
            "mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        )
        read("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1e3)
        read("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3)
        read(
            "temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        )
        read("memory_used_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
        read("memory_total_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30)
        read("clock_limit_reasons", lambda: _clock_reasons(pynvml, h))
    except Exception as e:
        out["errors"]["handle"] = str(e)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _clock_reasons(pynvml, h) -> list[str]:
    get = (
        getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    mask = get(h)
    names = [
        n
        for n in dir(pynvml)
        if n.startswith("nvmlClocksEventReason")
        and n not in ("nvmlClocksEventReasonAll", "nvmlClocksEventReasonNone")
    ]
    return sorted(
        n.removeprefix("nvmlClocksEventReason") for n in names if mask & getattr(pynvml, n)
    ) or ["None"]
