"""Save -> load: exact resume, --finetune, refusals, and what is on disk."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.train.helpers import SyntheticLoader, tiny_run
from train import checkpoint as ckpt
from train.loop import Trainer
from train.run import run_training

ARGS = ["--hidden_dropout", "0.1", "--lima_dropout", "--train_iters", "5", "--save_interval", "3",
        "--log_interval", "1"]  # fmt: skip


def _losses(history):
    return {r["iteration"]: r["lm_loss"] for r in history if r["type"] == "train"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Five uninterrupted steps with dropout, checkpoints at 3 and 5."""
    tmp = tmp_path_factory.mktemp("ref")
    rc, dims, tok = tiny_run(ARGS, tmp)
    torch.manual_seed(1)
    trainer = Trainer(rc, dims, tok)
    history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 2), {}, None)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return tmp, _losses(history), final


def test_resume_reproduces_the_next_steps_exactly(reference_run, tmp_path):
    ref_dir, ref_losses, ref_final = reference_run
    rc, dims, tok = tiny_run([*ARGS, "--load", str(ref_dir / "ckpt" / "iter_0000003")], tmp_path)
    torch.manual_seed(12345)  # a different global RNG: the checkpoint's must be restored
    trainer = Trainer(rc, dims, tok)
    loader_state = trainer.load(rc.ckpt.load)
    assert trainer.iteration == 3 and trainer.consumed_samples == 3 * rc.loop.global_batch_size
    assert trainer.optimizer.step_count == 3
    loader = SyntheticLoader(2, 64, 2)
    loader.load_state_dict(loader_state)
    history = run_training(rc, dims, trainer, loader, {}, None)
    losses = _losses(history)
    assert sorted(losses) == [4, 5]
    assert losses[4] == ref_losses[4] and losses[5] == ref_losses[5]  # bitwise
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), ref_final[n]), n


def test_finetune_loads_weights_only(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    rc, dims, tok = tiny_run([*ARGS, "--load", str(ref_dir / "ckpt"), "--finetune"], tmp_path)
    trainer = Trainer(rc, dims, tok)
    assert trainer.load(rc.ckpt.load) is None  # no loader state: the data starts afresh
    assert trainer.iteration == 0 and trainer.consumed_samples == 0
    assert trainer.optimizer.step_count == 0
    for g in trainer.optimizer.groups:
        assert not g.exp_avg.any() and not g.exp_avg_sq.any()
    saved, _ = ckpt.read_full_state_dict(ref_dir / "ckpt")  # latest: iteration 5
    for n, p in trainer.model.named_parameters():
        want = saved[n]
        assert torch.equal(p.detach()[: want.shape[0]], want), n
    # and it trains on from there: the first step runs at warm-up lr 1
    res = trainer.train_step(SyntheticLoader(2, 64, 2).next_global_batch(), lr=1e-3)
    assert not res.skipped and trainer.optimizer.step_count == 1


def test_no_load_optim_keeps_iteration_but_fresh_moments(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    rc, dims, tok = tiny_run([*ARGS, "--load", str(ref_dir / "ckpt"), "--no_load_optim"], tmp_path)
    trainer = Trainer(rc, dims, tok)
    trainer.load(rc.ckpt.load)
    assert trainer.iteration == 5
    assert all(not g.exp_avg.any() for g in trainer.optimizer.groups)


def test_another_tokenizer_is_refused(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    rc, dims, tok = tiny_run([*ARGS, "--load", str(ref_dir / "ckpt")], tmp_path)
    tok.fingerprint = "another-tokenizer"
    with pytest.raises(ckpt.CheckpointError, match="another tokenizer/vocabulary"):
        Trainer(rc, dims, tok).load(rc.ckpt.load)


def test_another_architecture_is_refused(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    rc, dims, tok = tiny_run(
        [*ARGS, "--load", str(ref_dir / "ckpt"), "--num_layers", "3"], tmp_path
    )
    with pytest.raises(ckpt.CheckpointError, match="num_layers: checkpoint 2, run 3"):
        Trainer(rc, dims, tok).load(rc.ckpt.load)


def test_checkpoint_files_hold_no_pickles_and_carry_layouts(reference_run):
    ref_dir, _, _ = reference_run
    root = ref_dir / "ckpt"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_0000003", "iter_0000005"]
    it = root / "iter_0000005"
    files = sorted(str(p.relative_to(it)) for p in it.rglob("*") if p.is_file())
    shard = "mp_rank_00_000/"
    assert files == ["meta.json", shard + "model.safetensors", shard + "optim_dp000.safetensors",
                     shard + "state_dp000.json"]  # fmt: skip
    meta = json.loads((it / "meta.json").read_text())
    assert meta["iteration"] == 5 and meta["consumed_train_samples"] == 20
    assert meta["optimizer"]["step"] == 5 and meta["layout"]["tp"] == 1
    assert meta["args"]["model"]["lima_dropout"] is True
    state = json.loads((it / "mp_rank_00_000" / "state_dp000.json").read_text())
    assert state["loader"] == {"step": 5} and len(state["rng"]["cpu"]) > 100
    with safe_open(str(it / "mp_rank_00_000" / "optim_dp000.safetensors"), "pt") as f:
        layouts = json.loads(f.metadata()["tensors"])
        assert {k.split("/")[0] for k in f.keys()} == {"master", "exp_avg", "exp_avg_sq"}
        qkv = layouts["master/layers.0.attention.wqkv.weight"]
        assert qkv["name"] == "layers.0.attention.wqkv.weight" and qkv["tp_dim"] == 0


def test_weights_only_checkpoint_starts_at_iteration_zero(tmp_path):
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    sd = {n: p.detach().clone() * 0.5 for n, p in trainer.model.named_parameters()}
    meta = {"model": rc.model.to_dict(), "tokenizer": {"fingerprint": tok.fingerprint}}
    ckpt.write_full_checkpoint(tmp_path / "w", 0, sd, meta)
    rc2, dims, tok = tiny_run(["--load", str(tmp_path / "w")])
    t2 = Trainer(rc2, dims, tok)
    assert t2.load(rc2.ckpt.load) is None and t2.iteration == 0
    for n, p in t2.model.named_parameters():
        assert torch.equal(p.detach(), sd[n]), n


@pytest.mark.parametrize(("rank", "says"), [("0", False), ("1", True)])
def test_load_messages_come_from_the_logging_rank_only(reference_run, tmp_path, monkeypatch,
                                                       capsys, rank, says):  # fmt: skip
    """Every rank loads the checkpoint; the "resumed from" line came once per rank (8 times on a
    node of 8), now only from the last rank, the one that logs."""
    ref_dir, _, _ = reference_run
    rc, dims, tok = tiny_run([*ARGS, "--load", str(ref_dir / "ckpt" / "iter_0000003")], tmp_path)
    trainer = Trainer(rc, dims, tok)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    trainer.load(rc.ckpt.load)
    assert ("resumed from" in capsys.readouterr().out) == says
