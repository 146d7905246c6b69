"""Run a worker script as `world` gloo ranks in subprocesses (one thread each) and fail with every
rank's output if any rank fails or hangs. Shared by the multi-process test folders."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_ranks(worker: str, args: list[str], world: int, timeout: float) -> list[tuple[int, str]]:
    """Start `python worker *args` with RANK/LOCAL_RANK/WORLD_SIZE set; (exit code, output) of
    each rank, a hang killed after `timeout` seconds (and said in its output)."""
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
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            out, _ = p.communicate()
            out += "\n[timed out: likely a hang]"
        results.append((p.returncode, out))
    return results


def run_ranks(worker: str, args: list[str], world: int, timeout: float, what: str) -> list[str]:
    """start_ranks, failing with every rank's output if any rank fails or hangs; each rank's log."""
    results = start_ranks(worker, args, world, timeout)
    logs = [f"--- rank {r} (exit {code}) ---\n{out}" for r, (code, out) in enumerate(results)]
    if any(code != 0 for code, _ in results):
        raise AssertionError(f"{what} failed:\n" + "\n".join(logs))
    return logs
