"""A start-up step that fails on some ranks stops every rank, with one message.

Before, a rank whose own start-up failed (its node does not see the data, its per-rank state
file is damaged) printed its error and exited alone, while the others went on into training and
failed in the first collective: a gloo traceback naming no file on them, and under NCCL a hang
until the collective timeout. Now each start-up step ends in an agreement: every rank exits with
the same message naming the ranks that failed and why, and a bug (an unexpected exception) still
prints its traceback on its own rank. `python -m train`'s main on gloo ranks.
"""

from tests.parallel3d.common import launch_main as _launch


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
