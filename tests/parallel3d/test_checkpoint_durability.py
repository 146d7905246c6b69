"""A checkpoint is on disk before anything names it.

The iteration is written under a temporary name, renamed into place, and only then named by
latest_checkpointed_iteration.txt (after which --keep_last_n_checkpoints deletes older ones). The
rename protects against a crashed process, but after a power loss or kernel crash the page cache
is gone: unless each file's data (and the directory entries) were flushed first, the latest file
may name an iteration of empty or truncated files, with the older iterations already pruned. So
every file and directory of the iteration must be fsynced before the rename, and the rename before
the latest file is replaced. One process, os.fsync / os.replace spied on.
"""

from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from tests.train.helpers import fs_events
from train import checkpoint as ckpt

CFG = ModelConfig(name="durable", vocab_size=40, hidden_size=32, ffn_hidden_size=48,
                  num_layers=1, num_attention_heads=2, num_kv_heads=2,
                  max_position_embeddings=16, make_vocab_size_divisible_by=8)  # fmt: skip


def _check_order(events, save_dir: Path, final: Path) -> None:
    save_dir, final = save_dir.resolve(), final.resolve()
    tmp = save_dir / f".tmp_{final.name}"
    (commit,) = [
        i for i, e in enumerate(events) if e[0] == "replace" and e[1:] == (str(tmp), str(final))
    ]
    (named,) = [
        i
        for i, e in enumerate(events)
        if e[0] == "replace" and e[2] == str(save_dir / ckpt.LATEST_FILE)
    ]
    synced_before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    on_disk = [final, *final.rglob("*")]
    missing = [str(p.relative_to(final)) for p in on_disk
               if str(tmp / p.relative_to(final)) not in synced_before]  # fmt: skip
    assert not missing, f"not fsynced before the rename into place: {missing}"
    dir_synced = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1] == str(save_dir)]
    assert any(commit < i < named for i in dir_synced), (
        f"{save_dir} (the rename of {tmp.name}) not fsynced before {ckpt.LATEST_FILE} names it"
    )


def test_save_checkpoint_flushes_before_naming(tmp_path, monkeypatch):
    model = {n: torch.randn(s) for n, s in CFG.param_shapes(CFG.padded_vocab_size(1)).items()}
    optim = {k: {n: torch.randn_like(t) for n, t in model.items()} for k in ckpt.OPTIM_KINDS}
    meta = {"model": CFG.to_dict(), "has_trainer_state": True, "has_optimizer": True,
            "consumed_train_samples": 4, "optimizer": {"step": 2, "skipped": 0}}  # fmt: skip
    events = fs_events(monkeypatch)
    final = ckpt.save_checkpoint(tmp_path / "save", 2, params=model, optim_state=optim,
                                 meta=meta, rank_state={"loader": {"step": 2}},
                                 ranks=(0, 0, 0, 0))  # fmt: skip
    _check_order(events, tmp_path / "save", final)
    monkeypatch.undo()
    assert ckpt.ShardIndex(final).read("norm.weight").shape == model["norm.weight"].shape


@pytest.mark.parametrize("resave", [False, True])
def test_write_full_checkpoint_flushes_before_naming(tmp_path, monkeypatch, resave):
    sd = {n: torch.randn(s) for n, s in CFG.param_shapes(CFG.padded_vocab_size(1)).items()}
    if resave:
        ckpt.write_full_checkpoint(tmp_path / "save", 5, sd, {"model": CFG.to_dict()})
    events = fs_events(monkeypatch)
    final = ckpt.write_full_checkpoint(tmp_path / "save", 5, sd, {"model": CFG.to_dict()})
    _check_order(events, tmp_path / "save", final)
