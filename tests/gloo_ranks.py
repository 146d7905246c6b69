"""Run a worker script as `world` gloo ranks in subprocesses (one thread each) and fail with every
rank's output if any rank fails or hangs. Shared by the multi-process test folders."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ranks(worker: str, args: list[str], world: int, timeout: float, what: str) -> list[str]:
    """Start `python worker *args` with RANK/LOCAL_RANK/WORLD_SIZE set; return each rank's log."""
    env = dict(os.environ, WORLD_SIZE=str(world), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, worker, *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs, failed = [], False
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            out, _ = p.communicate()
            out += "\n[timed out: likely a hang]"
        failed |= p.returncode != 0
        logs.append(f"--- rank {rank} (exit {p.returncode}) ---\n{out}")
    if failed:
        raise AssertionError(f"{what} failed:\n" + "\n".join(logs))
    return logs
