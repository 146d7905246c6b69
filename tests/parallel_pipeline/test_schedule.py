"""Schedule tables, no process group: each rank's table alone, then all ranks replayed together."""

import pytest

from parallel.pipeline_schedule import (
    BACKWARD,
    FORWARD,
    RECV_BWD,
    RECV_FWD,
    SEND_BWD,
    SEND_FWD,
    Action,
    ScheduleError,
    _schedule,
    ideal_bubble,
    max_in_flight,
    schedule,
    simulate,
    split_batches,
    stage_layers,
    stage_spec,
)

# (pp, m, v): plain 1F1B incl. m < pp and m = 1, interleaved incl. m = pp, pp = 2 (both directions
# of traffic share one channel between the two ranks), odd pp and the seed's pp 4 x 32.
CASES = [
    (1, 1, 1),
    (1, 5, 1),
    (2, 1, 1),
    (2, 4, 1),
    (3, 2, 1),
    (3, 7, 1),
    (4, 8, 1),
    (4, 32, 1),
    (8, 3, 1),
    (2, 2, 2),
    (2, 6, 3),
    (3, 3, 2),
    (3, 9, 2),
    (4, 4, 2),
    (4, 8, 2),
    (4, 32, 2),
    (4, 12, 4),
    (8, 16, 2),
]


def _compute(table):
    return [a for a in table if not a.is_comm]


@pytest.mark.parametrize("pp,m,v", CASES)
def test_each_microbatch_once_forward_before_backward(pp, m, v):
    for rank in range(pp):
        comp = _compute(schedule(pp, rank, m, v))
        fwd = [(a.microbatch, a.chunk) for a in comp if a.kind == FORWARD]
        bwd = [(a.microbatch, a.chunk) for a in comp if a.kind == BACKWARD]
        every = {(i, c) for i in range(m) for c in range(v)}
        assert sorted(fwd) == sorted(every) and sorted(bwd) == sorted(every)
        pos = {(a.kind, a.microbatch, a.chunk): i for i, a in enumerate(comp)}
        for key in every:
            assert pos[(FORWARD, *key)] < pos[(BACKWARD, *key)]
        # Per chunk, backwards run in micro-batch order, so gradients accumulate in the same
        # order as in a single process.
        for c in range(v):
            assert [i for i, cc in bwd if cc == c] == list(range(m))


def _hand_warmup(pp, rank, m, v):
    # Spelled out from the papers, independently of num_warmup(): PipeDream-flush keeps
    # pp - rank - 1 forwards ahead; interleaved (Narayanan et al. 2021) fills every chunk of the
    # pipeline once ((v - 1) * pp) plus the round trip to the last rank (2 * (pp - rank - 1)).
    w = pp - rank - 1 if v == 1 else (v - 1) * pp + 2 * (pp - rank - 1)
    return min(w, m * v)


@pytest.mark.parametrize("pp,m,v", CASES)
def test_warmup_counts_and_in_flight_bound(pp, m, v):
    for rank in range(pp):
        comp = _compute(schedule(pp, rank, m, v))
        first_b = next(i for i, a in enumerate(comp) if a.kind == BACKWARD)
        w = _hand_warmup(pp, rank, m, v)
        # warm-up forwards, then the steady state starts with one forward before its backward
        assert first_b == min(w + 1, m * v)
        live = peak = 0
        for a in comp:
            live += 1 if a.kind == FORWARD else -1
            peak = max(peak, live)
        assert peak == min(w + 1, m * v) == max_in_flight(pp, rank, m, v)
        assert simulate(pp, m, v).max_in_flight[rank] == peak
        if v == 1:
            assert peak == min(pp - rank, m)  # the 1F1B memory bound


