"""parallel.host_text.gather_texts on three gloo ranks: each rank's text (or None) on every rank,
UTF-8 intact, an over-long text cut (a split character replaced, not an error); agree's one
message from them; rank_span's rank lists."""

import json
import textwrap

from parallel.host_text import rank_span
from tests.gloo_ranks import run_ranks

_WORKER = r"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from parallel.host_text import agree, gather_texts

out, rank = sys.argv[1], int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=3)
mine = [None, "rank 1: [Errno 28] No space left on device: '/ckpt/é'", "ü" * 8][rank]
res = {"all": gather_texts(mine), "cut": gather_texts("ab" + "é" * 4, width=5),
       "none": agree(None), "same": agree("disk full"),
       "mixed": agree([None, "disk full", "disk full"][rank]),
       "two": agree(["bad file", None, "disk full"][rank])}
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
        assert res["none"] is None
        assert res["same"] == "disk full"  # every rank: no rank list
        assert res["mixed"] == "ranks 1-2: disk full"
        assert res["two"] == "rank 0: bad file; rank 2: disk full"


def test_rank_span_collapses_runs():
    assert rank_span([3]) == "rank 3"
    assert rank_span([9, 0, 1, 2, 3, 5, 6]) == "ranks 0-3, 5-6, 9"
    assert rank_span(list(range(1024))) == "ranks 0-1023"
