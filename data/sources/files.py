"""Dataset files as users download them: `.jsonl`, `.jsonl.gz`, `.json` (array or JSON Lines),
`.json.gz`, `.parquet`, and tar archives of JSON Lines files (`.tar.gz`, as Open-Assistant's
export is named in the seed's config; a gzipped JSON Lines file under that name is read as
such). A location is a file or a directory (its supported files, recursively, in sorted order).

`iter_records(path)` streams `(location, raw)` pairs: `raw` is the undecoded line (bytes) for JSON
Lines, so the JSON parsing happens in the tokenizer workers, or a dict for JSON arrays and Parquet.
Locations are `file:line` (JSON Lines and JSON arrays) or `file:row N` (Parquet).
"""

import gzip
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path

from data.errors import BadRecord, DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".tar.gz", ".tgz", ".tar")
_TAR_MEMBERS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_PARQUET_BATCH = 1024
_JSON_CHUNK = 1 << 20


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def list_files(location: str | Path, what: str, patterns: list[str] | None = None) -> list[Path]:
    """The data files of a dataset location; `what` names the dataset in errors. `patterns`
    (glob patterns of paths relative to a directory location, like Hugging Face's `data_files`)
    keep only the files they match."""
    location = Path(location)
    if location.is_file():
        if patterns is not None:
            raise DataError(
                f"{what}: data_files picks files of a directory, but {location} is a file; "
                "remove data_files or point path at the directory"
            )
        if not _supported(location):
            raise DataError(
                f"{what}: {location} is not a supported file (expected {', '.join(SUFFIXES)})"
            )
        return [location]
    if location.is_dir():
        files = sorted(
            p
            for p in location.rglob("*")
            if p.is_file()
            and _supported(p)
            and not any(part.startswith(".") for part in p.relative_to(location).parts)
        )
        if not files:
            raise DataError(f"{what}: directory {location} holds no {', '.join(SUFFIXES)} files")
        if patterns is not None:
            rel = [p.relative_to(location).as_posix() for p in files]
            picked = [p for p, r in zip(files, rel) if any(fnmatch(r, pat) for pat in patterns)]
            if not picked:
                raise DataError(
                    f"{what}: data_files {patterns} match none of the files of {location} "
                    f"({', '.join(rel[:10])}{', ...' if len(rel) > 10 else ''})"
                )
            return picked
        return files
    raise DataError(
        f"{what}: {location} does not exist. Download the dataset there, pass --data-root, or set "
        "`path:` for this dataset in the YAML"
    )


def decode_line(raw: bytes, location: str) -> dict:
    """One JSON Lines record -> dict, or BadRecord naming file:line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(location, f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(location, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadRecord(location, _TOO_DEEP) from None
    if not isinstance(obj, dict):
        raise BadRecord(location, f"expected a JSON object, found {type(obj).__name__}")
    if _SURROGATE_ESCAPE in raw or _SURROGATE_ESCAPE_UPPER in raw:
        _check_surrogates(obj, location)
    return obj


_TOO_DEEP = "JSON nested too deeply to read (thousands of levels of [ or {); fix the record"


# A lone surrogate can only come from a `\u` escape (the bytes are valid UTF-8), so only lines
# holding one are walked.
_SURROGATE_ESCAPE, _SURROGATE_ESCAPE_UPPER = b"\\ud", b"\\uD"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_surrogates(obj, location: str) -> None:
    """BadRecord for a string holding half of a UTF-16 pair (`"\\ud800"` alone is valid JSON but
    no Unicode text: SentencePiece, like any UTF-8 encoder, refuses it)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            m = _SURROGATE.search(x)
            if m:
                raise BadRecord(
                    location,
                    f"invalid Unicode: a lone surrogate \\u{ord(m.group()):04x} (half of a "
                    "UTF-16 pair) in a string; fix the text",
                )
        elif isinstance(x, dict):
            stack += x.values()
        elif isinstance(x, list):
            stack += x


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - returned to a with-statement


def _iter_jsonl(path: Path, f, first_line: int = 1) -> Iterator[tuple[str, bytes]]:
    for lineno, line in enumerate(f, start=first_line):
        if line.startswith(b"\xef\xbb\xbf"):
            # A byte-order mark (Windows editors), which json.loads refuses: at the top, or at
            # any line of files joined with `cat`.
            line = line[3:]
        if line.strip():
            yield f"{path}:{lineno}", line