def test_one_f_one_b_table_by_hand():
    f, b = FORWARD, BACKWARD
    got = [(a.kind, a.microbatch) for a in _compute(schedule(4, 1, 5))]
    want = [(f, 0), (f, 1), (f, 2), (b, 0), (f, 3), (b, 1), (f, 4), (b, 2), (b, 3), (b, 4)]
    assert got == want
    # Fused pairs of the steady state on a middle rank: [send_fwd(i), recv_bwd(j)] and
    # [send_bwd(j), recv_fwd(i + 1)].
    batches = [x for x in split_batches(schedule(4, 1, 5)) if isinstance(x, list)]
    assert [Action(SEND_FWD, 2), Action(RECV_BWD, 0)] in batches
    assert [Action(SEND_BWD, 0), Action(RECV_FWD, 3)] in batches
    # First stage never receives activations, last stage never receives gradients.
    assert not {a.kind for a in schedule(4, 0, 5)} & {RECV_FWD, SEND_BWD}
    assert not {a.kind for a in schedule(4, 3, 5)} & {SEND_FWD, RECV_BWD}


def test_interleaved_order_by_hand():
    # pp 2, v 2, m 4, rank 1: warm-up 2; forwards go round the chunks in groups of pp micro-batches.
    comp = [repr(a) for a in _compute(schedule(2, 1, 4, 2))]
    want = "F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0"
    assert comp == want.split()


@pytest.mark.parametrize("pp,m,v", CASES)
def test_whole_pipeline_runs_without_deadlock_at_the_ideal_bubble(pp, m, v):
    """Replays all ranks together: every message meets the right (micro-batch, chunk), nothing
    hangs, and with free messages the idle share of every rank is (p-1)/v / (m + (p-1)/v)."""
    for t_fwd, t_bwd in ((1.0, 2.0), (1.0, 1.0)):
        res = simulate(pp, m, v, t_fwd, t_bwd)
        step = (m * (t_fwd + t_bwd)) / (1 - ideal_bubble(pp, m, v))
        assert res.makespan == pytest.approx(step, rel=1e-9)
        for rank in range(pp):
            assert res.bubble(rank) == pytest.approx(ideal_bubble(pp, m, v), abs=1e-9)
    assert ideal_bubble(4, 8) == pytest.approx(3 / 11)
    assert ideal_bubble(4, 8, 2) == pytest.approx(1.5 / 9.5)


@pytest.mark.parametrize("pp,m,v", CASES)
def test_forward_only_tables(pp, m, v):
    """Evaluation: forwards in training order, no backward, no gradient messages, no hang, and
    the forward-only ideal m * t_fwd + (p - 1) * t_fwd / v."""
    for rank in range(pp):
        table = schedule(pp, rank, m, v, forward_only=True)
        assert {a.kind for a in table} <= {FORWARD, SEND_FWD, RECV_FWD}
        fwd = [a for a in table if a.kind == FORWARD]
        trained = [a for a in schedule(pp, rank, m, v) if a.kind == FORWARD]
        assert fwd == trained
    res = simulate(pp, m, v, 1.0, 0.0, forward_only=True)
    assert res.makespan == pytest.approx(m + (pp - 1) / v, rel=1e-9)


