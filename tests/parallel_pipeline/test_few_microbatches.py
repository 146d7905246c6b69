"""PipelineExecutor with fewer micro-batches than pipeline stages, or a count that is not a
multiple of them, on 4 gloo ranks against one process: PP 4 with 1 and 3 micro-batches (the
warm-up is cut short, ranks idle through most of the step), and PP 2 x 2 virtual stages x DP 2
with 2 micro-batches per replica (m = pp: the interleaved table is all warm-up). Losses within
rtol 1e-5 for 10 steps, first-step gradients within rtol 1e-4."""

import os

import pytest
import torch

from tests.gloo_ranks import REPO, run_ranks
from tests.parallel_pipeline.common import reference_run

pytestmark = pytest.mark.slow

# name -> (pp, virtual stages, micro-batches per replica, global micro-batches); world 4
LAYOUTS = {"pp4m1": (4, 1, 1, 1), "pp4m3": (4, 1, 3, 3), "pp2v2dp2m2": (2, 2, 2, 4)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pp_few"))
    specs = [f"{n}:{pp}:{v}:{m}" for n, (pp, v, m, _) in LAYOUTS.items()]
    worker = os.path.join(REPO, "tests", "parallel_pipeline", "few_worker.py")
    run_ranks(worker, [out, *specs], 4, 240, "pipeline few-micro-batches worker")
    return {
        n: [torch.load(os.path.join(out, f"{n}-rank{r}.pt")) for r in range(4)] for n in LAYOUTS
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_few_microbatches_match_one_process(runs, layout):
    ref = reference_run(LAYOUTS[layout][3])
    for r in runs[layout]:
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
        )
        assert r["eval"] == pytest.approx(ref["eval"], rel=1e-5)
    grads = {n: g for r in runs[layout] for n, g in r["grads"].items()}
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item())
