"""The distributed optimizer (`--use_distributed_optimizer`, train.optimizer.ShardedAdamW) through
the trainer on gloo ranks: the same losses, gradient norms and final weights / optimizer state as
one process and as the replicated optimizer at the same DP size; the TP-replicated norm weights
counted once in the sharded gradient norm; each rank holding only its share of the state."""

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel3d.common import STEPS, launch, run_config
from train.footprint import footprint, rank_params

GLOBAL_BATCH = 16
DIST = "--use_distributed_optimizer"


def _rows(result, key):
    return [r[key] for r in result["history"] if r["type"] == "train"]


def _state(out_dir, name: str, pp: int = 1) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for r in range(pp):
        merged.update(load_file(f"{out_dir}/{name}_state_pp{r}.st"))
    return merged


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    res = launch(1, str(out), {"name": "one", "global_batch": GLOBAL_BATCH,
                               "dump_after_train": True})  # fmt: skip
    return res, _state(out, "one")


def test_dp4_small_buckets_matches_replicated_and_one_process(one_process, tmp_path):
    """DP 4 with 50 kB buckets (many reduce-scatters and all-gathers, pieces that cut through
    parameters and through the decay / no-decay boundary)."""
    ref, ref_state = one_process
    common = {"global_batch": GLOBAL_BATCH, "bucket_mb": 0.05, "dump_after_train": True}
    plain = launch(4, str(tmp_path), {"name": "plain", **common})
    dist = launch(4, str(tmp_path), {"name": "dist", **common, "args": [DIST]})
    assert len(_rows(dist, "lm_loss")) == STEPS
    assert _rows(dist, "lm_loss") == pytest.approx(_rows(plain, "lm_loss"), rel=1e-6)
    assert _rows(dist, "lm_loss") == pytest.approx(_rows(ref, "lm_loss"), rel=1e-5)
    assert _rows(dist, "grad_norm") == pytest.approx(_rows(plain, "grad_norm"), rel=1e-5)
    assert max(_rows(ref, "lm_loss")) - min(_rows(ref, "lm_loss")) > 0.05
    state, plain_state = _state(tmp_path, "dist"), _state(tmp_path, "plain")
    assert set(state) == set(ref_state) == set(plain_state)
    for key, t in ref_state.items():
        torch.testing.assert_close(state[key], plain_state[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[key], t, rtol=1e-4, atol=1e-5)
    assert state["exp_avg_sq/layers.0.attention_norm.weight"].abs().sum() > 0
    shares = dist["optimizer_shares"]
    assert shares["dp"] == 4 and shares["params"] > 0
    # each rank's state: its quarter of the buffer (each bucket padded to a multiple of 128 x 4,
    # so a rank's piece of a bucket is at most 127 elements longer than a quarter)
    assert shares["params"] / 4 <= shares["local"] < shares["params"] / 4 + 128 * shares["buckets"]


def test_tp2_pp2_dp2_sequence_parallel_matches_replicated(one_process, tmp_path):
    """8 ranks, sequence parallel: the norm weights' partial gradients summed over TP on the
    reduced pieces; the gradient norm of all-ones gradients is sqrt(parameter count). Against
    the replicated optimizer at the same layout (same TP reduction order), to near-exact; the
    losses against one process too."""
    ref, _ = one_process
    job = {"tp": 2, "pp": 2, "global_batch": GLOBAL_BATCH, "grad_norm_check": True,
           "dump_after_train": True}  # fmt: skip
    plain = launch(8, str(tmp_path), {"name": "plain", **job, "args": ["--sequence_parallel"]},
                   timeout=240)  # fmt: skip
    res = launch(8, str(tmp_path), {"name": "dist", **job, "args": ["--sequence_parallel", DIST]},
                 timeout=240)  # fmt: skip
    assert res["dp"] == 2
    assert _rows(res, "lm_loss") == pytest.approx(_rows(ref, "lm_loss"), rel=1e-5)
    assert _rows(res, "lm_loss") == pytest.approx(_rows(plain, "lm_loss"), rel=1e-6)
    assert _rows(res, "grad_norm") == pytest.approx(_rows(plain, "grad_norm"), rel=1e-5)
    norm, expected, _ = res["grad_norm_ones"]
    assert norm == pytest.approx(expected, rel=1e-6)
    # the footprint predicted for the last stage (the result's rank) is what it holds
    rc, _ = run_config(2, 2, 8, GLOBAL_BATCH)
    shares = res["optimizer_shares"]
    assert shares["params"] == rank_params(rc.model, rc.model.padded_vocab_size(2), 2, 2, 1)
    fp = footprint(rc.model, rc.model.padded_vocab_size(2), 2, 2, 2, bf16=False, distributed=True)
    assert fp.params == shares["params"]
    assert shares["params"] / 2 <= shares["local"] < shares["params"] / 2 + 128 * shares["buckets"]
    state, plain_state = _state(tmp_path, "dist", pp=2), _state(tmp_path, "plain", pp=2)
    assert set(state) == set(plain_state)
    for key, t in plain_state.items():
        torch.testing.assert_close(state[key], t, rtol=1e-5, atol=1e-6, msg=key)


def test_interleaved_pp2_dp2_small_buckets_matches_one_process(one_process, tmp_path):
    """PP 2 x 2 virtual chunks x DP 2 with 50 kB buckets: buckets shared between a rank's chunks,
    reduce-scattered by whichever chunk's backward completes them."""
    ref, ref_state = one_process
    res = launch(4, str(tmp_path), {
        "name": "pp2v2dp2", "pp": 2, "global_batch": GLOBAL_BATCH, "bucket_mb": 0.05,
        "args": ["--num_layers_per_virtual_pipeline_stage", "2", DIST], "dump_after_train": True,
    })  # fmt: skip
    assert res["dp"] == 2 and res["optimizer_shares"]["buckets"] > 4
    assert _rows(res, "lm_loss") == pytest.approx(_rows(ref, "lm_loss"), rel=1e-5)
    state = _state(tmp_path, "pp2v2dp2", pp=2)
    assert set(state) == set(ref_state)
    for key, t in ref_state.items():
        torch.testing.assert_close(state[key], t, rtol=1e-4, atol=2e-5, msg=key)


def test_cpu_offload_at_dp2_matches_one_process(one_process, tmp_path):
    """--optimizer_cpu_offload at DP 2: each rank's pieces updated in host memory, sent back
    through the device staging buffer and all-gathered; saved state gathered from the host."""
    ref, ref_state = one_process
    res = launch(2, str(tmp_path), {
        "name": "offload", "global_batch": GLOBAL_BATCH, "dump_after_train": True,
        "args": [DIST, "--optimizer_cpu_offload"],
    })  # fmt: skip
    assert res["dp"] == 2
    assert _rows(res, "lm_loss") == pytest.approx(_rows(ref, "lm_loss"), rel=1e-5)
    state = _state(tmp_path, "offload")
    assert set(state) == set(ref_state)
    for key, t in ref_state.items():
        torch.testing.assert_close(state[key], t, rtol=1e-4, atol=2e-5, msg=key)


def test_without_weight_gradient_fusion_matches_one_process(one_process, tmp_path):
    """--no_gradient_accumulation_fusion at DP 2: every gradient arrives through the hooks and
    autograd's .grad, then is reduce-scattered as before."""
    ref, ref_state = one_process
    res = launch(2, str(tmp_path), {
        "name": "unfused", "global_batch": GLOBAL_BATCH, "dump_after_train": True,
        "args": [DIST, "--no_gradient_accumulation_fusion"],
    })  # fmt: skip
    assert _rows(res, "lm_loss") == pytest.approx(_rows(ref, "lm_loss"), rel=1e-5)
    state = _state(tmp_path, "unfused")
    for key, t in ref_state.items():
        torch.testing.assert_close(state[key], t, rtol=1e-4, atol=2e-5, msg=key)
