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
    nodes = ["NODE_RANK=1", "MASTER_ADDR=10.0.0.1"] if nnodes != "1" else []
    line = _launch_line(f"NPROC={nproc}", f"NNODES={nnodes}", *nodes)
    want = max(1, len(os.sched_getaffinity(0)) // int(nproc))
    m = re.search(r"OMP_NUM_THREADS=\$\{OMP_NUM_THREADS:-(\d+)\} \S*torchrun ", line)
    assert m and int(m.group(1)) == want, line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_several_nodes_need_each_node_rank_and_the_head_address():
    """With the defaults (NODE_RANK 0, MASTER_ADDR 127.0.0.1) every node but the head waited
    silently for a master on its own localhost until torchrun's rendezvous timed out (600 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR")}

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "train", "NNODES=2", "NPROC=2", *args], cwd=ROOT,
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip

    for given in ([], ["NODE_RANK=1"], ["MASTER_ADDR=10.0.0.1"]):
        res = make(*given)
        assert res.returncode != 0 and "NODE_RANK" in res.stderr, (given, res.stderr)
        assert "MASTER_ADDR (the head node's address" in res.stderr
    res = make("NODE_RANK=2", "MASTER_ADDR=10.0.0.1")
    assert res.returncode != 0 and "NODE_RANK=2: expected 0 to 1" in res.stderr
    line = _launch_line("NNODES=2", "NPROC=2", env={"NODE_RANK": "1", "MASTER_ADDR": "h1"})
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 2" in line
    res = make("NODE_RANK=1", "MASTER_ADDR=h1")
    assert res.returncode == 0 and "--master_addr h1 --master_port" in res.stdout


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


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_tiny_stages_out_of_order_say_what_to_run_first(tmp_path):
    """In a checkout without runs/: STAGE=2 names `make train STAGE=1`, `make sample` names the
    stages; with a --load of the user's own in ARGS neither is checked."""
    for name in ("configs", "data", "pyproject.toml"):  # what the targets' rules read
        (tmp_path / name).symlink_to(ROOT / name)

    def make(*args):
        return subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-n", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    res = make("train", "STAGE=2")
    assert res.returncode != 0 and "run `make train STAGE=1` first" in res.stderr
    res = make("sample")
    assert res.returncode != 0 and "`make train STAGE=2` first" in res.stderr
    assert make("train", "STAGE=2", "ARGS=--load elsewhere").returncode == 0
    res = make("train", "STAGE=1")  # stage 1 resumes itself from its own --save
    assert res.returncode == 0 and "--load runs/tiny-stage1/checkpoints" in res.stdout
