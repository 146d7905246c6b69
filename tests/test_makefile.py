"""What `make train` launches (dry run, `make -n`: nothing is installed or trained)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launch_line(*args: str, env: dict | None = None) -> str:
    res = subprocess.run(
        ["make", "-n", "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    # torchrun's command continues on a second line (`\\`), which also holds `-m train`
    lines = [ln for ln in res.stdout.splitlines() if "torchrun" in ln] or [
        ln for ln in res.stdout.splitlines() if " -m train " in ln
    ]
    [line] = lines
    return line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("nproc,nnodes", [("2", "1"), ("1", "2")])
def test_torchrun_gets_each_local_rank_its_share_of_the_cores(nproc, nnodes):
    """torchrun alone would set OMP_NUM_THREADS=1 and leave an offloaded Adam step on one
    core; the Makefile passes cores / local ranks (at least 1) unless the caller set it."""
    line = _launch_line(f"NPROC={nproc}", f"NNODES={nnodes}")
    want = max(1, len(os.sched_getaffinity(0)) // int(nproc))
    m = re.search(r"OMP_NUM_THREADS=\$\{OMP_NUM_THREADS:-(\d+)\} \S*torchrun ", line)
    assert m and int(m.group(1)) == want, line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_one_process_runs_without_torchrun():
    line = _launch_line()
    assert "torchrun" not in line and "OMP_NUM_THREADS" not in line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_sample_data_is_rebuilt_when_its_inputs_change():
    """The pretokenized sample mix depends on the mix file, the sample tokenizer and every
    bundled sample file: an edited sample must not leave `make train` on the old tokens."""
    res = subprocess.run(["make", "-pn", "data"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    target = "runs/data/sample_stage1/sample_stage1-train-text.idx:"
    [rule] = [ln for ln in res.stdout.splitlines() if ln.startswith(target)]
    prereqs = rule.split(":", 1)[1].split("|")[0].split()
    assert {"configs/data/sample.yaml", "data/assets/sample_sp.model"} <= set(prereqs), rule
    assert "data/samples/orca-chat/orca_best.json" in prereqs, rule
