"""Checkpoint layout: full round trip, sharded reads, vocabulary re-padding, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open

from model.config import PRESETS
from model.llama import Llama
from train import checkpoint as ckpt


def _tiny_state(vocab_rows=None):
    cfg = PRESETS["tiny"].replace(num_layers=2)
    torch.manual_seed(0)
    sd = {n: torch.randn(s) for n, s in cfg.param_shapes().items()}
    if vocab_rows is not None:
        for n in ckpt.VOCAB_PARAMS:
            sd[n] = sd[n][:vocab_rows].clone()
    return cfg, sd


def test_write_full_then_read_full_round_trip(tmp_path):
    cfg, sd = _tiny_state(vocab_rows=PRESETS["tiny"].vocab_size)  # unpadded vocab rows
    meta = {"model": cfg.to_dict(), "tokenizer": {"fingerprint": "abc"}, "note": "x"}
    d = ckpt.write_full_checkpoint(tmp_path, 7, sd, meta)
    assert d == tmp_path / "iter_0000007"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    assert not list(tmp_path.glob(".tmp_*"))
    # padded rows on disk copy row 0
    with safe_open(str(d / "mp_rank_00_000" / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("embed.weight")
    assert emb.shape[0] == cfg.padded_vocab_size(1)
    assert torch.equal(
        emb[cfg.vocab_size :], sd["embed.weight"][:1].expand(emb.shape[0] - cfg.vocab_size, -1)
    )
    for path in (tmp_path, d):
        got, gmeta = ckpt.read_full_state_dict(path)
        assert set(got) == set(sd)
        for n in sd:
            assert torch.equal(got[n], sd[n]), n
        assert gmeta["tokenizer"]["fingerprint"] == "abc" and gmeta["note"] == "x"
        assert gmeta["iteration"] == 7 and gmeta["has_optimizer"] is False
    # the written checkpoint loads into the model
    model = Llama(cfg)
    index = ckpt.ShardIndex(d)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ckpt.read_param(index, n, gmeta, model.padded_vocab))
    assert torch.equal(model.layers["1"].mlp.w2.weight, sd["layers.1.mlp.w2.weight"])


def test_write_full_refuses_bad_state(tmp_path):
    cfg, sd = _tiny_state()
    meta = {"model": cfg.to_dict()}
    bad = dict(sd)
    bad.pop("norm.weight")
    with pytest.raises(ckpt.CheckpointError, match="missing.*norm.weight"):
        ckpt.write_full_checkpoint(tmp_path, 1, bad, meta)
    bad = dict(sd, **{"layers.0.mlp.w2.weight": torch.zeros(3, 3)})
    with pytest.raises(ckpt.CheckpointError, match="layers.0.mlp.w2.weight"):
        ckpt.write_full_checkpoint(tmp_path, 1, bad, meta)
    with pytest.raises(ckpt.CheckpointError, match="'model'"):
        ckpt.write_full_checkpoint(tmp_path, 1, sd, {})
    assert not (tmp_path / "latest_checkpointed_iteration.txt").exists()


def _write_sharded(iter_dir, name, full, dim, tp):
    """Shard `full` over `tp` ranks the way fused QKV is sharded: each rank holds two pieces."""
    n = full.shape[dim]
    seg = n // 2  # two segments (like [q | kv]) each split over tp
    for r in range(tp):
        pieces = [(s * seg + r * seg // tp, seg // tp) for s in range(2)]
        local = torch.cat([full.narrow(dim, a, b) for a, b in pieces], dim=dim)
        layout = {"name": name, "global_shape": list(full.shape), "tp_dim": dim, "pieces": pieces}
        d = iter_dir / ckpt.shard_dir_name(r, 0)
        d.mkdir(parents=True, exist_ok=True)
        ckpt._save_safetensors(d / "model.safetensors", {name: local}, {name: layout})


@pytest.mark.parametrize("dim", [0, 1])
def test_sharded_read_any_slice(tmp_path, dim):
    full = torch.arange(8 * 12, dtype=torch.float32).view(8, 12)
    _write_sharded(tmp_path, "w", full, dim, tp=2)
    index = ckpt.ShardIndex(tmp_path)
    assert torch.equal(index.read("w"), full)
    # re-slice for another layout (TP=4 of the same fused rule, rank 1), and along the other dim
    n = full.shape[dim]
    pieces = [(1 * n // 8, n // 8), (n // 2 + n // 8, n // 8)]
    want = torch.cat([full.narrow(dim, a, b) for a, b in pieces], dim=dim)
    assert torch.equal(index.read("w", dim=dim, pieces=pieces), want)
    other = 1 - dim
    assert torch.equal(index.read("w", dim=other, pieces=[(2, 3)]), full.narrow(other, 2, 3))


def test_incomplete_shard_set_is_refused(tmp_path):
    full = torch.randn(8, 4)
    _write_sharded(tmp_path, "w", full, 0, tp=2)
    import shutil

    shutil.rmtree(tmp_path / ckpt.shard_dir_name(1, 0))
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.ShardIndex(tmp_path).read("w")


def test_vocab_repadding(tmp_path):
    cfg, sd = _tiny_state()
    d = ckpt.write_full_checkpoint(tmp_path, 1, sd, {"model": cfg.to_dict()})
    _, meta = ckpt.read_full_state_dict(d)
    index = ckpt.ShardIndex(d)
    bigger = cfg.padded_vocab_size(4)  # as a TP=4 model would pad
    t = ckpt.read_param(index, "output.weight", meta, bigger)
    assert t.shape[0] == bigger
    assert torch.equal(t[: cfg.vocab_size], sd["output.weight"][: cfg.vocab_size])
    assert torch.equal(t[-1], sd["output.weight"][0])
    part = ckpt.read_param(
        index, "output.weight", meta, bigger, dim=0, pieces=[(bigger // 4, bigger // 4)]
    )
    assert torch.equal(part, t[bigger // 4 : bigger // 2])


def _full_copy(iter_dir, tp_rank, file, tensors):
    d = iter_dir / ckpt.shard_dir_name(tp_rank, 0)
    d.mkdir(parents=True, exist_ok=True)
    layouts = {
        k: {"name": k.split("/")[-1], "global_shape": list(t.shape), "tp_dim": None, "pieces": None}
        for k, t in tensors.items()
    }
    ckpt._save_safetensors(d / file, tensors, layouts)


def test_replicated_copies_read_once_and_overlapping_shards_are_refused(tmp_path):
    # A tensor replicated over TP (a norm) has a full copy in every shard directory: one is read.
    n = torch.arange(6, dtype=torch.float32)
    for r in range(2):
        _full_copy(tmp_path / "a", r, "model.safetensors", {"n": n})
    got = ckpt.ShardIndex(tmp_path / "a").read("n", dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, n.to(torch.bfloat16))
    # Two shards that both claim rows 2..3 (a stale shard directory): neither is picked silently.
    full = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    for r, pieces in enumerate([[(0, 4)], [(2, 6)]]):
        d = tmp_path / "b" / ckpt.shard_dir_name(r, 0)
        d.mkdir(parents=True)
        local = torch.cat([full.narrow(0, a, b) for a, b in pieces])
        layout = {"name": "w", "global_shape": [8, 3], "tp_dim": 0, "pieces": pieces}
        ckpt._save_safetensors(d / "model.safetensors", {"w": local}, {"w": layout})
    with pytest.raises(ckpt.CheckpointError, match="cover 30 of the 24"):
        ckpt.ShardIndex(tmp_path / "b").read("w")


def test_vocab_repadding_trims_a_bigger_padding_and_pads_moments_with_zeros(tmp_path):
    vocab, stored, padded = 5, 8, 6  # saved at a bigger padding (higher TP), loaded at a smaller
    torch.manual_seed(0)
    w = torch.randn(stored, 3)
    _full_copy(tmp_path, 0, "model.safetensors", {"output.weight": w})
    moments = {f"{k}/output.weight": torch.rand(stored, 3) + 1 for k in ckpt.OPTIM_KINDS}
    _full_copy(tmp_path, 0, ckpt.optim_file_name(0), moments)
    index = ckpt.ShardIndex(tmp_path)
    assert index.names() == index.names("exp_avg_sq") == ["output.weight"]
    meta = {"vocab_size": vocab}
    t = ckpt.read_param(index, "output.weight", meta, padded)
    assert torch.equal(t, torch.cat([w[:vocab], w[:1]]))
    for kind in ckpt.OPTIM_KINDS:
        m = moments[f"{kind}/output.weight"]
        t = ckpt.read_param(index, "output.weight", meta, padded, kind=kind)
        pad = m[:1] if kind == "master" else torch.zeros(1, 3)  # Adam moments: no gradient
        assert torch.equal(t, torch.cat([m[:vocab], pad])), kind


def test_layout_metadata_is_written_and_required(tmp_path):
    from safetensors.torch import save_file

    t = torch.zeros(2, 3)
    t.tp_dim, t.tp_pieces, t.global_shape = 0, [(4, 2)], (8, 3)
    assert ckpt.tensor_layout("w", t) == {
        "name": "w", "global_shape": [8, 3], "tp_dim": 0, "pieces": [[4, 2]]
    }  # fmt: skip
    del t.tp_pieces
    with pytest.raises(ckpt.CheckpointError, match="tp_dim=0 but no tp_pieces"):
        ckpt.tensor_layout("w", t)
    with pytest.raises(ckpt.CheckpointError, match="no mp_rank_"):
        ckpt.ShardIndex(tmp_path)
    d = tmp_path / ckpt.shard_dir_name(0, 0)
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))  # another tool's file
    with pytest.raises(ckpt.CheckpointError, match="tensor w has no layout metadata"):
        ckpt.ShardIndex(tmp_path)


def test_damage_message_names_the_newest_complete_iteration_below(tmp_path):
    for i in (1, 2, 5, 9):
        (tmp_path / f"iter_{i:07d}").mkdir()
        if i != 5:
            (tmp_path / f"iter_{i:07d}" / "meta.json").write_text("{}")
    msg = ckpt.another_iteration(tmp_path / "iter_0000005")
    assert msg.endswith(str(tmp_path / "iter_0000002"))
    assert ckpt.another_iteration(tmp_path / "iter_0000001").endswith("iter_0000009")


def test_resave_same_iteration_and_latest_written_last(tmp_path):
    cfg, sd = _tiny_state()
    ckpt.write_full_checkpoint(tmp_path, 3, sd, {"model": cfg.to_dict(), "v": 1})
    ckpt.write_full_checkpoint(tmp_path, 3, sd, {"model": cfg.to_dict(), "v": 2})
    assert json.loads((tmp_path / "iter_0000003" / "meta.json").read_text())["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003",
        "latest_checkpointed_iteration.txt",
    ]
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_iteration_dir(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.resolve_iteration_dir(tmp_path / "iter_0000003" / "mp_rank_00_000")


def test_a_transformers_directory_is_named_with_the_import_command(tmp_path):
    """--load of a Hugging Face model directory says what it is and how to convert it."""
    hf = tmp_path / "Llama-2-7b-hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.resolve_iteration_dir(hf)  # a config alone is not a model directory
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"Hugging Face model directory .* "
                       r"`python -m model\.hf import .*Llama-2-7b-hf OUT_DIR`"):  # fmt: skip
        ckpt.resolve_iteration_dir(hf)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    """safetensors writes 0600 files whatever the umask: weights a serving job on a shared
    cluster could not read, beside a meta.json it could. Every file gets the umask's mode."""
    import os
    import stat

    cfg, sd = _tiny_state()
    old = os.umask(umask)
    try:
        d = ckpt.write_full_checkpoint(tmp_path, 1, sd, {"model": cfg.to_dict()})
    finally:
        os.umask(old)
    files = [p for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