def test_simulator_catches_a_deadlock():
    # Rank 0 waits for the gradient of micro-batch 0 before running its forward.
    rank0 = [Action(RECV_BWD, 0), Action(FORWARD, 0), Action(SEND_FWD, 0), Action(BACKWARD, 0)]
    rank1 = [Action(RECV_FWD, 0), Action(FORWARD, 0), Action(BACKWARD, 0), Action(SEND_BWD, 0)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(2, 1, tables=[rank0, rank1])
    # Placing every receive right before its compute also for interleaved schedules hangs once
    # there is a steady state (m > pp): why interleaved messages go between (F, B) slots.
    tables = [list(_schedule(2, r, 4, 2, False)) for r in range(2)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(2, 4, 2, tables=tables)


def test_simulator_catches_a_misrouted_message():
    tables = [schedule(2, r, 2) for r in range(2)]
    swap = {Action(RECV_FWD, 0): Action(RECV_FWD, 1), Action(RECV_FWD, 1): Action(RECV_FWD, 0)}
    tables[1] = [swap.get(a, a) for a in tables[1]]
    with pytest.raises(ScheduleError, match="would be received"):
        simulate(2, 2, tables=tables)


def test_simulator_catches_a_message_for_the_wrong_chunk():
    # Same micro-batch, wrong chunk: rank 1 would take stage 0's activation as stage 2's output.
    tables = [schedule(2, r, 2, 2) for r in range(2)]
    swap = {
        Action(RECV_FWD, 0, 0): Action(RECV_FWD, 0, 1),
        Action(RECV_FWD, 0, 1): Action(RECV_FWD, 0, 0),
    }
    tables[1] = [swap.get(a, a) for a in tables[1]]
    with pytest.raises(ScheduleError, match=r"\(stage 0\) would be received .* \(stage 3\)"):
        simulate(2, 2, 2, tables=tables)


def test_simulator_catches_a_missing_or_repeated_backward():
    f0, f1, b0, b1 = (
        Action(FORWARD, 0),
        Action(FORWARD, 1),
        Action(BACKWARD, 0),
        Action(BACKWARD, 1),
    )
    with pytest.raises(ScheduleError, match="every .* exactly once"):
        simulate(1, 2, tables=[[f0, f1, b0]])
    with pytest.raises(ScheduleError, match="without one forward"):
        simulate(1, 2, tables=[[f0, f1, b0, b1, b0]])
    f2, b2 = Action(FORWARD, 2), Action(BACKWARD, 2)
    assert simulate(1, 3, tables=[[f0, f1, b0, b1, f2, b2]]).max_in_flight == [2]


def test_simulator_message_latency():
    # pp 2, m 1: F on rank 0, activation (0.5), F + B on rank 1, gradient (0.5), B on rank 0.
    assert simulate(2, 1, latency=0.5).makespan == pytest.approx(1 + 0.5 + 3 + 0.5 + 2)


def test_simulator_catches_compute_before_its_input():
    tables = [schedule(2, r, 1) for r in range(2)]
    tables[1] = [a for a in tables[1] if a.kind != RECV_FWD]
    tables[0] = [a for a in tables[0] if a.kind != SEND_FWD]
    with pytest.raises(ScheduleError, match="before its input arrived"):
        simulate(2, 1, tables=tables)


def test_validation_messages():
    with pytest.raises(ValueError, match=r"multiple of pipeline_model_parallel_size \(4\)"):
        schedule(4, 0, 6, 2)
    with pytest.raises(ValueError, match="needs pipeline_model_parallel_size > 1"):
        schedule(1, 0, 4, 2)
    with pytest.raises(ValueError, match="outside pipeline size"):
        schedule(2, 2, 4)
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        schedule(2, 0, 0)


def test_stage_layers_even_split_and_interleaved_blocks():
    assert [stage_layers(8, 4, r) for r in range(4)] == [
        range(0, 2),
        range(2, 4),
        range(4, 6),
        range(6, 8),
    ]
    # interleaved: chunk c of rank r holds block c * pp + r
    assert stage_layers(8, 2, 0, 2, 0) == range(0, 2)
    assert stage_layers(8, 2, 1, 2, 0) == range(2, 4)
    assert stage_layers(8, 2, 0, 2, 1) == range(4, 6)
    assert stage_layers(8, 2, 1, 2, 1) == range(6, 8)
    for pp, v in ((1, 1), (2, 1), (4, 2), (2, 5), (80, 1)):
        got = sorted(i for r in range(pp) for c in range(v) for i in stage_layers(80, pp, r, v, c))
        assert got == list(range(80))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        stage_layers(80, 3, 0)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        stage_layers(8, 4, 0, 4, 0)
    with pytest.raises(ValueError, match=r"\(rank 0, chunk 2\) is outside pipeline size 2 x 2"):
        stage_layers(8, 2, 0, 2, 2)
    with pytest.raises(ValueError, match="outside pipeline size"):
        stage_layers(8, 2, 2)


def test_stage_spec_places_embedding_and_head():
    specs = {(r, c): stage_spec(8, 2, r, 2, c) for r in range(2) for c in range(2)}
    assert [k for k, s in specs.items() if s.pre] == [(0, 0)]
    assert [k for k, s in specs.items() if s.post] == [(1, 1)]
    single = stage_spec(4, 1, 0)
    assert single.pre and single.post and single.layers == range(4)
