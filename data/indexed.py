"""Megatron's memory-mapped indexed dataset ("MMIDIDX"), writer and reader.

`{prefix}.bin` holds the sequences back to back as raw little-endian integers. `{prefix}.idx`:

    offset  type              field
    0       9 bytes           magic b"MMIDIDX\\x00\\x00"
    9       u64               version (1)
    17      u8                dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
    18      u64               N, number of sequences
    26      u64               D, length of doc_idx
    34      int32[N]          sizes (elements per sequence)
    34+4N   int64[N]          byte offset of each sequence in .bin
    34+12N  int64[D]          doc_idx (sequence index where each document starts, then N)

Written files have one document per sequence (doc_idx = 0..N). Token files use uint16 when the
vocabulary is below 65500, int32 otherwise, as Megatron-LLM's builder does.
"""

import struct
from array import array
from pathlib import Path

import numpy as np

from data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_FLOAT_CODES = {6: "float64", 7: "float64 (double)"}  # valid Megatron codes, never token data
_FINALIZE_CHUNK = 1 << 20


def best_dtype(vocab_size: int) -> type:
    """Megatron-LLM's choice: uint16 below 65500 ids, int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


def index_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def data_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


class IndexedWriter:
    """Appends sequences to `bin_path`; `finalize(idx_path)` writes the index.

    The caller chooses the paths (the pretokenizer passes temporary names and renames them once
    every output is complete). Sizes are kept as a compact int32 array (4 bytes per sequence).
    """

    def __init__(self, bin_path: str | Path, dtype: type, max_value: int | None = None):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(
                f"unsupported dtype {self.dtype}: expected one of {sorted(map(str, _CODE_OF))}"
            )
        if max_value is not None and max_value > int(np.iinfo(self.dtype).max) + 1:
            # Values past the dtype's range would be stored wrapped (65537 as 1 in uint16).
            raise ValueError(
                f"max_value {max_value} does not fit {self.dtype}: use a wider dtype "
                "(best_dtype(vocab_size))"
            )
        self.bin_path = Path(bin_path)
        self.max_value = max_value  # exclusive bound checked on every write (e.g. the vocab size)
        self._file = open(self.bin_path, "wb")  # noqa: SIM115 - closed in finalize/close
        self._sizes = array("i")
        self.num_elements = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, seq) -> None:
        """Append one sequence."""
        arr = np.asarray(seq)
        self.add_many(arr, np.array([arr.size], dtype=np.int64))

    def add_many(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Append sequences given back to back in `flat` with lengths `sizes`."""
        flat = np.asarray(flat)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != flat.size:
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {flat.size} elements were given")
        if sizes.size and (sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max):
            raise ValueError("sequence sizes must be in [0, 2^31)")
        if flat.size:
            lo, hi = int(flat.min()), int(flat.max())
            info = np.iinfo(self.dtype)
            bound = self.max_value if self.max_value is not None else int(info.max) + 1
            if lo < max(0, int(info.min)) or hi >= bound:
                raise ValueError(
                    f"{self.bin_path}: value {hi if hi >= bound else lo} does not fit "
                    f"[0, {bound}) ({self.dtype})"
                )
        self._file.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._sizes.frombytes(sizes.astype(np.int32).tobytes())
        self.num_elements += flat.size

    def finalize(self, idx_path: str | Path) -> None:
        """Close the data file and write the index (pointers and doc_idx in bounded chunks, so
        finalizing adds no per-sequence memory beyond the sizes already held)."""
        self._file.close()
        sizes = (
            np.frombuffer(self._sizes, dtype=np.int32)
            if len(self._sizes)
            else np.zeros(0, np.int32)
        )
        n = sizes.size
        with open(idx_path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(sizes.tobytes())
            offset = 0
            for start in range(0, n, _FINALIZE_CHUNK):
                nbytes = (
                    sizes[start : start + _FINALIZE_CHUNK].astype(np.int64) * self.dtype.itemsize
                )
                ends = np.cumsum(nbytes) + offset
                f.write((ends - nbytes).tobytes())  # byte offset of each sequence
                offset = int(ends[-1])
            for start in range(0, n + 1, _FINALIZE_CHUNK):
                f.write(
                    np.arange(start, min(n + 1, start + _FINALIZE_CHUNK), dtype=np.int64).tobytes()
                )

    def close(self) -> None:
        self._file.close()


class IndexedDataset:
    """Read-only view of `{prefix}.bin` / `{prefix}.idx`, validated on open.

    `ds[i]` is a numpy view (no copy) of sequence i; `.sizes` (int32), `.pointers` (int64 bytes),
    `.doc_idx` (int64), `.dtype`.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.idx_path = index_path(prefix)
        self.bin_path = data_path(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(
                    f"{p}: file not found (expected {self.prefix}.idx and {self.prefix}.bin)"
                )
        self._read_index()
        self._open_data()

    def _read_index(self) -> None:
        raw = (
            np.memmap(self.idx_path, dtype=np.uint8, mode="r")
            if self.idx_path.stat().st_size
            else b""
        )
        buf = memoryview(raw)
        where = str(self.idx_path)
        if len(buf) < HEADER_BYTES:
            raise DataError(
                f"{where}: truncated index ({len(buf)} bytes, the header alone is {HEADER_BYTES})"
            )
        magic = bytes(buf[: len(MAGIC)])
        if magic != MAGIC:
            hint = (
                " (a TNTIDX 'lazy/cached' index, not mmap)" if magic.startswith(b"TNTIDX") else ""
            )
            raise DataError(
                f"{where}: bad magic {magic!r}{hint}; expected {MAGIC!r} (Megatron mmap index)"
            )
        (version,) = struct.unpack_from("<Q", buf, 9)
        if version != VERSION:
            raise DataError(f"{where}: unsupported index version {version}; expected {VERSION}")
        (code,) = struct.unpack_from("<B", buf, 17)
        if code not in DTYPE_CODES:
            kind = (
                f"{_FLOAT_CODES[code]}, not an integer type" if code in _FLOAT_CODES else "unknown"
            )
            raise DataError(
                f"{where}: dtype code {code} ({kind}); token files use 8 (uint16) or 4 (int32)"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack_from("<QQ", buf, 18)
        expected = HEADER_BYTES + 4 * n + 8 * n + 8 * d
        if len(buf) != expected:
            raise DataError(
                f"{where}: index size {len(buf)} bytes does not match its header ({n} sequences, "
                f"{d} doc_idx entries -> {expected} bytes); the file is truncated or corrupt"
            )
        # Copies: the int32/int64 arrays start at byte 34, unaligned for direct use.
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n, offset=HEADER_BYTES).copy()
        self.pointers = np.frombuffer(
            buf, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n
        ).copy()
        self.doc_idx = np.frombuffer(
            buf, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * n
        ).copy()
        del buf, raw
        if n and self.sizes.min() < 0:
            raise DataError(
                f"{where}: negative sequence size at index {int(np.argmin(self.sizes))}"
            )
        item = self.dtype.itemsize
        expected_ptr = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(self.sizes[:-1].astype(np.int64) * item, out=expected_ptr[1:])
        if not np.array_equal(self.pointers, expected_ptr):
            bad = int(np.flatnonzero(self.pointers != expected_ptr)[0])
            raise DataError(
                f"{where}: pointer of sequence {bad} is {int(self.pointers[bad])}, expected "
                f"{int(expected_ptr[bad])} (sequences must be stored back to back)"
            )
        if d and (
            self.doc_idx[0] != 0 or np.any(np.diff(self.doc_idx) < 0) or self.doc_idx[-1] > n
        ):
            raise DataError(
                f"{where}: doc_idx is not an increasing list of sequence indices in [0, {n}]"
            )
        self.num_elements = int(self.sizes.sum(dtype=np.int64))

    def _open_data(self) -> None:
        size = self.bin_path.stat().st_size
        expected = self.num_elements * self.dtype.itemsize
        if size != expected:
            raise DataError(
                f"{self.bin_path}: {size} bytes, but {self.idx_path} describes {self.num_elements} "
                f"{self.dtype} elements = {expected} bytes; the two files do not belong together "
                "or one is truncated"
            )
        if size:
            self._data = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self._data = np.zeros(0, dtype=self.dtype)
        self._offsets = self.pointers // self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        start = int(self._offsets[i])
        return self._data[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Part of sequence i: `length` elements from `offset`."""
        seq = self[i]
        end = seq.size if length is None else min(seq.size, offset + length)
        return seq[offset:end]

    @property
    def data(self) -> np.ndarray:
        """All elements back to back (a memory map)."""
        return self._data


def write_indexed(prefix: str | Path, sequences, dtype: type) -> None:
    """Write a small list of sequences to `{prefix}.bin/.idx` (tests and tools)."""
    writer = IndexedWriter(data_path(prefix), dtype)
    for seq in sequences:
        writer.add(seq)
    writer.finalize(index_path(prefix))
