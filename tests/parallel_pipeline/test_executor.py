"""PipelineExecutor on gloo ranks versus one process, from the same full weights.

PP=2, PP=2 x 2 virtual stages, PP=4, PP=4 x 2 virtual stages and PP=2 x DP=2: 10 AdamW steps,
losses within rtol 1e-5 of the single-process run, first-step gradients within rtol 1e-4, final
weights within 1% of a learning-rate step; then a forward-only (evaluation) pass within rtol
1e-5. Two launches (2 and 4 ranks) run all layouts.
"""

import os

import pytest
import torch

from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from parallel.pipeline import PipelineExecutor, pipeline_loss
from tests.parallel_pipeline.common import (
    CFG,
    LR,
    SEQ,
    STEPS,
    build_stage,
    full_state,
    global_batch,
    launch,
    make_loss_fn,
    make_optimizer,
    reference_run,
)

pytestmark = pytest.mark.slow

# layout -> (world, global micro-batches per step)
LAYOUTS = {"pp2": (2, 4), "pp2v2": (2, 4), "pp4": (4, 8), "pp4v2": (4, 8), "pp2dp2": (4, 8)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (2, 4):
        d = str(tmp_path_factory.mktemp(f"pp_world{world}"))
        launch(world, d)
        for name, (w, _) in LAYOUTS.items():
            if w == world:
                out[name] = [torch.load(os.path.join(d, f"{name}-rank{r}.pt")) for r in range(w)]
    return out


@pytest.fixture(scope="module")
def references():
    return {n: reference_run(n) for n in (4, 8)}


def _merge(per_rank: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Union of the ranks' named tensors (DP replicas must agree exactly)."""
    merged: dict[str, torch.Tensor] = {}
    for r in per_rank:
        for name, t in r[key].items():
            if name in merged:
                assert torch.equal(merged[name], t), f"{key} {name} differs between DP replicas"
            merged[name] = t
    return merged


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_single_process(runs, references, layout):
    per_rank = runs[layout]
    ref = references[LAYOUTS[layout][1]]
    for r in per_rank:  # every rank reports the same, broadcast and DP-reduced, step loss
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
        )
        assert r["eval"] == pytest.approx(ref["eval"], rel=1e-5)  # forward-only pass
    # The loss must actually move, or matching it would say little.
    assert ref["losses"][-1] < ref["losses"][0] - 0.05
    grads, params = _merge(per_rank, "grads"), _merge(per_rank, "params")
    assert set(grads) == set(params) == set(ref["grads"]), "parameter names differ from the model"
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item())
    # After 10 AdamW steps: within 1% of one learning-rate step. With DP the gradient sum is
    # reassociated (two partial sums), and Adam's m / sqrt(v) turns last-bit differences in
    # near-zero gradients into differences of a small fraction of lr; a wrong gradient on any
    # micro-batch moves weights by O(lr).
    for name, w in ref["params"].items():
        torch.testing.assert_close(params[name], w, rtol=1e-4, atol=0.01 * LR)


def test_pp1_executor_matches_plain_loop(references):
    """dims.pp == 1: the executor is plain forward/backward per micro-batch, no process group."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference (see common.reference_run)
    try:
        _pp1_run(references)
    finally:
        torch.set_num_threads(threads)


def _pp1_run(references):
    stage = build_stage(full_state(), None, True, True)
    params = list(stage.parameters())
    buffer = GradBuffer(params)
    opt = make_optimizer(params)
    executor = PipelineExecutor(
        [stage], ParallelDims(), (SEQ, CFG.hidden_size), grad_sync=buffer.set_sync, check=True
    )
    losses = []
    for step in range(STEPS):
        batch = global_batch(step, 4)
        buffer.zero()
        out = executor.step(batch, make_loss_fn(batch))
        assert len(out) == 4
        buffer.finish()
        losses.append(float(pipeline_loss(out, ParallelDims())))
        for p in params:
            p.grad = p.main_grad
        opt.step()
        for p in params:
            p.grad = None
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(references[4]["losses"]), rtol=1e-5, atol=0
    )


def test_executor_validates_shapes_and_layout():
    stage = build_stage(full_state(), range(0, 8), True, True)
    executor = PipelineExecutor([stage], ParallelDims(), (SEQ, CFG.hidden_size))
    assert executor.dtype == torch.float32
    ok = torch.zeros(SEQ, CFG.hidden_size)
    assert executor._check_boundary(ok, "stage output", (0, 0)) is ok
    with pytest.raises(ValueError, match=r"shape \(16, 128\).*built for \(32, 128\)"):
        executor._check_boundary(torch.zeros(16, CFG.hidden_size), "stage output", (0, 0))
    with pytest.raises(ValueError, match="float64"):
        executor._check_boundary(ok.double(), "input gradient", (0, 0))
    with pytest.raises(ValueError, match="virtual stages need pipeline_model_parallel_size > 1"):
        PipelineExecutor([stage, stage], ParallelDims(), (SEQ, CFG.hidden_size))
    with pytest.raises(ValueError, match="needs torch.distributed"):
        PipelineExecutor([stage], ParallelDims(pp=2), (SEQ, CFG.hidden_size))


def _tiny_executor(**kwargs):
    lin = torch.nn.Linear(4, 4)
    fwd = lambda s, x, mb: s(mb["x"])  # noqa: E731
    return PipelineExecutor([lin], ParallelDims(), (2, 4), forward_fn=fwd, **kwargs)


def test_executor_checks_its_bounds_and_leftovers(monkeypatch):
    """The run-time guards: a non-scalar loss and stages without parameters are refused,
    check=True asserts the schedule's in-flight bound, and a table that leaves a forward without
    its backward is an error, not silently kept activations."""
    import parallel.pipeline as pipeline

    batch = [{"x": torch.randn(2, 4)} for _ in range(3)]
    loss = lambda out, mb: out.sum()  # noqa: E731
    assert len(_tiny_executor(check=True).step(batch, loss)) == 3
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        _tiny_executor().step(batch, lambda out, mb: out)
    with pytest.raises(ValueError, match="at least one stage"):
        PipelineExecutor([], ParallelDims(), (2, 4))
    with pytest.raises(ValueError, match="no floating-point parameters"):
        PipelineExecutor([torch.nn.ReLU()], ParallelDims(), (2, 4))
    monkeypatch.setattr(pipeline, "max_in_flight", lambda *a: 0)
    with pytest.raises(AssertionError, match="1 micro-batches in flight, schedule bound 0"):
        _tiny_executor(check=True).step(batch, loss)
    monkeypatch.undo()
    real = pipeline.schedule
    monkeypatch.setattr(pipeline, "schedule", lambda *a, **k: real(*a, **k)[:-1])  # no last B
    with pytest.raises(RuntimeError, match=r"unconsumed tensors: \{'inputs': 1, 'outputs': 1\}"):
        _tiny_executor().step(batch, loss)


def test_pipeline_loss_sums_in_float64():
    losses = [torch.tensor(1.0), torch.tensor(1e-8)]
    total = pipeline_loss(losses, ParallelDims())
    assert total.dtype == torch.float64 and total.item() == 1.0 + float(losses[1])
