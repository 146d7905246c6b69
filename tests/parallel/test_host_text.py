"""parallel.host_text.gather_texts on three gloo ranks: each rank's text (or None) on every rank,
UTF-8 intact, an over-long text cut (a split character replaced, not an error)."""

import json
import textwrap

from tests.gloo_ranks import run_ranks

_WORKER = r"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from parallel.host_text import gather_texts

out, rank = sys.argv[1], int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=3)
mine = [None, "rank 1: [Errno 28] No space left on device: '/ckpt/é'", "ü" * 8][rank]
res = {"all": gather_texts(mine), "cut": gather_texts("ab" + "é" * 4, width=5)}
json.dump(res, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_gather_texts_gives_every_rank_every_text(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    run_ranks(str(worker), [str(tmp_path)], 3, 120, "gather_texts")
    want = [None, "rank 1: [Errno 28] No space left on device: '/ckpt/é'", "ü" * 8]
    for r in range(3):
        res = json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8"))
        assert res["all"] == want
        # 5 bytes: "ab", one é (2 bytes), the first byte of the next one (replaced)
        assert res["cut"] == ["abé\ufffd"] * 3