def _iter_json_array(path: Path, f) -> Iterator[tuple[str, object]]:
    """Stream the elements of a top-level JSON array without loading the file: raw_decode one
    element at a time from a sliding text buffer, counting newlines for the line numbers."""
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    line = 1
    eof = False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = f.read(_JSON_CHUNK)
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> str | None:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return None

    if skip_ws() != "[":
        raise DataError(f"{path}:{line}: expected a JSON array")
    pos += 1
    first = True
    while True:
        c = skip_ws()
        if c is None:
            raise DataError(f"{path}:{line}: the JSON array is not closed (file truncated?)")
        if c == "]":
            return
        if not first:
            if c != ",":
                raise DataError(
                    f"{path}:{line}: malformed JSON array (expected ',' or ']', found {c!r})"
                )
            pos += 1
            c = skip_ws()
            if c is None:
                raise DataError(f"{path}:{line}: the JSON array is not closed (file truncated?)")
        first = False
        start_line = line
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except RecursionError:
                raise DataError(
                    f"{path}:{start_line}: {_TOO_DEEP}; a JSON array cannot be resumed after it, "
                    "so --skip-bad-records does not apply"
                ) from None
            except json.JSONDecodeError as e:
                if not more():
                    raise DataError(
                        f"{path}:{start_line + buf.count(chr(10), pos, e.pos)}: malformed JSON "
                        f"({e.msg}); a JSON array cannot be resumed after a syntax error, so "
                        "--skip-bad-records does not apply: fix or remove the element"
                    ) from None
        if buf.find("\\ud", pos, end) >= 0 or buf.find("\\uD", pos, end) >= 0:
            # Possibly a lone surrogate: hand the element over as a line, checked when decoded.
            obj = buf[pos:end].encode("utf-8")
        line += buf.count("\n", pos, end)
        pos = end
        yield f"{path}:{start_line}", obj  # not a dict: the record's reader reports it


def _open_parquet(path: Path, columns: list[str] | None):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet files needs pyarrow, which is not installed; run "
            "`make install` (or `pip install pyarrow`), or convert the file to JSONL"
        ) from None

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the file has {names}")
    return pf, None if columns is None else list(columns)


def _iter_parquet(path: Path, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    for block in _parquet_blocks(path, columns, _PARQUET_BATCH):
        yield from block


def _parquet_blocks(path: Path, columns: list[str] | None, rows: int) -> Iterator["ArrowRows"]:
    pf, read = _open_parquet(path, columns)
    first = 0
    for batch in pf.iter_batches(batch_size=rows, columns=read):
        yield ArrowRows(str(path), first, batch)
        first += batch.num_rows


class ArrowRows:
    """The rows of one Arrow record batch as `(location, dict)` records, decoded only when
    iterated. It pickles as Arrow buffers, much cheaper than the dicts, so the pretokenizer's
    main process sends Parquet rows to its workers undecoded."""

    def __init__(self, path: str, first_row: int, batch):
        self.path = path
        self.first_row = first_row
        self.batch = batch

    def __len__(self) -> int:
        return self.batch.num_rows

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for i, obj in enumerate(self.batch.to_pylist(), start=self.first_row + 1):
            yield f"{self.path}:row {i}", obj


def iter_blocks(
    path: Path, columns: list[str] | None, max_records: int, max_bytes: int
) -> Iterator[list | ArrowRows]:
    """The records of one file in blocks of at most `max_records` records (and, for lines, about
    `max_bytes` bytes): the pretokenizer's unit of work."""
    if path.name.endswith(".parquet"):
        yield from _parquet_blocks(path, columns, max_records)
        return
    block: list = []
    nbytes = 0
    for location, raw in iter_records(path, columns):
        block.append((location, raw))
        nbytes += len(raw) if isinstance(raw, bytes) else 256
        if len(block) >= max_records or nbytes >= max_bytes:
            yield block
            block, nbytes = [], 0
    if block:
        yield block


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    """JSON Lines members of a tar archive, in archive order; a file that is not a tar archive
    but gzipped JSON Lines (the export under a .tar.gz name) is read as JSON Lines."""
    try:
        archive = tarfile.open(path, "r|*")
    except tarfile.ReadError:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as raw:
            yield from _iter_jsonl(path, raw)
        return
    with archive:
        found = False
        for member in archive:
            if not member.isfile() or not member.name.endswith(_TAR_MEMBERS):
                continue
            found = True
            f = archive.extractfile(member)
            if member.name.endswith(".gz"):
                f = gzip.GzipFile(fileobj=f)
            inner = Path(f"{path}!{member.name}")
            yield from _iter_jsonl(inner, f)
        if not found:
            raise DataError(f"{path}: the archive holds no {', '.join(_TAR_MEMBERS)} member")


def iter_records(
    path: Path, columns: list[str] | None = None
) -> Iterator[tuple[str, bytes | dict]]:
    """Records of one file. `columns`: the fields the reader needs (Parquet reads only those
    and fails early, naming the file, when one is missing)."""
    name = path.name
    try:
        if name.endswith(".parquet"):
            yield from _iter_parquet(path, columns)
            return
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            yield from _iter_tar(path)
            return
        with _open_binary(path) as raw:
            if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
                yield from _iter_jsonl(path, raw)
                return
            # .json: an array, or JSON Lines under a .json name (common on the hub).
            head = raw.peek(1 << 12)[: 1 << 12] if hasattr(raw, "peek") else b""
            stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
            if stripped.startswith(b"["):
                text = io.TextIOWrapper(raw, encoding="utf-8-sig")
                yield from _iter_json_array(path, text)
            else:
                yield from _iter_jsonl(path, raw)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 in the JSON array ({e.reason} at byte {e.start})"
        ) from None
