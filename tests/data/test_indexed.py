import struct

import numpy as np
import pytest

from data.errors import DataError
from data.indexed import IndexedDataset, IndexedWriter, best_dtype, write_indexed


def _seqs(rng, n, hi):
    return [rng.integers(0, hi, size=int(rng.integers(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("dtype, code, hi", [(np.uint16, 8, 65500), (np.int32, 4, 2**31 - 1)])
def test_layout_and_round_trip(tmp_path, dtype, code, hi):
    rng = np.random.default_rng(0)
    seqs = _seqs(rng, 37, hi)
    prefix = tmp_path / "ds"
    write_indexed(prefix, seqs, dtype)

    # The header, byte for byte, as the issue and Megatron's reader lay it out.
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9)[0] == 1
    assert raw[17] == code
    n, d = struct.unpack_from("<QQ", raw, 18)
    assert (n, d) == (37, 38)
    sizes = np.frombuffer(raw, np.int32, n, 34)
    pointers = np.frombuffer(raw, np.int64, n, 34 + 4 * n)
    doc_idx = np.frombuffer(raw, np.int64, d, 34 + 12 * n)
    assert sizes.tolist() == [s.size for s in seqs]
    assert (
        pointers.tolist()
        == np.concatenate([[0], np.cumsum(sizes[:-1]) * np.dtype(dtype).itemsize]).tolist()
    )
    assert doc_idx.tolist() == list(range(38))
    assert len(raw) == 34 + 12 * n + 8 * d
    assert (tmp_path / "ds.bin").stat().st_size == sizes.sum() * np.dtype(dtype).itemsize

    ds = IndexedDataset(prefix)
    assert len(ds) == 37 and ds.dtype == np.dtype(dtype) and ds.sizes.dtype == np.int32
    for i, s in enumerate(seqs):
        assert np.array_equal(ds[i], s)
    assert np.array_equal(ds[-1], seqs[-1])
    assert np.array_equal(ds.get(3, 1, 2), seqs[3][1:3])
    with pytest.raises(IndexError):
        ds[37]


def test_best_dtype():
    assert best_dtype(32007) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(128256) is np.int32


def test_add_many_equals_add(tmp_path):
    seqs = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([7])]
    a = IndexedWriter(tmp_path / "a.bin", np.uint16)
    for s in seqs:
        a.add(s)
    a.finalize(tmp_path / "a.idx")
    b = IndexedWriter(tmp_path / "b.bin", np.uint16)
    b.add_many(np.concatenate(seqs), np.array([3, 0, 1]))
    b.finalize(tmp_path / "b.idx")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()


def test_writer_rejects_out_of_range_values(tmp_path):
    w = IndexedWriter(tmp_path / "x.bin", np.uint16, max_value=1031)
    w.add([0, 1030])
    with pytest.raises(ValueError, match="1031"):
        w.add([1031])
    with pytest.raises(ValueError):
        IndexedWriter(tmp_path / "y.bin", np.uint16).add([-1])
    with pytest.raises(ValueError):
        IndexedWriter(tmp_path / "z.bin", np.uint16).add([70000])


def test_empty(tmp_path):
    write_indexed(tmp_path / "e", [], np.uint16)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.sizes.size == 0


def _corrupt(tmp_path, edit):
    write_indexed(tmp_path / "c", [np.arange(5), np.arange(3)], np.uint16)
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    edit(raw, tmp_path)
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    return tmp_path / "c"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw, p: raw.__setitem__(slice(0, 9), b"TNTIDX\x00\x00\x00"), "bad magic"),
        (lambda raw, p: raw.__setitem__(slice(9, 17), struct.pack("<Q", 2)), "version 2"),
        (lambda raw, p: raw.__setitem__(17, 6), "dtype code 6"),
        (lambda raw, p: raw.__setitem__(17, 99), "dtype code 99"),
        (lambda raw, p: raw.__delitem__(slice(-8, None)), "does not match its header"),
        (
            lambda raw, p: raw.__setitem__(slice(18, 26), struct.pack("<Q", 3)),
            "does not match its header",
        ),
        (lambda raw, p: raw.__delitem__(slice(20, None)), "truncated index"),
        (
            lambda raw, p: raw.__setitem__(slice(34 + 8 + 8, 34 + 8 + 16), struct.pack("<q", 4)),
            "pointer of sequence 1",
        ),
        (lambda raw, p: (p / "c.bin").write_bytes(b"\x00" * 10), "8 uint16 elements = 16 bytes"),
    ],
)
def test_bad_index_files_name_the_file(tmp_path, edit, message):
    prefix = _corrupt(tmp_path, edit)
    with pytest.raises(DataError, match=message) as e:
        IndexedDataset(prefix)
    assert "c.idx" in str(e.value) or "c.bin" in str(e.value)


def test_missing_files(tmp_path):
    write_indexed(tmp_path / "m", [np.arange(3)], np.uint16)
    (tmp_path / "m.bin").unlink()
    with pytest.raises(DataError, match=r"m\.bin: file not found"):
        IndexedDataset(tmp_path / "m")


def test_index_written_in_chunks_is_the_same(tmp_path, monkeypatch):
    import data.indexed as indexed

    rng = np.random.default_rng(1)
    seqs = _seqs(rng, 50, 1000)
    write_indexed(tmp_path / "whole", seqs, np.uint16)
    monkeypatch.setattr(indexed, "_FINALIZE_CHUNK", 7)  # pointers and doc_idx over 8 chunks
    write_indexed(tmp_path / "chunked", seqs, np.uint16)
    assert (tmp_path / "chunked.idx").read_bytes() == (tmp_path / "whole.idx").read_bytes()


@pytest.mark.parametrize(
    ("dtype", "too_high", "highest", "values"),
    [(np.uint16, 65537, 65536, [65535, 0]), (np.int32, 2**31 + 1, 70000, [65537, 3])],
)
def test_writer_bound_is_exact_at_the_dtype_edge(tmp_path, dtype, too_high, highest, values):
    """max_value is exclusive, so uint16 takes a bound of at most 65536: 65537 would admit the
    value 65536, written wrapped to 0 (a silently wrong token id); a wider dtype takes larger
    ids. The edge is pinned both ways."""
    with pytest.raises(ValueError, match=rf"max_value {too_high} .* {np.dtype(dtype).name}"):
        IndexedWriter(tmp_path / "w.bin", dtype, max_value=too_high)
    w = IndexedWriter(tmp_path / "ok.bin", dtype, max_value=highest)
    w.add(values)
    w.finalize(tmp_path / "ok.idx")
    assert IndexedDataset(tmp_path / "ok")[0].tolist() == values
