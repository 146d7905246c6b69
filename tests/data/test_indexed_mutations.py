"""MMIDIDX reader and writer behaviour pinned after a mutation-testing pass: each test kills a
mutant of data/indexed.py that test_indexed.py let through (a check loosened or dropped, a sum
in a narrower type)."""

import struct

import numpy as np
import pytest

from data.errors import DataError
from data.indexed import HEADER_BYTES, MAGIC, IndexedDataset, IndexedWriter, write_indexed


def _two_sequences(tmp_path, edit=None):
    """c.bin/.idx with sequences of 5 and 3 uint16 elements (n = 2, doc_idx = [0, 1, 2] at
    byte 34 + 12n = 58), `edit(raw)` applied to the index bytes."""
    write_indexed(tmp_path / "c", [np.arange(5), np.arange(3)], np.uint16)
    if edit is not None:
        raw = bytearray((tmp_path / "c.idx").read_bytes())
        edit(raw)
        (tmp_path / "c.idx").write_bytes(bytes(raw))
    return tmp_path / "c"


def _set(offset: int, data: bytes):
    return lambda raw: raw.__setitem__(slice(offset, offset + len(data)), data)


def test_writer_refuses_negative_values_in_signed_dtypes(tmp_path):
    """Token and role ids are never negative: a signed file (int32 for large vocabularies)
    refuses them at write time as the unsigned ones do, rather than storing an id the embedding
    cannot index."""
    w = IndexedWriter(tmp_path / "s.bin", np.int32)
    w.add([0, 5])
    with pytest.raises(ValueError, match=r"value -1 does not fit \[0, "):
        w.add([3, -1])
    w.close()


def test_add_many_refuses_sizes_that_do_not_cover_the_elements(tmp_path):
    """add_many's sizes must sum to the elements given: otherwise .bin and .idx disagree and
    every later sequence is read shifted."""
    w = IndexedWriter(tmp_path / "m.bin", np.uint16)
    with pytest.raises(ValueError, match="sizes sum to 4 but 5 elements"):
        w.add_many(np.arange(5), np.array([2, 2]))
    w.close()


@pytest.mark.parametrize(
    "edit",
    [
        _set(HEADER_BYTES + 24, struct.pack("<q", 1)),  # doc_idx[0] = 1
        _set(HEADER_BYTES + 24 + 8, struct.pack("<qq", 2, 1)),  # [0, 2, 1]: decreasing
        _set(HEADER_BYTES + 24 + 16, struct.pack("<q", 3)),  # last entry n + 1
    ],
    ids=["first-not-zero", "decreasing-by-one", "past-n"],
)
def test_a_bad_doc_idx_is_refused(tmp_path, edit):
    """doc_idx must start at 0, never decrease and end within [0, n]; each rule on its own."""
    IndexedDataset(_two_sequences(tmp_path))  # the unedited file reads
    with pytest.raises(DataError, match=r"c\.idx: doc_idx is not an increasing list"):
        IndexedDataset(_two_sequences(tmp_path, edit))


def test_doc_idx_of_an_empty_dataset_is_checked(tmp_path):
    """An index of no sequences has doc_idx [0]: a single entry is checked as well (here 1,
    past n = 0)."""
    write_indexed(tmp_path / "e", [], np.uint16)
    raw = bytearray((tmp_path / "e.idx").read_bytes())
    raw[HEADER_BYTES : HEADER_BYTES + 8] = struct.pack("<q", 1)
    (tmp_path / "e.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="doc_idx is not an increasing list"):
        IndexedDataset(tmp_path / "e")


def test_the_first_bad_pointer_is_named(tmp_path):
    """With several pointers wrong the message names the first (where the damage starts)."""
    edit = _set(HEADER_BYTES + 8, struct.pack("<qq", 2, 4))  # pointers of sequences 0 and 1
    with pytest.raises(DataError, match="pointer of sequence 0 is 2, expected 0"):
        IndexedDataset(_two_sequences(tmp_path, edit))


def test_writer_refuses_an_unsupported_dtype_when_made(tmp_path):
    """Only the dtypes with an MMIDIDX code can be written; another is refused at once, not as a
    KeyError when the index is finalized."""
    for dtype in (np.uint32, np.float32):
        with pytest.raises(ValueError, match="unsupported dtype"):
            IndexedWriter(tmp_path / "u.bin", dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_one_element_data_file_is_read(tmp_path, dtype):
    """The smallest non-empty .bin (one element, 1 or 2 bytes) is memory-mapped like any other:
    only a 0-byte file is the empty dataset."""
    write_indexed(tmp_path / "one", [[7]], dtype)
    assert IndexedDataset(tmp_path / "one")[0].tolist() == [7]


def test_an_index_of_only_a_header_is_an_empty_dataset(tmp_path):
    """The header alone (34 bytes, N = D = 0) is a complete index of no sequences; one byte
    less is a truncated one."""
    header = MAGIC + struct.pack("<QBQQ", 1, 8, 0, 0)
    assert len(header) == HEADER_BYTES
    (tmp_path / "h.bin").write_bytes(b"")
    (tmp_path / "h.idx").write_bytes(header)
    assert len(IndexedDataset(tmp_path / "h")) == 0
    (tmp_path / "h.idx").write_bytes(header[:-1])
    with pytest.raises(DataError, match="truncated index"):
        IndexedDataset(tmp_path / "h")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(7, b"\x00\x01"), "bad magic"),  # only the trailing bytes differ
        (_set(9, struct.pack("<Q", 0)), "unsupported index version 0"),
    ],
    ids=["magic-tail", "version-0"],
)
def test_magic_and_version_are_compared_exactly(tmp_path, edit, message):
    with pytest.raises(DataError, match=message):
        IndexedDataset(_two_sequences(tmp_path, edit))


def test_a_data_file_longer_than_its_index_is_refused(tmp_path):
    """A .bin with bytes past what the index describes belongs to another index (or was
    appended to): refused like a short one."""
    prefix = _two_sequences(tmp_path)
    with open(tmp_path / "c.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="8 uint16 elements = 16 bytes"):
        IndexedDataset(prefix)


def test_out_of_range_sequence_says_so(tmp_path):
    """ds[len(ds)] is the reader's IndexError naming the file, not numpy's."""
    ds = IndexedDataset(_two_sequences(tmp_path))
    with pytest.raises(IndexError, match=r"sequence 2 out of range for .*c \(2 sequences\)"):
        ds[2]


def test_more_than_two_billion_elements_are_counted_in_int64(tmp_path):
    """A token file of 2^31 elements or more (4 GiB of uint16, a few billion tokens) is counted
    without int32 overflow. The .bin is sparse: nothing of its 4 GiB is written."""
    half = 1 << 30
    sizes = np.array([half, half], np.int32)
    pointers = np.array([0, 2 * half], np.int64)  # bytes: uint16
    idx = MAGIC + struct.pack("<QBQQ", 1, 8, 2, 3) + sizes.tobytes() + pointers.tobytes()
    (tmp_path / "big.idx").write_bytes(idx + np.arange(3, dtype=np.int64).tobytes())
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(4 * half)
    ds = IndexedDataset(tmp_path / "big")
    assert ds.num_elements == 2 * half and ds[1].size == half and int(ds[1][-1]) == 0
