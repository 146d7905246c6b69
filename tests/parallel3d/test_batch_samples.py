"""`python -m train` with global batches of samples (the default --global_batch_unit) on the
sample mix: each DP rank packs its half of a step's samples into the micro-batches they fill, so
DP 2 runs other micro-batches (and other counts of them per rank) than DP 1. Per-document
attention and the global token mean make the layout irrelevant up to float rounding: the losses,
consumed samples and evaluations agree, and a checkpoint saved at one DP size (by --exit_interval,
mid-epoch) continues at the other as the uninterrupted run."""

from pathlib import Path

import pytest

from tests.parallel3d.common import STAGE1, by_iteration, train_stage1

ITERS, G, MICRO, SEQ = 6, 8, 2, 128


def _train(run: Path, data: Path, nproc: int, extra: list[str]) -> tuple[list[dict], str]:
    args = ["--train_iters",
            str(ITERS), "--lr_warmup_iters", "2", "--seq_length", str(SEQ), "--global_batch_size",
            str(G), "--micro_batch_size", str(MICRO), "--log_interval", "1", "--save_interval",
            "3", "--eval_interval", "3", "--eval_iters", "1", *extra]  # fmt: skip
    return train_stage1(run, data, nproc, args)


def _evals(rows):
    return {(r["iteration"], r["dataset"]): r["loss"] for r in rows if r["type"] == "eval"}


@pytest.fixture(scope="module")
def one(data, tmp_path_factory):
    """The uninterrupted one-process run (checkpoints at 3 and 6)."""
    run = tmp_path_factory.mktemp("one")
    return run, _train(run, data, 1, [])[0]


def _counts(data: Path, dp: int, global_batch: int, micro: int, iters: int) -> list[list[int]]:
    """Micro-batches of each DP rank in the first steps, from the trainer's own loader."""
    from data.loader import SFTDataset
    from train.args import parse_args
    from train.data import make_loader
    from train.resolve import resolve

    argv = [f"@{STAGE1}", "--data_path", str(data), "--seq_length", str(SEQ),
            "--global_batch_size", str(global_batch), "--micro_batch_size", str(micro)]  # fmt: skip
    rc = resolve(*parse_args(argv), world_size=dp)
    loaders = [make_loader(SFTDataset(str(data)), rc.data, r, dp) for r in range(dp)]
    return [[len(ld.next_global_batch()) for ld in loaders] for _ in range(iters)]


def test_the_steps_split_unevenly_over_two_dp_ranks(data):
    """What the runs below exercise: the DP ranks' micro-batch counts differ from each other
    (and their sum from DP 1's) in some steps."""
    one, two = _counts(data, 1, G, MICRO, ITERS), _counts(data, 2, G, MICRO, ITERS)
    assert any(a != b for a, b in two)
    assert any(sum(c2) != c1 for (c1,), c2 in zip(one, two))
    # the interleaved run (PP 2): some step's ranks run schedules of different lengths even after
    # the fillers that round each count up to a multiple of 2
    padded = [[-(-c // 2) * 2 for c in step] for step in _counts(data, 2, 16, 1, 4)]
    assert any(a != b for a, b in padded), padded


def test_dp2_matches_dp1_and_resumes_across_dp_sizes(one, data, tmp_path):
    ref_dir, ref = one
    want = by_iteration(ref)
    assert list(want) == list(range(1, ITERS + 1))
    assert by_iteration(ref, "consumed_samples") == {i: i * G for i in want}

    # DP 2 for three steps, stopped by --exit_interval (saves): then DP 1 takes over
    head, out = _train(tmp_path / "dp2", data, 2, ["--exit_interval", "3"])
    assert "world 2 (tp 1 pp 1 dp 2)" in out
    assert list(by_iteration(head).values()) == pytest.approx(
        [want[i] for i in (1, 2, 3)], rel=1e-5
    )
    assert by_iteration(head, "consumed_samples") == {i: i * G for i in (1, 2, 3)}
    assert _evals(head) == pytest.approx({k: v for k, v in _evals(ref).items() if k[0] == 3},
                                         rel=1e-5)  # fmt: skip
    tail, out = _train(tmp_path / "dp2to1", data, 1,
                       ["--load", str(tmp_path / "dp2" / "ckpt")])  # fmt: skip
    assert "resharded to tp 1 pp 1 dp 1" in out
    assert list(by_iteration(tail)) == [4, 5, 6]
    assert list(by_iteration(tail).values()) == pytest.approx(
        [want[i] for i in (4, 5, 6)], rel=1e-5
    )
    assert by_iteration(tail, "consumed_samples") == {i: i * G for i in (4, 5, 6)}

    # and the reverse: DP 1's checkpoint at 3 continued at DP 2
    tail, out = _train(tmp_path / "dp1to2", data, 2,
                       ["--load", str(ref_dir / "ckpt" / "iter_0000003")])  # fmt: skip
    assert "resharded to tp 1 pp 1 dp 2" in out
    assert list(by_iteration(tail).values()) == pytest.approx(
        [want[i] for i in (4, 5, 6)], rel=1e-5
    )
    assert by_iteration(tail, "consumed_samples") == {i: i * G for i in (4, 5, 6)}
    assert _evals(tail) == pytest.approx({k: v for k, v in _evals(ref).items() if k[0] == 6},
                                         rel=1e-5)  # fmt: skip


def test_interleaved_pp2_dp2_with_fillers_matches_dp1(data, tmp_path):
    """PP 2 with two chunks a rank (interleaved 1F1B) x DP 2 on the real loader, sharded
    optimizer: 16 samples a step in micro-batches of one row give the DP ranks 5 and 7, 6 and 6,
    6 and 4, 5 and 4 micro-batches, rounded up to even counts with fillers, so the two replicas
    run pipeline schedules of different lengths (6 and 8, 6 and 4, ...) into the same gradient
    reduction. Losses and the evaluation (forward-only pipeline, DP-reduced) match one process."""
    flags = ["--train_iters", "4", "--global_batch_size", "16", "--micro_batch_size", "1",
             "--use_distributed_optimizer"]  # fmt: skip
    ref, _ = _train(tmp_path / "one", data, 1, flags)
    interleaved = ["--pipeline_model_parallel_size", "2",
                   "--num_layers_per_virtual_pipeline_stage", "1"]  # fmt: skip
    rows, out = _train(tmp_path / "pp2", data, 4, [*flags, *interleaved])
    assert "world 4 (tp 1 pp 2 dp 2)" in out
    assert list(by_iteration(rows)) == [1, 2, 3, 4]
    assert list(by_iteration(rows).values()) == pytest.approx(
        list(by_iteration(ref).values()), rel=1e-5
    )
    assert by_iteration(rows, "consumed_samples") == {i: 16 * i for i in (1, 2, 3, 4)}
    assert _evals(rows) == pytest.approx(_evals(ref), rel=1e-5) and len(_evals(ref)) > 2
