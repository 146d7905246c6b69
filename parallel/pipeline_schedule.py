"""Pipeline schedules as data: 1F1B and interleaved 1F1B, plus a simulator that proves them.

`schedule(pp_size, pp_rank, num_microbatches, virtual_stages)` returns the ordered list of
`Action`s one pipeline rank performs in one training step; `parallel/pipeline.py` runs it. Nothing
here touches torch.distributed, so the tables are checked in unit tests without a process group.

Stages. With `v` virtual stages (model chunks) per rank there are `S = pp * v` stages in a chain;
chunk `c` of rank `r` is stage `s = c * pp + r` (Narayanan et al. 2021, "Efficient Large-Scale
Language Model Training on GPU Clusters", section 2.2.2). Stage 0 holds the embedding, stage S - 1
the final norm, head and loss. Activations flow s -> s + 1, gradients s + 1 -> s; stage s sits on
rank s % pp, so the chain wraps from rank pp - 1 back to rank 0 between chunks.

Communication placement. Compute actions come in slots (warm-up F alone, steady (F, B) pairs,
cool-down B alone). Receives a compute needs go just before it (1F1B) or before its slot
(interleaved), sends just after it / after its slot; a *run of consecutive communication actions
is one fused batch* (one `batch_isend_irecv`, all waited together). In steady 1F1B this yields the
fused pairs of PipeDream-flush: [send_fwd(i), recv_bwd(j)] between F(i) and B(j), [send_bwd(j),
recv_fwd(i+1)] between B(j) and F(i+1); interleaved exchanges [send_fwd, send_bwd, recv_fwd,
recv_bwd] once per (F, B) pair as Megatron-LM does. Fusing a send with the receive the neighbour
is about to need is what avoids the classic deadlock of two neighbours both blocked in a send.

`simulate` replays all ranks' tables together under the strictest matching rule the backends may
use (NCCL: a batch completes only when every op in it has met its partner; messages between a pair
of ranks in one direction match in posting order, tags ignored). It raises on deadlock, on a
message that would reach the wrong (micro-batch, chunk), or on a compute whose input has not
arrived, and returns per-rank busy/finish times for given forward/backward costs.
"""

from dataclasses import dataclass
from functools import lru_cache

FORWARD = "forward"
BACKWARD = "backward"
SEND_FWD = "send_fwd"  # activation to the next stage
RECV_FWD = "recv_fwd"  # activation from the previous stage
SEND_BWD = "send_bwd"  # input gradient to the previous stage
RECV_BWD = "recv_bwd"  # output gradient from the next stage
COMPUTE_KINDS = (FORWARD, BACKWARD)
COMM_KINDS = (SEND_FWD, RECV_FWD, SEND_BWD, RECV_BWD)


@dataclass(frozen=True)
class Action:
    """One step of a rank's schedule. For comm kinds, (microbatch, chunk) name the local compute
    action the tensor belongs to (the producer for sends, the consumer for receives)."""

    kind: str  # one of COMPUTE_KINDS + COMM_KINDS
    microbatch: int  # micro-batch index in [0, num_microbatches)
    chunk: int = 0  # virtual chunk on this rank in [0, virtual_stages)

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def __repr__(self) -> str:
        short = {FORWARD: "F", BACKWARD: "B"}.get(self.kind, self.kind)
        return f"{short}{self.microbatch}.{self.chunk}"


class ScheduleError(RuntimeError):
    """A schedule that would hang or deliver a tensor to the wrong consumer."""


@dataclass(frozen=True)
class StageSpec:
    """What one (rank, chunk) stage builds: Llama(cfg, vocab, layer_ids=layers, pre=, post=)."""

    layers: range  # global layer indices of this stage
    pre: bool  # owns the embedding (stage 0)
    post: bool  # owns the final norm, output head and loss (stage pp * v - 1)


def _validate(pp_size: int, pp_rank: int, num_microbatches: int, virtual_stages: int) -> None:
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside pipeline size {pp_size}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if virtual_stages < 1:
        raise ValueError(f"virtual_stages must be >= 1, got {virtual_stages}")
    if virtual_stages > 1 and pp_size == 1:
        raise ValueError(
            "interleaved schedule (virtual_stages > 1, from "
            "--num_layers_per_virtual_pipeline_stage) needs pipeline_model_parallel_size > 1; "
            "drop the virtual-stage flag at PP=1"
        )
    if virtual_stages > 1 and num_microbatches % pp_size:
        raise ValueError(
            f"interleaved schedule needs the number of micro-batches per step "
            f"({num_microbatches} = global_batch_size / (micro_batch_size x data_parallel_size)) "
            "to be a multiple of "
            f"pipeline_model_parallel_size ({pp_size}); change the batch sizes or drop "
            "--num_layers_per_virtual_pipeline_stage"
        )


