"""Two nodes simulated on one machine: two torchrun launches with --nnodes 2 --node_rank 0/1
--nproc_per_node 2 and a static rendezvous on 127.0.0.1, as `make train NNODES=2 NODE_RANK=...`
starts them. Global ranks 2 and 3 then have local ranks 0 and 1 and live in another launcher,
which a one-node run never exercises. They must train exactly like 4 ranks on one node, and a
--save that the second node does not share must be refused before training."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.gloo_ranks import run_ranks
from tests.parallel3d.common import REPO, STAGE1, by_iteration, train_stage1

ARGS = ["--train_iters", "4", "--lr_warmup_iters", "1", "--seq_length", "128",
        "--global_batch_size", "8", "--micro_batch_size", "2", "--log_interval", "1",
        "--save_interval", "2", "--eval_interval", "2", "--eval_iters", "1",
        "--tensor_model_parallel_size", "2", "--sequence_parallel",
        "--use_distributed_optimizer", "--no-activation_memory_report"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(run: Path, data: Path, args: list[str], node1: list[str] = ()) -> list[tuple]:
    """Both "nodes" of `python -m train` at once; node1: a command prefix for the second one.
    Returns each node's (exit code, output)."""
    argv = [f"@{STAGE1}", "--data_path", str(data), "--save", str(run / "ckpt"),
            "--run_dir", str(run), "--tensorboard_dir", str(run / "tb"), *args]  # fmt: skip
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    procs = [
        subprocess.Popen(
            [
                *(node1 if node_rank else []),
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node_rank),
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "train",
                *argv,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node_rank in (0, 1)
    ]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text = p.communicate()[0] + "\n[timed out: likely a hang]"
        out.append((p.returncode, text))
    return out


def test_two_nodes_train_bit_for_bit_like_one_node(data, tmp_path):
    one, _ = train_stage1(tmp_path / "one", data, 4, ARGS)
    nodes = _two_nodes(tmp_path / "two", data, ARGS)
    assert [rc for rc, _ in nodes] == [0, 0], "\n".join(t[-4000:] for _, t in nodes)
    # The last rank (on the second node) logs; nothing else writes metrics.
    assert "iteration" not in nodes[0][1] and "world 4 (tp 2 pp 1 dp 2)" in nodes[1][1]
    rows = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").open()]
    assert [r["type"] for r in rows].count("run_start") == 1
    assert by_iteration(rows) == by_iteration(one) and list(by_iteration(rows)) == [1, 2, 3, 4]
    assert by_iteration(rows, "loss", "eval") == by_iteration(one, "loss", "eval")
    for shard in ("mp_rank_00_000", "mp_rank_01_000"):
        for name in ("model.safetensors", "optim_dp000.safetensors"):
            want = load_file(tmp_path / "one/ckpt/iter_0000004" / shard / name)
            got = load_file(tmp_path / "two/ckpt/iter_0000004" / shard / name)
            assert want.keys() == got.keys()
            assert all(bool((want[k] == got[k]).all()) for k in want), (shard, name)


def _private_mounts() -> bool:
    """A mount namespace of our own (root, or user namespaces) to give "node 1" its own disk."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_mounts(), reason="needs `unshare -m` (a private mount namespace)")
def test_save_on_node_local_storage_is_refused_before_training(data, tmp_path):
    # Node 1 sees its own empty directory at --save's path (a bind mount in its own mount
    # namespace), as on a cluster whose --save is node-local. Every rank wrote its shards into
    # rank 0's temporary directory only at the first save: node 1's ranks failed there with
    # "No such file or directory ... Free disk space or choose a writable directory", after
    # training save_interval iterations (hours, on a real run).
    run, local = tmp_path / "run", tmp_path / "node1_disk"
    run.mkdir()
    local.mkdir()
    bind = [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$0" "$1" && shift && exec "$@"',
        str(local),
        str(run),
    ]
    nodes = _two_nodes(run, data, [*ARGS, "--save_interval", "1"], node1=bind)
    assert all(rc != 0 for rc, _ in nodes), "\n".join(t[-3000:] for _, t in nodes)
    for _, text in nodes:
        assert "ranks 2, 3" in text and "every node mounts at the same path" in text, text[-3000:]
        assert "iteration        1/" not in text
    assert not list((run / "ckpt").glob(".shared_fs_probe_*"))


_PROBE_WORKER = r"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from train.shared_fs import ranks_not_sharing

out, rank = sys.argv[1], int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=3)
shared = ranks_not_sharing(f"{out}/shared")
# Rank 2 looks at another directory under the same name: another node's local disk.
split = ranks_not_sharing(f"{out}/shared" if rank < 2 else f"{out}/local", wait_s=0.5)
if rank == 0:
    json.dump({"shared": shared, "split": split}, open(f"{out}/result.json", "w"))
dist.destroy_process_group()
"""


def test_ranks_not_sharing_names_the_ranks_that_do_not_see_rank_0s_file(tmp_path):
    for d in ("shared", "local"):
        (tmp_path / d).mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_PROBE_WORKER))
    run_ranks(str(worker), [str(tmp_path)], 3, 120, "the shared-storage probe")
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["shared"] == []
    assert res["split"] == [[2, socket.gethostname()]]
    assert not list(tmp_path.glob("*/.shared_fs_probe_*"))  # rank 0 cleans up
