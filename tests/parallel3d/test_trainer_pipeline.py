"""The trainer's own step under pipeline parallelism (1F1B and interleaved) against PP = 1 from
the same seed: losses and evaluation within rtol 1e-5 over 10 steps, the first step's reduced
gradients within rtol 1e-4; the gradient norm of all-ones gradients at PP = 2 is
sqrt(parameter count)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel3d.common import STEPS, launch

GLOBAL_BATCH = 8  # 4 micro-batches of 2 rows per step: a multiple of PP 4 for interleaving


def _losses(result):
    return [r["lm_loss"] for r in result["history"] if r["type"] == "train"]


def _evals(result):
    return [r["loss"] for r in result["history"] if r["type"] == "eval"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pp1"))
    res = launch(1, out, {"name": "pp1", "global_batch": GLOBAL_BATCH, "grads_at": 1})
    res["grads"] = load_file(f"{out}/pp1_grads_pp0.st")
    return res


def assert_grads_close(got: dict, want: dict, floor: float = 0.0) -> None:
    """rtol 1e-4, with an absolute floor of `floor` x each tensor's largest entry (under TP,
    entries near zero carry the reduction-order noise of the larger ones). Pipelining alone does
    not reorder any sum, so PP runs need no floor (on this machine they are bit-identical)."""
    assert set(got) == set(want)
    for k, w in want.items():
        atol = floor * float(w.abs().max())
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert any(float(w.abs().max()) > 0 for w in want.values())


@pytest.mark.parametrize(
    ("name", "world", "pp", "extra"),
    [
        ("pp2", 2, 2, []),
        ("pp4v2", 4, 4, ["--num_layers_per_virtual_pipeline_stage", "1"]),
    ],
)
def test_pipeline_trainer_matches_pp1(reference, tmp_path, name, world, pp, extra):
    job = {"name": name, "pp": pp, "global_batch": GLOBAL_BATCH, "args": extra,
           "grad_norm_check": pp == 2, "grads_at": 1}  # fmt: skip
    res = launch(world, str(tmp_path), job)
    grads = {}
    for r in range(pp):
        grads.update(load_file(f"{tmp_path}/{name}_grads_pp{r}.st"))
    assert_grads_close(grads, reference["grads"])
    ref = _losses(reference)
    got = _losses(res)
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5), (got, ref)
    assert max(ref) - min(ref) > 0.05  # the weights move: a no-op step would match trivially
    assert len(_evals(res)) == 6 and _evals(res) == pytest.approx(_evals(reference), rel=1e-5)
    if pp == 2:
        norm, expected, count = res["grad_norm_ones"]
        assert count > 100_000
        # fp32 per-tensor norms: ~1e-8 relative; one norm weight (128) missed would be ~6e-5
        assert norm == pytest.approx(expected, rel=1e-6) and expected == math.sqrt(count)


@pytest.mark.parametrize("reduction", ["global", "microbatch"])
def test_micro_batch_counts_that_differ_by_rank_and_are_no_multiple_of_pp(tmp_path, reduction):
    """Global batches of samples (the default --global_batch_unit) give each DP rank as many
    micro-batches as its samples fill: here 3 in a step, 2 on one DP rank and 1 on the other
    under interleaved 1F1B at PP 2 (fillers round each rank up to a multiple of pp). Losses,
    gradients and evaluation match one process running the same 3 micro-batches, in both loss
    reductions (the micro-batch mean counts real micro-batches over all ranks)."""
    args = ["--loss_reduction", reduction]
    ref = launch(1, str(tmp_path / "one"), {"name": "one", "global_batch": 6, "args": args,
                                            "grads_at": 1})  # fmt: skip
    interleaved = [*args, "--num_layers_per_virtual_pipeline_stage", "1"]
    job = {"name": "uneven", "pp": 2, "global_batch": 6, "args": interleaved, "grads_at": 1,
           "dp_cuts": [0, 2]}  # fmt: skip
    res = launch(4, str(tmp_path / "uneven"), job)
    assert res["dp"] == 2
    grads = {}
    for r in range(2):
        grads.update(load_file(f"{tmp_path}/uneven/uneven_grads_pp{r}.st"))
    assert_grads_close(grads, load_file(f"{tmp_path}/one/one_grads_pp0.st"))
    assert _losses(res) == pytest.approx(_losses(ref), rel=1e-5)
    assert max(_losses(ref)) - min(_losses(ref)) > 0.05
    assert _evals(res) == pytest.approx(_evals(ref), rel=1e-5)
