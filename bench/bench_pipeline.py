"""Pipeline bubble of PipelineExecutor on CPU ranks (gloo) against the schedule's ideal.

    python -m bench.bench_pipeline [--fwd_ms 20 --bwd_ms 40 --repeats 3 --configs 2x4,4x8x2]

Each rank runs a synthetic stage whose forward sleeps t_fwd / v and backward t_bwd / v (v virtual
chunks), so the ideal is known exactly: busy time m (t_fwd + t_bwd) per rank and a bubble of
(p - 1) / v / (m + (p - 1) / v) of the step (Narayanan et al. 2021; (p - 1) / (m + p - 1) for
1F1B). Sleeping rather than computing keeps the stages' cost fixed on a shared 2-core machine,
so what the table shows beyond the ideal is the executor's own cost (scheduling, P2P, Python).

Measured: makespan = last rank's end - first rank's start of one step (CLOCK_MONOTONIC, same
host); idle fraction of a rank = 1 - (its measured time inside forward/backward) / makespan.
`sim` is `pipeline_schedule.simulate` with free messages (the schedule alone); `excess` is the
measured makespan over the ideal one. Messages are not free: `lat ms` is the measured one-way
time of one activation message (ping-pong between two ranks), `sim+lat` the simulated step with
that latency on every message, and `exec` the measured step over it, i.e. what the executor
itself adds beyond the schedule and the transport (on an oversubscribed CPU mostly process
wake-up delay). `cpu ms` is the CPU time a rank's process used during the step (all threads:
executor Python, autograd of the x * w stand-in, gloo I/O; sleeping costs none), the upper bound
of what the executor can add to the critical path. Writes bench/results/pipeline_bubble.json.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from parallel.dims import ParallelDims
from parallel.pipeline import PipelineExecutor
from parallel.pipeline_schedule import ideal_bubble, schedule, simulate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_CONFIGS = "2x4,2x8,2x16,4x4,4x8,4x16,4x8x2,4x16x2,8x16,8x16x2"


class _Sleep(torch.autograd.Function):
    """fwd: y = x * w after sleeping t_fwd / bwd: grads after sleeping t_bwd; logs busy time."""

    @staticmethod
    def forward(ctx, x, w, stage):
        ctx.stage = stage
        ctx.save_for_backward(x, w)
        stage.busy(stage.t_fwd)
        return x * w

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        ctx.stage.busy(ctx.stage.t_bwd)
        return dy * w, (dy * x).sum(0), None


class SleepStage(nn.Module):
    """A stage of known cost: forward t_fwd seconds, backward t_bwd seconds."""

    def __init__(self, hidden: int, t_fwd: float, t_bwd: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(hidden))
        self.t_fwd, self.t_bwd = t_fwd, t_bwd
        self.busy_s = 0.0

    def busy(self, seconds: float) -> None:
        t0 = time.monotonic()
        time.sleep(seconds)
        self.busy_s += time.monotonic() - t0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.w, self)


def _stage_forward(stage: SleepStage, x: torch.Tensor | None, mb: dict) -> torch.Tensor:
    return stage(mb["x"] if x is None else x)


def _one_way_latency(dims: ParallelDims, shape: tuple[int, int], iters: int = 30) -> float:
    """Median one-way time of one activation message between pipeline ranks 0 and 1 (ping-pong
    with the executor's batch_isend_irecv), in seconds; the other ranks wait at the barrier."""
    buf = torch.randn(shape)
    times = []
    peer = dims.pp_ranks[1 - dims.pp_rank] if dims.pp_rank < 2 else None
    for _ in range(iters):
        dist.barrier()
        if peer is None:
            continue
        t0 = time.monotonic()
        order = ("isend", "irecv") if dims.pp_rank == 0 else ("irecv", "isend")
        for op in order:
            fn = dist.isend if op == "isend" else dist.irecv
            for req in dist.batch_isend_irecv([dist.P2POp(fn, buf, peer, dims.pp_group)]):
                req.wait()
        times.append((time.monotonic() - t0) / 2)
    got = [None] * dims.pp
    dist.all_gather_object(got, statistics.median(times) if times else None)
    return got[0]


def _worker(rank: int, world: int, store: str, configs: list, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dims = ParallelDims.build(tp=1, pp=world, backend="gloo")
    shape = (args["tokens"], args["hidden"])
    PipelineExecutor([SleepStage(shape[1], 0, 0)], dims, shape)  # connects the pipeline group
    latency = _one_way_latency(dims, shape)
    rows = []
    for p, m, v in configs:
        t_fwd, t_bwd = args["fwd_ms"] / 1e3 / v, args["bwd_ms"] / 1e3 / v
        stages = [SleepStage(shape[1], t_fwd, t_bwd) for _ in range(v)]
        executor = PipelineExecutor(stages, dims, shape, forward_fn=_stage_forward)
        mbs = [{"x": torch.randn(shape)} for _ in range(m)]
        samples = []
        for rep in range(args["repeats"] + 1):  # the first step warms up connections
            for s in stages:
                s.busy_s = 0.0
            dist.barrier()
            c0, t0 = time.process_time(), time.monotonic()
            executor.step(mbs, lambda out, mb: out.sum())
            t1, c1 = time.monotonic(), time.process_time()
            busy = sum(s.busy_s for s in stages)
            got = [None] * world
            dist.all_gather_object(got, (t0, t1, busy, c1 - c0))
            if rep:
                makespan = max(g[1] for g in got) - min(g[0] for g in got)
                idle = [1 - g[2] / makespan for g in got]
                samples.append((makespan, idle, statistics.mean(g[3] for g in got)))
        if rank == 0:
            makespan, idle, cpu = sorted(samples)[len(samples) // 2]  # the median step
            ideal_busy = m * (args["fwd_ms"] + args["bwd_ms"]) / 1e3
            ideal_b = ideal_bubble(p, m, v)
            sim = simulate(p, m, v, args["fwd_ms"], args["bwd_ms"])
            sim_lat = simulate(p, m, v, args["fwd_ms"], args["bwd_ms"], latency=latency * 1e3)
            rows.append(
                {
                    "p": p,
                    "m": m,
                    "v": v,
                    "ideal_bubble": ideal_b,
                    "sim_bubble": max(sim.bubble(r) for r in range(p)),
                    "measured_bubble_mean": statistics.mean(idle),
                    "measured_bubble_max": max(idle),
                    "measured_bubble_per_rank": idle,
                    "step_ms": makespan * 1e3,
                    "ideal_step_ms": ideal_busy / (1 - ideal_b) * 1e3,
                    "message_latency_ms": latency * 1e3,
                    "cpu_ms_per_rank": cpu * 1e3,
                    "actions_per_rank": len(schedule(p, 0, m, v)),
                    "sim_step_ms_with_latency": sim_lat.makespan,
                    "steps_ms": [s[0] * 1e3 for s in samples],
                }
            )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def _pp1_overhead(shape: tuple[int, int] = (1, 8), m: int = 200) -> dict:
    """The executor's own bookkeeping per micro-batch: PP=1 (no messages) versus a plain
    forward/backward loop over the same zero-cost stage, in microseconds per micro-batch. A tiny
    activation keeps allocator effects (large blocks going to mmap or not) out of the difference."""
    torch.set_num_threads(1)
    stage = SleepStage(shape[1], 0.0, 0.0)
    stage.busy = lambda seconds: None
    executor = PipelineExecutor([stage], ParallelDims(), shape, forward_fn=_stage_forward)
    mbs = [{"x": torch.randn(shape)} for _ in range(m)]
    best_exec = best_loop = float("inf")
    for _ in range(15):
        t0 = time.perf_counter()
        executor.step(mbs, lambda out, mb: out.sum())
        best_exec = min(best_exec, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for mb in mbs:
            stage(mb["x"]).sum().backward()
        best_loop = min(best_loop, time.perf_counter() - t0)
    return {"executor_us": best_exec / m * 1e6, "plain_loop_us": best_loop / m * 1e6}


def _parse(configs: str) -> list[tuple[int, int, int]]:
    out = []
    for c in configs.split(","):
        parts = [int(x) for x in c.split("x")]
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fwd_ms", type=float, default=20.0, help="forward cost of a whole stage")
    ap.add_argument("--bwd_ms", type=float, default=40.0, help="backward cost of a whole stage")
    ap.add_argument("--tokens", type=int, default=512, help="activation rows per micro-batch")
    ap.add_argument("--hidden", type=int, default=256, help="activation width")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per config (median)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="PxM[xV],... pipeline x micro")
    ap.add_argument("--out", default=os.path.join(RESULTS, "pipeline_bubble.json"))
    args = ap.parse_args()
    configs = _parse(args.configs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in sorted({c[0] for c in configs}):
            mine = [c for c in configs if c[0] == p]
            part = os.path.join(tmp, f"p{p}.json")
            mp.spawn(
                _worker,
                args=(p, os.path.join(tmp, f"store{p}"), mine, vars(args), part),
                nprocs=p,
            )
            with open(part) as f:
                rows += json.load(f)
    header = (
        f"{'p':>2} {'m':>3} {'v':>2} | {'ideal':>6} {'sim':>6} {'measured':>8} {'max rank':>8} | "
        f"{'step ms':>8} {'ideal ms':>8} {'excess':>7} | {'lat ms':>6} {'sim+lat':>8} {'exec':>6} "
        f"| {'cpu ms':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        excess = r["step_ms"] / r["ideal_step_ms"] - 1
        own = r["step_ms"] / r["sim_step_ms_with_latency"] - 1
        print(
            f"{r['p']:>2} {r['m']:>3} {r['v']:>2} | {r['ideal_bubble']:>6.3f} "
            f"{r['sim_bubble']:>6.3f} {r['measured_bubble_mean']:>8.3f} "
            f"{r['measured_bubble_max']:>8.3f} | {r['step_ms']:>8.1f} {r['ideal_step_ms']:>8.1f} "
            f"{excess:>+7.1%} | {r['message_latency_ms']:>6.2f} "
            f"{r['sim_step_ms_with_latency']:>8.1f} {own:>+6.1%} | {r['cpu_ms_per_rank']:>6.1f}"
        )
    pp1 = _pp1_overhead()
    print(
        f"PP=1, zero-cost stage: executor {pp1['executor_us']:.0f} us per micro-batch (forward + "
        f"backward) vs plain loop {pp1['plain_loop_us']:.0f} us"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {
        "bench": "pipeline_bubble",
        "backend": "gloo",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "activation_shape": [args.tokens, args.hidden],
        "fwd_ms": args.fwd_ms,
        "bwd_ms": args.bwd_ms,
        "repeats": args.repeats,
        "pp1_overhead": pp1,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