def stage_layers(
    num_layers: int, pp_size: int, pp_rank: int, virtual_stages: int = 1, vchunk: int = 0
) -> range:
    """Global layer ids of chunk `vchunk` on pipeline rank `pp_rank`: the even block c * pp + r."""
    stages = pp_size * virtual_stages
    if not 0 <= pp_rank < pp_size or not 0 <= vchunk < virtual_stages:
        raise ValueError(
            f"stage (rank {pp_rank}, chunk {vchunk}) is outside pipeline size {pp_size} x "
            f"{virtual_stages} virtual stages"
        )
    if num_layers % stages:
        raise ValueError(
            f"num_layers {num_layers} cannot be split evenly over pipeline_model_parallel_size "
            f"{pp_size} x {virtual_stages} virtual stages ({stages} stages); choose sizes whose "
            f"product divides {num_layers} (for interleaving, "
            "num_layers_per_virtual_pipeline_stage x pipeline size must divide num_layers)"
        )
    per = num_layers // stages
    block = vchunk * pp_size + pp_rank
    return range(block * per, (block + 1) * per)


def stage_spec(
    num_layers: int, pp_size: int, pp_rank: int, virtual_stages: int = 1, vchunk: int = 0
) -> StageSpec:
    layers = stage_layers(num_layers, pp_size, pp_rank, virtual_stages, vchunk)
    stage = vchunk * pp_size + pp_rank
    return StageSpec(layers, pre=stage == 0, post=stage == pp_size * virtual_stages - 1)


def num_warmup(pp_size: int, pp_rank: int, num_microbatches: int, virtual_stages: int = 1) -> int:
    """Forwards run before the first backward (counted in (micro-batch, chunk) units).

    1F1B: pp - rank - 1. Interleaved: 2 (pp - rank - 1) + (v - 1) pp, so that the last stage of
    every chunk is fed before the rank starts alternating (Narayanan et al. 2021, Megatron-LM)."""
    total = num_microbatches * virtual_stages
    if virtual_stages == 1:
        return min(pp_size - pp_rank - 1, total)
    return min(2 * (pp_size - pp_rank - 1) + (virtual_stages - 1) * pp_size, total)


def max_in_flight(
    pp_size: int, pp_rank: int, num_microbatches: int, virtual_stages: int = 1
) -> int:
    """Most (micro-batch, chunk) forwards whose backward has not run yet: warm-up + 1, capped."""
    total = num_microbatches * virtual_stages
    return min(num_warmup(pp_size, pp_rank, num_microbatches, virtual_stages) + 1, total)


