"""`python -m train` under torchrun on the pretokenized sample mix: the tiny stage-1 args at
TP 2 x PP 2 x DP 2 with sequence parallelism (what `make train STAGE=1 NPROC=8 ARGS=...` runs)
against one process, losses within rtol 1e-5; then the 8-rank checkpoint resumed by one process
(another layout, the real data loader at another DP size) continues exactly like the one-process
run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel3d.common import REPO

STAGE1 = Path(REPO) / "configs" / "train" / "tiny-stage1.args"


def _train(run: Path, data: Path, nproc: int, extra: list[str]) -> tuple[list[dict], str]:
    argv = [f"@{STAGE1}", "--data_path", str(data), "--save", str(run / "ckpt"),
            "--run_dir", str(run), "--tensorboard_dir", str(run / "tb"), "--train_iters", "8",
            "--lr_warmup_iters", "2", "--seq_length", "128", "--global_batch_size", "8",
            "--micro_batch_size", "2", "--log_interval", "1", "--save_interval", "4",
            "--eval_interval", "4", "--eval_iters", "1", *extra]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([*launcher, "-m", "train", *argv], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, p.stdout


def _losses(rows, kind="train", key="lm_loss"):
    return {r["iteration"]: r[key] for r in rows if r["type"] == kind}


def test_tp2_pp2_dp2_launch_and_resume_in_one_process(data, tmp_path):
    one, _ = _train(tmp_path / "one", data, 1, [])
    three_d, out = _train(tmp_path / "3d", data, 8, [
        "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2",
        "--sequence_parallel"])  # fmt: skip
    assert "world 8 (tp 2 pp 2 dp 2)" in out
    want, got = _losses(one), _losses(three_d)
    assert list(got) == list(range(1, 9))
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-5)
    assert _losses(three_d, "eval", "loss") == pytest.approx(_losses(one, "eval", "loss"), rel=1e-5)
    assert (tmp_path / "3d" / "ckpt" / "iter_0000004" / "mp_rank_01_001").is_dir()

    resumed, out = _train(tmp_path / "resumed", data, 1,
                          ["--load", str(tmp_path / "3d" / "ckpt" / "iter_0000004")])  # fmt: skip
    assert "resharded to tp 1 pp 1 dp 1" in out and "reseeded" in out
    tail = _losses(resumed)
    assert list(tail) == [5, 6, 7, 8]  # the data position carried over from DP 2
    assert list(tail.values()) == pytest.approx([want[i] for i in tail], rel=1e-5)
