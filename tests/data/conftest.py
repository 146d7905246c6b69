import gzip
import json
import struct
from pathlib import Path

import pytest

from data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer(DEFAULT_TOKENIZER_PATH)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _piece_message(piece: str, score: float) -> bytes:
    """ModelProto.pieces entry (field 1): SentencePiece{piece: 1, score: 2}, type NORMAL."""
    raw = piece.encode()
    payload = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
    return b"\x0a" + _varint(len(payload)) + payload


@pytest.fixture(scope="session")
def llama_like_model(tmp_path_factory) -> str:
    """A SentencePiece model with exactly 32000 pieces, like Llama-2's: the sample model's
    pieces (unk 0, bos 1, eos 2, no pad) plus unreachable filler pieces appended to the
    serialized proto (repeated fields may be appended to a protobuf message)."""
    base = Path(DEFAULT_TOKENIZER_PATH).read_bytes()
    n = Tokenizer(DEFAULT_TOKENIZER_PATH).base_vocab_size
    filler = b"".join(_piece_message(f"\u2581zz{i:05d}", -1e4 - i) for i in range(32000 - n))
    path = tmp_path_factory.mktemp("llama_like") / "tokenizer.model"
    path.write_bytes(base + filler)
    return str(path)


class Files:
    """Writes fixture files under one directory."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def jsonl(self, rel: str, rows: list, gz: bool = False) -> Path:
        data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
        return self.raw(rel, gzip.compress(data) if gz else data)

    def raw(self, rel: str, data: bytes) -> Path:
        p = self.path(rel)
        p.write_bytes(data)
        return p

    def text(self, rel: str, text: str) -> Path:
        p = self.path(rel)
        p.write_text(text, encoding="utf-8")
        return p

    def parquet(self, rel: str, rows: list[dict]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = self.path(rel)
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in rows[0]}), p)
        return p

    def mix(self, name: str = "mix", datasets: list | None = None, **extra) -> Path:
        """A one-mix YAML config writing to <root>/out/<name>."""
        body = {
            "datasets": datasets or [],
            "output_dir": str(self.root / "out" / name),
            "filename_prefix": name,
            **extra,
        }
        return self.text(f"{name}.yaml", json.dumps({name: body}, indent=2))  # JSON is YAML


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path)


def chat_row(q: str, a: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
    ]
    return {"messages": messages}


@pytest.fixture
def make_chat_rows():
    def make(n: int, start: int = 0) -> list[dict]:
        return [
            chat_row(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.")
            for i in range(start, start + n)
        ]

    return make


@pytest.fixture
def pretok(capsys):
    """Run `python -m data.pretokenize` in-process: returns (exit code, stdout, stderr)."""
    from data import pretokenize

    def run(*args: str) -> tuple[int, str, str]:
        rc = pretokenize.main([str(a) for a in args] + ["--no-progress"])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run