def _compute_slots(
    pp: int, rank: int, m: int, v: int, forward_only: bool = False
) -> list[tuple[Action, ...]]:
    """Compute actions grouped in slots: warm-up forwards alone, steady (F, B) pairs, cool-down
    backwards alone (forward-only: every forward alone, in the same order). Messages are
    exchanged only between slots."""
    total = m * v
    group = pp * v  # virtual micro-batches in one round over all chunks

    def fwd(k: int) -> Action:
        if v == 1:
            return Action(FORWARD, k, 0)
        chunk = (k % group) // pp
        return Action(FORWARD, (k // group) * pp + k % pp, chunk)

    def bwd(k: int) -> Action:
        f = fwd(k)
        return Action(BACKWARD, f.microbatch, v - 1 - f.chunk)  # chunks in reverse for backward

    if forward_only:
        return [(fwd(k),) for k in range(total)]
    warm = num_warmup(pp, rank, m, v)
    slots = [(fwd(k),) for k in range(warm)]
    slots += [(fwd(warm + i), bwd(i)) for i in range(total - warm)]  # steady: 1 forward, 1 backward
    slots += [(bwd(k),) for k in range(total - warm, total)]  # cool-down
    return slots


@lru_cache(maxsize=256)
def _schedule(
    pp: int, rank: int, m: int, v: int, pair_slots: bool, forward_only: bool = False
) -> tuple[Action, ...]:
    last = pp * v - 1
    out: list[Action] = []

    def recv(a: Action) -> list[Action]:
        stage = a.chunk * pp + rank
        if a.kind == FORWARD:
            return [Action(RECV_FWD, a.microbatch, a.chunk)] if stage > 0 else []
        return [Action(RECV_BWD, a.microbatch, a.chunk)] if stage < last else []

    def send(a: Action) -> list[Action]:
        stage = a.chunk * pp + rank
        if a.kind == FORWARD:
            return [Action(SEND_FWD, a.microbatch, a.chunk)] if stage < last else []
        return [Action(SEND_BWD, a.microbatch, a.chunk)] if stage > 0 else []

    for slot in _compute_slots(pp, rank, m, v, forward_only):
        if pair_slots:
            for a in slot:
                out += recv(a)
            out += slot
            for a in slot:
                out += send(a)
        else:
            for a in slot:
                out += recv(a) + [a] + send(a)
    return tuple(out)


def schedule(
    pp_size: int,
    pp_rank: int,
    num_microbatches: int,
    virtual_stages: int = 1,
    forward_only: bool = False,
) -> list[Action]:
    """The actions of rank `pp_rank` for one step; runs of comm actions are fused batches.
    forward_only: forwards in the same order and no backwards (evaluation)."""
    _validate(pp_size, pp_rank, num_microbatches, virtual_stages)
    # 1F1B exchanges messages around every compute; interleaved only between (F, B) slots. Each is
    # the placement for which `simulate` finds no deadlock and the ideal bubble (tests check it):
    # per-compute placement deadlocks interleaved schedules with m > pp, and slot placement
    # serialises plain 1F1B (the last stage's B(i) would wait for a send posted after F(i + 1)).
    pair_slots = virtual_stages > 1
    return list(
        _schedule(pp_size, pp_rank, num_microbatches, virtual_stages, pair_slots, forward_only)
    )


def split_batches(actions: list[Action]) -> list[Action | list[Action]]:
    """Group the table the way the executor runs it: compute actions alone, comm runs as lists."""
    out: list[Action | list[Action]] = []
    for a in actions:
        if a.is_comm:
            if out and isinstance(out[-1], list):
                out[-1].append(a)
            else:
                out.append([a])
        else:
            out.append(a)
    return out


def peer(kind: str, pp_size: int, pp_rank: int) -> int:
    """Pipeline rank on the other end of a comm action (the chain wraps between chunks)."""
    if kind in (SEND_FWD, RECV_BWD):
        return (pp_rank + 1) % pp_size
    return (pp_rank - 1) % pp_size


@dataclass
class SimResult:
    """Per-rank results of `simulate`, times in the units of t_fwd / t_bwd."""

    finish: list[float]  # time each rank ran its last action
    busy: list[float]  # compute time of each rank
    max_in_flight: list[int]  # most forwards awaiting their backward, per rank

    @property
    def makespan(self) -> float:
        return max(self.finish)

    def bubble(self, rank: int) -> float:
        """Idle fraction of the step on `rank`: 1 - busy / makespan."""
        return 1.0 - self.busy[rank] / self.makespan


def ideal_bubble(pp_size: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble fraction of the step: (p - 1) / v / (m + (p - 1) / v), Narayanan et al. 2021 eq. 1-2
    expressed as a share of the whole step (for v = 1: (p - 1) / (m + p - 1))."""
    b = (pp_size - 1) / virtual_stages
    return b / (num_microbatches + b)


def simulate(
    pp_size: int,
    num_microbatches: int,
    virtual_stages: int = 1,
    t_fwd: float = 1.0,
    t_bwd: float = 2.0,
    tables: list[list[Action]] | None = None,
    latency: float = 0.0,
    forward_only: bool = False,
) -> SimResult:
    """Run every rank's table together with per-stage compute costs t_fwd / v and t_bwd / v;
    a message completes `latency` after both ends posted it (0: free messages). `tables`
    overrides the generated ones (to test the checker)."""
    pp, m, v = pp_size, num_microbatches, virtual_stages
    if tables is None:
        tables = [schedule(pp, r, m, v, forward_only) for r in range(pp)]
    progs = [split_batches(t) for t in tables]
    tf, tb = t_fwd / v, t_bwd / v
    last = pp * v - 1
    pc = [0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    in_flight = [0] * pp
    peak = [0] * pp
    done_fwd: list[set] = [set() for _ in range(pp)]
    done_bwd: list[set] = [set() for _ in range(pp)]
    arrived: list[set] = [set() for _ in range(pp)]  # (kind, mb, chunk) receives completed
    # channel (src, dst) -> posted sends / recvs, each (action, post time); matched in order.
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    posted: list[list | None] = [None] * pp  # ops of the batch a rank is blocked in

    def stage_of(rank: int, a: Action) -> int:
        return a.chunk * pp + rank

    def check_pair(src: int, s: Action, dst: int, r: Action) -> None:
        want = {SEND_FWD: (RECV_FWD, 1), SEND_BWD: (RECV_BWD, -1)}[s.kind]
        ok = (
            r.kind == want[0]
            and r.microbatch == s.microbatch
            and stage_of(dst, r) == stage_of(src, s) + want[1]
        )
        if not ok:
            raise ScheduleError(
                f"rank {src} {s.kind} {s!r} (stage {stage_of(src, s)}) would be received by rank "
                f"{dst} as {r.kind} {r!r} (stage {stage_of(dst, r)}): messages between a pair of "
                "ranks match in posting order"
            )

    def matched_time(rank: int, idx: int) -> float | None:
        a, t, ch, pos = posted[rank][idx]
        other = (recvs if a.kind in (SEND_FWD, SEND_BWD) else sends).get(ch, [])
        if pos >= len(other):
            return None
        return max(t, other[pos][1]) + latency

    while True:
        progressed = False
        for r in range(pp):
            while pc[r] < len(progs[r]):
                item = progs[r][pc[r]]
                if posted[r] is None and isinstance(item, list):
                    posted[r] = []
                    for a in item:
                        if a.kind == SEND_FWD and (a.microbatch, a.chunk) not in done_fwd[r]:
                            raise ScheduleError(f"rank {r} sends {a!r} before its forward ran")
                        if a.kind == SEND_BWD and (a.microbatch, a.chunk) not in done_bwd[r]:
                            raise ScheduleError(f"rank {r} sends {a!r} before its backward ran")
                        if a.kind in (SEND_FWD, SEND_BWD):
                            ch = (r, peer(a.kind, pp, r))
                            book = sends.setdefault(ch, [])
                            other = recvs.get(ch, [])
                            if len(book) < len(other):
                                check_pair(r, a, ch[1], other[len(book)][0])
                        else:
                            ch = (peer(a.kind, pp, r), r)
                            book = recvs.setdefault(ch, [])
                            other = sends.get(ch, [])
                            if len(book) < len(other):
                                check_pair(ch[0], other[len(book)][0], r, a)
                        posted[r].append((a, clock[r], ch, len(book)))
                        book.append((a, clock[r]))
                    progressed = True
                if posted[r] is not None:
                    times = [matched_time(r, i) for i in range(len(posted[r]))]
                    if any(t is None for t in times):
                        break  # blocked in this batch
                    clock[r] = max([clock[r], *times])
                    for a, *_ in posted[r]:
                        if a.kind in (RECV_FWD, RECV_BWD):
                            arrived[r].add((a.kind, a.microbatch, a.chunk))
                    posted[r] = None
                    pc[r] += 1
                    progressed = True
                    continue
                a = item
                key = (a.microbatch, a.chunk)
                if a.kind == FORWARD:
                    if key in done_fwd[r]:
                        raise ScheduleError(f"rank {r} runs forward {a!r} twice")
                    if stage_of(r, a) > 0 and (RECV_FWD, *key) not in arrived[r]:
                        raise ScheduleError(f"rank {r} runs {a!r} before its input arrived")
                    done_fwd[r].add(key)
                    in_flight[r] += 1
                    peak[r] = max(peak[r], in_flight[r])
                    clock[r] += tf
                    busy[r] += tf
                else:
                    if key not in done_fwd[r] or key in done_bwd[r]:
                        raise ScheduleError(f"rank {r} runs backward {a!r} without one forward")
                    if stage_of(r, a) < last and (RECV_BWD, *key) not in arrived[r]:
                        raise ScheduleError(f"rank {r} runs {a!r} before its output grad arrived")
                    done_bwd[r].add(key)
                    in_flight[r] -= 1
                    clock[r] += tb
                    busy[r] += tb
                pc[r] += 1
                progressed = True
        if all(pc[r] == len(progs[r]) for r in range(pp)):
            break
        if not progressed:
            stuck = {r: [op[0] for op in posted[r]] for r in range(pp) if posted[r] is not None}
            raise ScheduleError(f"pipeline deadlock: ranks blocked in batches {stuck}")
    for ch in set(sends) | set(recvs):
        if len(sends.get(ch, [])) != len(recvs.get(ch, [])):
            raise ScheduleError(
                f"channel {ch}: {len(sends.get(ch, []))} sends but "
                f"{len(recvs.get(ch, []))} receives"
            )
    expected = {(mb, c) for mb in range(m) for c in range(v)}
    for r in range(pp):
        if done_fwd[r] != expected or done_bwd[r] != (set() if forward_only else expected):
            raise ScheduleError(f"rank {r} does not run every (micro-batch, chunk) exactly once")
    return SimResult(finish=clock, busy=busy, max_in_flight=peak)
