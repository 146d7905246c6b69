"""A run whose torch.distributed shutdown never returns still ends, with its own exit code.

Under torch 2.4 and 2.5 a gloo rank sometimes never returned from destroy_process_group after a
run that had trained and saved (README, "Versions"): the job then never ended. main's watchdog
now exits such a rank with the run's code after a bounded wait, and says why. Simulated here: a
rank whose destroy_process_group sleeps for an hour, with the watchdog's wait cut to 2 s.
"""

import pytest

from tests.parallel3d.common import launch_main


def _logs(results) -> str:
    return "\n".join(f"--- rank {r} (exit {c}) ---\n{out}" for r, (c, out) in enumerate(results))


@pytest.mark.parametrize("finished", [True, False], ids=["after_training", "after_a_refusal"])
def test_a_shutdown_that_never_returns_ends_with_the_runs_code(data, tmp_path, finished):
    save = tmp_path / "ckpt"
    args = ["--data_path", str(data), "--train_iters", "2", "--save", str(save)]
    faults = "hang-shutdown@1" if finished else "no-data@0,hang-shutdown@1"
    res = launch_main(tmp_path, "run", 2, faults, args, timeout=60)
    logs = _logs(res)
    code = 0 if finished else 2
    assert [c for c, _ in res] == [code, code], logs
    said = "did not shut down within 2 s (torch "
    assert said in res[1][1] and f"exiting with code {code}" in res[1][1], logs
    assert said not in res[0][1], logs
    if finished:  # the run itself was complete
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    else:
        assert "error: rank 0: --data_path" in res[1][1], logs
