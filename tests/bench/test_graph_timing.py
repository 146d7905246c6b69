"""On a GPU: CUDA-graph timing captures an autograd backward, and the tuning sweep runs with the
real timer (the parts of bench.tune and harness.time_graph the CPU tests cannot reach)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_time_graph_captures_a_backward():
    from bench.harness import graph_stream, time_graph
    from kernels.rmsnorm import rmsnorm

    with graph_stream():
        x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = rmsnorm(x, w)
        dy = torch.randn_like(y)
        grads = []
        call = lambda: grads.append(torch.autograd.grad(y, (x, w), dy, retain_graph=True))  # noqa: E731
        call()
        t = time_graph(call, rep=20)
    torch.cuda.synchronize()
    assert 0 < t.p20 <= t.ms <= t.p80 < 10.0
    # replays write the graph's own output buffers: the last captured call's grads, once
    # replayed, equal the eager ones
    eager, captured = grads[0], grads[-1]
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


def test_tune_sweep_with_real_timer(tmp_path):
    from bench import tune
    from kernels import tuning

    todo = tune._rmsnorm_sweeps([(2048, 1024)], "cuda") + tune._rotary_sweeps(
        [(1024, 8, 1, 128)], "cuda"
    )
    for sw in todo:  # three settings each: the path, not the search (gpu-check runs that)
        sw.candidates = sw.candidates[:3]
    ops, rows = tune.run_sweeps(todo, {"copy_gbps": 1000.0})
    errors = [(r.shape, r.impl, r.error) for r in rows if r.error]
    assert not errors
    assert set(ops) == {"rmsnorm_fwd", "rmsnorm_bwd", "rotary"}
    path = tune.write_table(ops, torch.cuda.get_device_name(0), tmp_path)
    assert tuning.load_table(path) == ops
