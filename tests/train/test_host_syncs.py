"""Device-to-host reads along training iterations (each one a synchronisation on a GPU: the host
waits for the device's queue to drain, and the next kernels launch late).

Counted on CPU through the real Trainer and run loop (tests/train/host_reads.py tells the
would-be device tensors from the loader's host ones). What remains per iteration, and why:

- train step, `torch.stack([loss, grad_norm**2]).tolist()` (train/loop.py): one read of two
  fp64 scalars, after the backward and the gradient reduction. The skip decision (non-finite
  norm) and the clip factor need the norm on the host before the update is launched.
- DP > 1 only (not counted here, DP 1): the step's global loss-token count, all-reduced and read
  before the first forward, because it divides every micro-batch's loss.
- evaluation: `EvalStats.result`'s one `tolist` of the summed metrics, per evaluation.
- not seen on CPU: train/run.py's `torch.cuda.synchronize()`, only at iterations that log a row,
  evaluate or save (the timing of the interval); `--exit_duration_in_mins` /
  `--exit_signal_handler` add one 2-flag all-reduce and read per iteration (train/stop.py: every
  rank must stop after the same iteration).

Everything else comes from the loader's host copies (token-id and label ranges, loss-token,
token and attention-pair counts, `max_seqlen`), so nothing is read per micro-batch or per layer.
"""

import pytest

from tests.train.helpers import SyntheticLoader, tiny_run
from tests.train.host_reads import CountingLoader, HostReads, device_copies, paused
from train.loop import Trainer
from train.run import run_training

STEP_READS = 1  # the merged loss + gradient-norm read (module docstring)
EVAL_READS = 1  # EvalStats.result


def _reads(monkeypatch, micro_batches: int, extra: list[str], eval_micro: int = 0) -> list:
    """Per-iteration Counters (site -> would-be device reads) of three iterations."""
    rc, dims, tok = tiny_run(["--train_iters", "3", "--log_interval", "2", *extra])
    tok.im_start, tok.im_end = 5, 6  # the instruct-accuracy mask runs too
    trainer = Trainer(rc, dims, tok)
    mode = HostReads()
    device_copies(monkeypatch.setattr, mode)
    loader = CountingLoader(SyntheticLoader(2, 64, micro_batches), mode)
    evals = {}
    if eval_micro:
        source = SyntheticLoader(2, 64, eval_micro, seed=7)

        def factory() -> list[dict]:
            with paused(mode):
                batch = source.next_global_batch()
            mode.mark_host(batch)
            return batch

        evals = {"all": factory}
    with mode:
        run_training(rc, dims, trainer, loader, evals, None)
    loader.finish()
    assert len(loader.per_iteration) == 3
    return loader.per_iteration


def _show(per_iteration: list) -> str:
    return "\n".join(f"  iteration {i + 1}: {dict(c)}" for i, c in enumerate(per_iteration))


@pytest.mark.parametrize(
    "extra",
    [[], ["--use_distributed_optimizer", "--loss_reduction", "microbatch"]],
    ids=["flat", "sharded-microbatch"],
)
def test_host_reads_per_iteration_do_not_grow_with_micro_batches_or_layers(monkeypatch, extra):
    # Before: 4 + 2 x micro-batches per iteration (the embedding's id check read the device
    # ids' range per micro-batch; the counts went to the device and back; the loss and the
    # gradient norm were read apart).
    counts = {}
    for micro, layers in ((1, 2), (4, 2), (4, 4)):
        per_iteration = _reads(monkeypatch, micro, [*extra, "--num_layers", str(layers)])
        totals = [sum(c.values()) for c in per_iteration]
        assert max(totals) <= STEP_READS, (
            f"{micro} micro-batches, {layers} layers: device reads per iteration\n"
            + _show(per_iteration)
        )
        counts[(micro, layers)] = totals
    assert len({tuple(t) for t in counts.values()}) == 1, counts


def test_evaluation_reads_do_not_grow_with_micro_batches(monkeypatch):
    # Before: the instruct mask's boolean-mask assignments (6 nonzero reads) and a host-to-device
    # copy of the row count, per evaluated micro-batch.
    totals = {}
    for micro in (1, 3):
        per_iteration = _reads(monkeypatch, 1, ["--eval_interval", "1", "--eval_iters", "1"],
                               eval_micro=micro)  # fmt: skip
        got = [sum(c.values()) for c in per_iteration]
        assert max(got) <= STEP_READS + EVAL_READS, _show(per_iteration)
        totals[micro] = got
    assert totals[1] == totals[3], totals


_PP_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
import train.loop
from parallel.dims import ParallelDims
from tests.train.helpers import TINY_ARGS, VOCAB, SyntheticLoader
from tests.train.host_reads import CountingLoader, HostReads, device_copies
from train.args import parse_args
from train.data import TokenizerInfo
from train.resolve import resolve
from train.run import run_training

out = sys.argv[1]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=2)
torch.set_num_threads(1)
res = {}
for micro, virtual in ((1, []), (4, []), (4, ["--num_layers_per_virtual_pipeline_stage", "1"])):
    argv = [*TINY_ARGS, "--num_layers", "4", "--pipeline_model_parallel_size", "2",
            "--train_iters", "3", "--log_interval", "2", *virtual]
    rc = resolve(*parse_args(argv), world_size=2)
    rc.model = rc.model.replace(vocab_size=VOCAB)
    dims = ParallelDims.build(1, 2, backend="gloo")
    trainer = train.loop.Trainer(rc, dims, TokenizerInfo(VOCAB, "synthetic", None, None, None, []))
    mode = HostReads()
    saved = train.loop.to_device
    device_copies(lambda owner, name, value: setattr(owner, name, value), mode)
    loader = CountingLoader(SyntheticLoader(2, 64, micro), mode)
    with mode:
        run_training(rc, dims, trainer, loader, {}, None)
    loader.finish()
    train.loop.to_device = saved
    res[f"{micro} micro-batches{' interleaved' if virtual else ''}"] = [
        dict(c) for c in loader.per_iteration
    ]
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)
dist.destroy_process_group()
"""


def test_pipeline_host_reads_do_not_grow_with_micro_batches(tmp_path):
    # PP 2 (plain and interleaved 1F1B), two gloo ranks. Before: 4 + 2 x micro-batches per
    # iteration on the first stage (the embedding's id check), 4 on the last.
    import json

    from tests.gloo_ranks import run_ranks

    worker = tmp_path / "worker.py"
    worker.write_text(_PP_WORKER)
    run_ranks(str(worker), [str(tmp_path)], 2, timeout=240, what="pipeline host reads")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for what, per_iteration in got.items():
            totals = [sum(c.values()) for c in per_iteration]
            assert len(totals) == 3 and max(totals) <= STEP_READS, (rank, what, per_iteration)
