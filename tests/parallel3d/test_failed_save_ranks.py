"""A save that fails on one rank fails on every rank, with one message.

Before, the rank whose write failed (its node's disk full) raised and exited while the others
waited in the barrier after the writes: a gloo traceback naming no file on them, and under NCCL a
hang until the collective timeout. Now each step of the save ends in an agreement: every rank
raises the same CheckpointError naming the failed rank and its error, the previous iteration and
the latest file stay as they were, and no temporary directory is left. Three gloo ranks, each
calling ckpt.save_checkpoint with its own (tp, dp) part, one of them made to fail.
"""

import json
import textwrap

import pytest

from tests.gloo_ranks import run_ranks

_WORKER = r"""
import errno, json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from model.config import ModelConfig
from train import checkpoint as ckpt

out, failing, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=3)
cfg = ModelConfig(name="t", vocab_size=40, hidden_size=32, ffn_hidden_size=48, num_layers=1,
                  num_attention_heads=2, num_kv_heads=2, max_position_embeddings=16,
                  make_vocab_size_divisible_by=8)
shapes = cfg.param_shapes(cfg.padded_vocab_size(1))
params = {n: torch.full(s, float(rank)) for n, s in shapes.items()}
meta = {"model": cfg.to_dict(), "has_trainer_state": True, "has_optimizer": False,
        "consumed_train_samples": 0, "optimizer": {"step": 0, "skipped": 0}}
ranks = (rank, 0, 0, rank)  # three DP ranks of one shard: rank 0 writes the tensors


def save(iteration):
    return ckpt.save_checkpoint(f"{out}/save", iteration, params=params, optim_state=None,
                                meta=meta, rank_state={"rank": rank}, ranks=ranks)


save(1)
if rank == failing and where == "write":
    def disk_full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    ckpt._write_json = disk_full
if rank == failing and where == "publish":
    real = os.replace
    def no_rename(src, dst):
        if ".tmp_iter" in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)
    ckpt.os.replace = no_rename
try:
    save(2)
    msg = None
except ckpt.CheckpointError as e:
    msg = str(e)
json.dump({"msg": msg}, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.parametrize(("failing", "where"), [(2, "write"), (0, "write"), (0, "publish")])
def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path, failing, where):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    run_ranks(str(worker), [str(tmp_path), str(failing), where], 3, 120, "the failing save")
    msgs = [json.loads((tmp_path / f"rank{r}.json").read_text())["msg"] for r in range(3)]
    assert msgs[0] is not None and msgs == [msgs[0]] * 3, msgs  # every rank, one message
    error = "Input/output error" if where == "publish" else "No space left on device"
    assert f"saving iteration 2 to {tmp_path / 'save'} failed (rank {failing}: " in msgs[0]
    assert error in msgs[0] and "rank 1:" not in msgs[0]
    assert "still names iteration 1, which is intact" in msgs[0]
    save = tmp_path / "save"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000001",
        "latest_checkpointed_iteration.txt",
    ]  # no iteration 2, no temporary directory
