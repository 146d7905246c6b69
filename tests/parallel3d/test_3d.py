"""TP 2 x PP 2 x DP 2 (8 gloo ranks, sequence parallel) through the trainer against one process:
losses within rtol 1e-5 for 10 steps, evaluation too; all-ones gradient norm = sqrt(count)."""

import pytest
from safetensors.torch import load_file

from tests.parallel3d.common import STEPS, launch
from tests.parallel3d.test_trainer_pipeline import assert_grads_close

GLOBAL_BATCH = 16  # 8 micro-batches of 2 rows: 4 per DP rank at DP 2


def _rows(result, kind, key):
    return [r[key] for r in result["history"] if r["type"] == kind]


def test_tp2_pp2_dp2_matches_one_process(tmp_path):
    ref = launch(1, str(tmp_path / "ref"),
                 {"name": "one", "global_batch": GLOBAL_BATCH, "grads_at": 1})  # fmt: skip
    res = launch(8, str(tmp_path / "3d"), {
        "name": "tp2pp2dp2", "tp": 2, "pp": 2, "global_batch": GLOBAL_BATCH,
        "args": ["--sequence_parallel"], "grad_norm_check": True, "grads_at": 1,
    }, timeout=240)  # fmt: skip
    grads = {**load_file(f"{tmp_path}/3d/tp2pp2dp2_grads_pp0.st"),
             **load_file(f"{tmp_path}/3d/tp2pp2dp2_grads_pp1.st")}  # fmt: skip
    assert_grads_close(grads, load_file(f"{tmp_path}/ref/one_grads_pp0.st"), floor=1e-5)
    assert res["dp"] == 2
    want, got = _rows(ref, "train", "lm_loss"), _rows(res, "train", "lm_loss")
    assert len(want) == len(got) == STEPS
    assert got == pytest.approx(want, rel=1e-5), (got, want)
    assert max(want) - min(want) > 0.05
    assert _rows(res, "train", "loss_tokens") == _rows(ref, "train", "loss_tokens")
    assert _rows(res, "eval", "loss") == pytest.approx(_rows(ref, "eval", "loss"), rel=1e-5)
    assert _rows(res, "eval", "accuracy") == pytest.approx(_rows(ref, "eval", "accuracy"))
    norm, expected, _ = res["grad_norm_ones"]
    assert norm == pytest.approx(expected, rel=1e-6)


def test_interleaved_pp2_dp2_with_small_buckets_matches_one_process(tmp_path):
    """PP 2 x 2 chunks x DP 2 with 50 kB gradient buckets: many bucketed all-reduces, launched
    by each chunk's last backward, buckets shared between chunks."""
    ref = launch(1, str(tmp_path / "ref"), {"name": "one", "global_batch": GLOBAL_BATCH})
    res = launch(4, str(tmp_path / "pp"), {
        "name": "pp2v2dp2", "pp": 2, "global_batch": GLOBAL_BATCH, "bucket_mb": 0.05,
        "args": ["--num_layers_per_virtual_pipeline_stage", "2"],
    })  # fmt: skip
    want, got = _rows(ref, "train", "lm_loss"), _rows(res, "train", "lm_loss")
    assert len(got) == STEPS and got == pytest.approx(want, rel=1e-5), (got, want)
