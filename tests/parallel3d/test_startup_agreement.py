"""A start-up step that fails on some ranks stops every rank, with one message.

Before, a rank whose own start-up failed (its node does not see the data, its per-rank state
file is damaged) printed its error and exited alone, while the others went on into training and
failed in the first collective: a gloo traceback naming no file on them, and under NCCL a hang
until the collective timeout. Now each start-up step ends in an agreement: every rank exits with
the same message naming the ranks that failed and why, and a bug (an unexpected exception) still
prints its traceback on its own rank. `python -m train`'s main on gloo ranks.
"""

import textwrap
from pathlib import Path

from tests.gloo_ranks import start_ranks
from tests.parallel3d.common import STAGE1

_WORKER = r"""
import dataclasses, os, sys
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from train import data as train_data, main

rdzv, faults, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank,
                        world_size=int(os.environ["WORLD_SIZE"]))
real_open = train_data.open_datasets
for fault in faults.split(","):
    what, _, who = fault.partition("@")
    if who and int(who) == rank and what == "no-data":  # this node does not see the data
        train_data.open_datasets = lambda cfg: real_open(
            dataclasses.replace(cfg, train_prefix=cfg.train_prefix + "-elsewhere"))
    if who and int(who) == rank and what == "bug":
        def broken(cfg):
            raise RuntimeError("a bug while opening the data")
        train_data.open_datasets = broken
sys.exit(main.main(argv))
"""


def _launch(tmp: Path, name: str, world: int, faults: str, args: list[str]):
    worker = tmp / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    argv = [f"@{STAGE1}", "--seq_length", "128", "--micro_batch_size", "2",
            "--global_batch_size", str(2 * world), "--log_interval", "1",
            "--eval_interval", "100", "--lr_warmup_iters", "1", "--no-activation_memory_report",
            "--run_dir", str(tmp / "run"), "--tensorboard_dir", str(tmp / "run" / "tb"),
            *args]  # fmt: skip
    return start_ranks(str(worker), [str(tmp / f"rdzv_{name}"), faults, *argv], world, 150)


def _logs(results) -> str:
    return "\n".join(f"--- rank {r} (exit {c}) ---\n{out}" for r, (c, out) in enumerate(results))


def test_a_damaged_state_file_read_by_one_rank_stops_every_rank(data, tmp_path):
    save = tmp_path / "ckpt"
    common = ["--data_path", str(data), "--save", str(save), "--save_interval", "2"]
    first = _launch(tmp_path, "first", 2, "", [*common, "--train_iters", "2"])
    assert [c for c, _ in first] == [0, 0], _logs(first)
    # DP rank 1's RNG and data position: only rank 1 reads this file when resuming.
    state = save / "iter_0000002" / "mp_rank_00_000" / "state_dp001.json"
    state.write_text('{"rng": ')  # a copy cut short
    resumed = _launch(tmp_path, "resumed", 2, "", [*common, "--train_iters", "4",
                                                   "--load", str(save)])  # fmt: skip
    assert [c for c, _ in resumed] == [2, 2], _logs(resumed)
    want = f"error: rank 1: --load {save}: {state}: not valid JSON"
    for _, out in resumed:
        assert want in out, _logs(resumed)
        assert "Traceback" not in out and "iteration        3" not in out, _logs(resumed)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
    ]


def test_failures_on_some_ranks_reach_every_rank_and_a_bug_keeps_its_traceback(data, tmp_path):
    res = _launch(tmp_path, "faults", 3, "no-data@1,bug@2",
                  ["--data_path", str(data), "--train_iters", "2",
                   "--save", str(tmp_path / "ckpt")])  # fmt: skip
    logs = _logs(res)
    assert [c for c, _ in res] == [2, 2, 1], logs  # rank 2 raised its bug
    missing = f"rank 1: --data_path {data}-elsewhere: {data}-elsewhere-text.idx"
    bug = "rank 2: RuntimeError: a bug while opening the data (unexpected; rank 2 printed its"
    for rank, (_, out) in enumerate(res):
        assert missing in out and bug in out, logs
        assert ("Traceback" in out) == (rank == 2), logs
    assert "RuntimeError: a bug while opening the data\n" in res[2][1], logs
