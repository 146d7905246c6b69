import json
import re
from pathlib import Path

from data.chat import Role
from data.samples.generate import generate, write_samples
from data.sources import KINDS, iter_records, list_files, parse_langs

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def _data_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] in KINDS]


def _read_all(root: Path) -> dict[str, list]:
    out = {}
    for kind in KINDS:
        opts = {k: parse_langs(v) if k == "lang" else v for k, v in KINDS[kind].options.items()}
        convs = []
        for f in list_files(root / kind, kind):
            for loc, raw in iter_records(f):
                got = KINDS[kind].convert(raw, loc, f, opts)
                convs += [] if isinstance(got, str) else got
        out[kind] = convs
    return out


def test_bundle_matches_the_generator(tmp_path):
    write_samples(tmp_path, generate())
    committed = sorted(p.relative_to(SAMPLES) for p in _data_files(SAMPLES))
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == fresh
    for rel in fresh:
        if rel.suffix != ".parquet":  # parquet bytes carry the writer's version; compare rows below
            assert (SAMPLES / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert _read_all(SAMPLES) == _read_all(tmp_path)


def test_bundle_is_small_and_has_every_format():
    files = _data_files(SAMPLES)
    assert sum(p.stat().st_size for p in files) < 1_000_000
    names = [p.name for p in files]
    for suffix in (".jsonl", ".jsonl.gz", ".json", ".parquet", ".trees.jsonl.gz"):
        assert any(n.endswith(suffix) for n in names), suffix
    assert {p.parent.name for p in files} == set(KINDS)


def test_a_few_hundred_conversations_with_correct_answers():
    convs = _read_all(SAMPLES)
    total = sum(len(v) for v in convs.values())
    assert 400 <= total <= 1000
    arithmetic = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
    checked = 0
    for kind, items in convs.items():
        for conv in items:
            assert any(r == Role.ASSISTANT for r, _ in conv.turns), kind
            for role, text in conv.turns:
                if role != Role.ASSISTANT:
                    continue
                for a, op, b, v in arithmetic.findall(text):
                    a, b, v = int(a), int(b), int(v)
                    assert {"+": a + b, "-": a - b, "*": a * b}[op] == v, text
                    checked += 1
                m = re.fullmatch(r'The word "(\w+)" reversed is "(\w+)"\.', text)
                if m:
                    assert m.group(1)[::-1] == m.group(2)
                m = re.fullmatch(r"The sorted list is (\[.*\])\.", text)
                if m:
                    xs = json.loads(m.group(1))
                    assert xs == sorted(xs)
    assert checked > 200
