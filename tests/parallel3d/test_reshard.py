"""Checkpoints across layouts: save at (TP 2, PP 2) after 3 steps, load at (1,1), (1,2), (2,1)
with DP 2, and (4,1): no flag needed. The gathered weights and optimizer state (master,
exp_avg, exp_avg_sq; vocabulary rows trimmed to the real vocabulary, the padding being per
layout) are torch.equal to the saved ones; the data position carries over (also to DP 2); the
next step's loss equals the saving layout's own step 4 within rtol 1e-6 (dropout 0). The
distributed optimizer loads the same checkpoint at DP 2 and 4, and what it saves loads at TP 1
/ PP 1 / DP 1 into the replicated one."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from parallel.dims import ParallelDims
from tests.parallel3d.common import launch, run_config
from train.checkpoint_io import CheckpointError
from train.loop import Trainer

GLOBAL_BATCH = 8
ARGS = ["--train_iters", "4", "--eval_iters", "0"]


def _state(out_dir, name: str, pp: int) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for r in range(pp):
        part = load_file(f"{out_dir}/{name}_state_pp{r}.st")
        assert not set(part) & set(merged), "a tensor on two pipeline stages"
        merged.update(part)
    return merged


def _step_loss(result, it: int) -> float:
    return next(r["lm_loss"] for r in result["history"] if r["iteration"] == it)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("save")
    job = {"name": "save", "tp": 2, "pp": 2, "global_batch": GLOBAL_BATCH,
           "args": [*ARGS, "--exit_interval", "3", "--save", str(out / "ckpt")],
           "dump_after_train": True, "continue_to": 4}  # fmt: skip
    res = launch(4, str(out), job)
    return out, res, _state(out, "save", 2)


LAYOUTS = [(1, 1, 1, False), (1, 2, 2, False), (2, 1, 4, False), (4, 1, 4, False),
           (1, 1, 4, True), (2, 1, 4, True)]  # fmt: skip


@pytest.mark.parametrize(("tp", "pp", "world", "sharded"), LAYOUTS)
def test_load_at_another_layout(saved, tmp_path, tp, pp, world, sharded):
    """sharded: into the distributed optimizer (DP 4 and DP 2), each rank reading its pieces."""
    out, ref, ref_state = saved
    name = f"load_tp{tp}pp{pp}w{world}{'_dist' if sharded else ''}"
    job = {"name": name, "tp": tp, "pp": pp, "global_batch": GLOBAL_BATCH,
           "args": [*ARGS, "--load", str(out / "ckpt" / "iter_0000003"),
                    *(["--use_distributed_optimizer"] if sharded else [])],
           "dump_after_load": True}  # fmt: skip
    res = launch(world, str(tmp_path), job)
    state = _state(tmp_path, name, pp)
    assert set(state) == set(ref_state)
    kinds = {k.split("/", 1)[0] for k in state}
    assert kinds == {"model", "master", "exp_avg", "exp_avg_sq"}
    for key, t in ref_state.items():
        assert torch.equal(state[key], t), key
    assert ref_state["exp_avg/layers.0.mlp.w2.weight"].abs().sum() > 0  # real moments compared
    assert res["loaded_iteration"] == 3
    assert res["loaded_consumed_samples"] == 3 * GLOBAL_BATCH
    assert res["loaded_loader"] == {"step": 3}  # the same global batches come next at any DP
    assert res["dp"] == world // (tp * pp)
    assert _step_loss(res, 4) == pytest.approx(_step_loss(ref, 4), rel=1e-6)
    if (tp, pp) != (2, 2):
        assert "resharded to" in res["log"]
    if pp != 2:
        assert "reseeded" in res["log"]  # no saved RNG stream maps to another pipeline split
    else:
        assert "saved stream restored" in res["log"]


def test_distributed_optimizer_saves_what_any_layout_loads(tmp_path):
    """Saved by the distributed optimizer at (TP 1, PP 2, DP 2): the state gathered from the DP
    pieces is written whole, and one process with the replicated optimizer loads it exactly."""
    job = {"name": "save", "pp": 2, "global_batch": GLOBAL_BATCH,
           "args": [*ARGS, "--exit_interval", "3", "--save", str(tmp_path / "ckpt"),
                    "--use_distributed_optimizer"],
           "dump_after_train": True, "continue_to": 4}  # fmt: skip
    ref = launch(4, str(tmp_path), job)
    assert ref["dp"] == 2
    ref_state = _state(tmp_path, "save", 2)
    job = {"name": "load", "global_batch": GLOBAL_BATCH,
           "args": [*ARGS, "--load", str(tmp_path / "ckpt" / "iter_0000003")],
           "dump_after_load": True}  # fmt: skip
    res = launch(1, str(tmp_path), job)
    state = _state(tmp_path, "load", 1)
    assert set(state) == set(ref_state)
    assert {k.split("/", 1)[0] for k in state} == {"model", "master", "exp_avg", "exp_avg_sq"}
    for key, t in ref_state.items():
        assert torch.equal(state[key], t), key
    assert ref_state["exp_avg/layers.0.mlp.w2.weight"].abs().sum() > 0
    assert _step_loss(res, 4) == pytest.approx(_step_loss(ref, 4), rel=1e-6)


def test_incomplete_shard_set_names_what_cannot_be_resharded(saved, tmp_path):
    """A (tp 1, pp 1) optimizer shard gone: the optimizer state of the tensors it held cannot be
    assembled at any layout; the error names the missing file before any tensor is read, and
    says how to go on (copy it, or resume with fresh moments)."""
    out, _, _ = saved
    ckpt = tmp_path / "iter_0000003"
    shutil.copytree(out / "ckpt" / "iter_0000003", ckpt)
    (ckpt / "mp_rank_01_001" / "optim_dp000.safetensors").unlink()
    rc, tok = run_config(1, 1, 1, GLOBAL_BATCH, [*ARGS, "--load", str(ckpt)])
    trainer = Trainer(rc, ParallelDims(), tok)
    with pytest.raises(CheckpointError) as e:
        trainer.load(rc.ckpt.load)
    msg = str(e.value)
    assert "mp_rank_01_001/optim_dp000.safetensors is missing" in msg, msg
    assert "--no_load_optim" in msg, msg
