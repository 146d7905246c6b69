"""model.hf_io pinned by a mutation pass: the shard index's checks, lookups of missing tensors,
one header read per shard, strided tensors written by value, and shards synced to disk."""

import json

import pytest
import torch

from model import hf_io
from model.hf_io import HF_INDEX, HFWeights, SafetensorsStream, write_hf_shards

SHAPES = {"a": (4, 4), "b": (4, 4), "c": (8,)}  # 64, 64 and 32 bytes in fp32


def _sharded(path) -> dict[str, torch.Tensor]:
    """Two shards: a in the first, b and c in the second."""
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    write_hf_shards(path, iter(tensors.items()), SHAPES, torch.float32, 100)
    return tensors


def _edit_index(path, edit) -> None:
    index = json.loads((path / HF_INDEX).read_text())
    edit(index["weight_map"])
    (path / HF_INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("bad", [{"a": 5}, {"a": "model-00001-of-00002.safetensors", "b": None}])
def test_an_index_with_a_non_string_shard_is_refused(tmp_path, bad):
    """Every weight_map value must be a file name: one that is not (even among good ones) used
    to surface as a TypeError from Path / int, with no hint that the index is damaged."""
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update(bad))
    with pytest.raises(ValueError, match="expected a 'weight_map' object"):
        HFWeights(tmp_path)


def test_a_shard_that_is_a_directory_counts_as_missing(tmp_path):
    """The index's shards must be files: a folder of that name (a failed download tool's
    leftover) is reported with the other missing shards when the directory is opened."""
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update(c="model-00003-of-00003.safetensors"))
    (tmp_path / "model-00003-of-00003.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"lists shard\(s\) \['model-00003-of-00003"):
        HFWeights(tmp_path)


def test_a_missing_tensor_is_not_in_the_weights_and_is_named(tmp_path):
    """`in` answers from the index (import uses it for optional tensors such as a tied
    lm_head); get/shape of an absent name is a KeyError saying what is missing, and where."""
    _sharded(tmp_path)
    w = HFWeights(tmp_path)
    assert "a" in w and "lm_head.weight" not in w
    for read in (w.get, w.shape):
        with pytest.raises(KeyError, match=r"tensor 'lm_head.weight' is missing from the check"):
            read("lm_head.weight")


def test_a_tensor_the_index_misplaces_is_a_value_error_on_get(tmp_path):
    """get() checks the shard's header first: a tensor the index places in a shard that lacks
    it is a ValueError naming the shard, not safetensors' own error naming neither."""
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update(c="model-00001-of-00002.safetensors"))
    with pytest.raises(ValueError, match="the index and the shards do not match"):
        HFWeights(tmp_path).get("c")


def test_an_unreadable_single_file_is_named(tmp_path):
    """An OSError from safetensors (here: model.safetensors is a folder) is reported as a
    damaged file, naming it, like a truncated one."""
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        HFWeights(tmp_path)


def test_each_shard_header_is_read_once(tmp_path, monkeypatch):
    """shape()/dtype() of every tensor open each shard once (a 70B import asks for hundreds
    of tensors per shard); get() then opens the tensor's shard once per read."""
    tensors = _sharded(tmp_path)
    w = HFWeights(tmp_path)
    opened = []
    real = hf_io._safe_open

    def counting(path):
        opened.append(path.name)
        return real(path)

    monkeypatch.setattr(hf_io, "_safe_open", counting)
    for name in SHAPES:
        assert w.shape(name) == SHAPES[name] and w.dtype(name) == torch.float32
        assert w.shape(name) == SHAPES[name]
    assert sorted(opened) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    opened.clear()
    assert torch.equal(w.get("b"), tensors["b"])
    assert opened == ["model-00002-of-00002.safetensors"]


def test_strided_tensors_are_written_by_value(tmp_path):
    """A view that is not contiguous (a transpose, a strided slice: what TP merges and
    permutations hand over) is written as its values, not its storage's bytes."""
    base = torch.arange(24, dtype=torch.float32)
    tensors = {"t": base.reshape(4, 6).t(), "s": base[::3], "h": base.reshape(4, 6)[:, 2:4]}
    stream = SafetensorsStream(
        tmp_path / "model.safetensors", {n: t.shape for n, t in tensors.items()}, torch.float32, {}
    )
    for n, t in tensors.items():
        assert not t.is_contiguous()
        stream.write(n, t)
    stream.close()
    w = HFWeights(tmp_path)  # the single-file layout
    for n, t in tensors.items():
        assert torch.equal(w.get(n), t)


def test_every_shard_is_synced_before_it_is_closed(tmp_path, monkeypatch):
    """A shard is fsynced when closed: after a crash an index must not point at a shard whose
    data never reached the disk."""
    synced = []
    monkeypatch.setattr(hf_io.os, "fsync", lambda fd: synced.append(fd))
    _sharded(tmp_path)
    assert len(synced) == 2
