"""`python -m train` under torchrun on the pretokenized sample mix: the tiny stage-1 args at
TP 2 x PP 2 x DP 2 with sequence parallelism (what `make train STAGE=1 NPROC=8 ARGS=...` runs)
against one process, losses within rtol 1e-5; then the 8-rank checkpoint resumed by one process
(another layout, the real data loader at another DP size) continues exactly like the one-process
run."""

from pathlib import Path

import pytest

from tests.parallel3d.common import by_iteration, train_stage1


def _train(run: Path, data: Path, nproc: int, extra: list[str]) -> tuple[list[dict], str]:
    args = ["--train_iters", "8",
            "--lr_warmup_iters", "2", "--seq_length", "128", "--global_batch_size", "8",
            "--micro_batch_size", "2", "--log_interval", "1", "--save_interval", "4",
            "--eval_interval", "4", "--eval_iters", "1", *extra]  # fmt: skip
    return train_stage1(run, data, nproc, args)


def test_tp2_pp2_dp2_launch_and_resume_in_one_process(data, tmp_path):
    one, _ = _train(tmp_path / "one", data, 1, [])
    three_d, out = _train(tmp_path / "3d", data, 8, [
        "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2",
        "--sequence_parallel"])  # fmt: skip
    assert "world 8 (tp 2 pp 2 dp 2)" in out
    want, got = by_iteration(one), by_iteration(three_d)
    assert list(got) == list(range(1, 9))
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-5)
    assert by_iteration(three_d, "loss", "eval") == pytest.approx(
        by_iteration(one, "loss", "eval"), rel=1e-5
    )
    assert (tmp_path / "3d" / "ckpt" / "iter_0000004" / "mp_rank_01_001").is_dir()

    resumed, out = _train(tmp_path / "resumed", data, 1,
                          ["--load", str(tmp_path / "3d" / "ckpt" / "iter_0000004")])  # fmt: skip
    assert "resharded to tp 1 pp 1 dp 1" in out and "reseeded" in out
    tail = by_iteration(resumed)
    assert list(tail) == [5, 6, 7, 8]  # the data position carried over from DP 2
    assert list(tail.values()) == pytest.approx([want[i] for i in tail], rel=1e-5)
