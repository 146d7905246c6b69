"""The pretokenizer's worker pool (data/workers.py), pinned where a hand mutation pass found the
end-to-end tests blind: how far ahead it reads, how fast an error stops a busy worker, how many
processes --workers starts, and which record or chunk an error message names."""

import json
import multiprocessing as mp
import time

import pytest

from data import workers
from data.errors import DataError
from data.sources import KINDS
from data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer
from data.workers import OK, Chunk, WorkerDied, Workers, process

CHAT = KINDS["chat"].options


def _row(i: int) -> bytes:
    messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return json.dumps({"messages": messages}).encode()


def _chunk(start: int, records: list, tokenize: bool = False) -> Chunk:
    return Chunk("chat", CHAT, "x.jsonl", start, records, None, tokenize)


def _ok_chunk(start: int) -> Chunk:
    return _chunk(start, [(f"x.jsonl:{start + 1}", _row(start))])


class _ExitOnUnpickle:
    """Unpickled in a worker, it ends that worker on the spot (as the OOM killer would)."""

    def __reduce__(self):
        import os

        return (os._exit, (9,))


class _BusyOnUnpickle:
    """Unpickled in a worker, it touches `marker`, then keeps the worker busy for a minute."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        code = f"import pathlib, time; pathlib.Path({self.marker!r}).touch(); time.sleep(60)"
        return (exec, (code,))


def test_results_keep_the_input_order_and_read_a_bounded_window_ahead(tok):
    """At most 2 * workers + 2 chunks are read ahead of the result handed out: a window that
    grew with the input (Pool.imap's feeder drains the whole iterator) would hold every
    dataset's raw records in memory at once."""
    read = []

    def chunks():
        for start in range(20):
            read.append(start)
            yield _ok_chunk(start)

    with Workers(2, DEFAULT_TOKENIZER_PATH, tok.extra_ids) as pool:
        starts = []
        for result in pool.map(chunks()):
            assert len(read) - len(starts) <= 2 * 2 + 2, (len(read), len(starts))
            starts.append(result.start)
            assert result.status == [OK]
    assert starts == list(range(20))


def test_an_error_while_a_worker_is_busy_stops_it_at_once(tok, tmp_path):
    """An error or Ctrl-C in the main process (here: reading the next chunk fails) leaves the
    `with` block with the worker pool stopped at once: waiting for the chunks in flight could
    take minutes on a real dataset, and no worker may outlive the run."""
    marker = tmp_path / "busy"

    def chunks():
        yield _chunk(0, [("x.jsonl:1", _BusyOnUnpickle(marker))])
        t0 = time.monotonic()
        while not marker.exists():  # the worker is inside the chunk now
            assert time.monotonic() - t0 < 60, "the busy chunk never started"
            time.sleep(0.02)
        raise RuntimeError("reading the next chunk failed")

    with pytest.raises(RuntimeError, match="next chunk"):
        with Workers(2, DEFAULT_TOKENIZER_PATH, tok.extra_ids) as pool:
            try:
                list(pool.map(chunks()))
            finally:
                t0 = time.monotonic()
    assert time.monotonic() - t0 < 15, "leaving the block waited for the busy worker"
    assert mp.active_children() == []


def test_workers_n_starts_n_processes(tok):
    """--workers 3 tokenizes in three processes (two would be a third slower, unasked)."""
    with Workers(3, DEFAULT_TOKENIZER_PATH, tok.extra_ids) as pool:
        results = list(pool.map(_ok_chunk(s) for s in range(12)))
        assert len(mp.active_children()) == 3
    assert [r.start for r in results] == list(range(12))
    assert mp.active_children() == []


def test_a_worker_that_dies_is_reported_with_the_chunks_start(tok):
    """The message says where in the dataset the lost chunk began: the only pointer a user has
    to the record that took the worker down."""
    with Workers(2, DEFAULT_TOKENIZER_PATH, tok.extra_ids) as pool:
        with pytest.raises(WorkerDied, match=r"x\.jsonl \(the chunk from record 200 of its"):
            list(pool.map(iter([_chunk(200, [("x.jsonl:201", _ExitOnUnpickle())])])))
    assert mp.active_children() == []


class _Explodes(dict):
    """A row whose every lookup fails with an error no check expects."""

    def __contains__(self, key):
        raise ZeroDivisionError("boom")


def test_an_unexpected_error_names_its_record_not_the_chunks_first():
    records = [("x.jsonl:11", _row(0)), ("x.jsonl:12", _row(1)), ("x.jsonl:13", _Explodes())]
    with pytest.raises(DataError, match=r"^x\.jsonl:13: unexpected ZeroDivisionError"):
        process(_chunk(10, records))


def test_a_tokenizer_failure_names_the_first_record_it_fails_on(tok, monkeypatch):
    """The chunk is tokenized in one call; on failure each conversation is tried alone, and the
    first that fails is named (not a later one that fails too)."""
    orig = Tokenizer.encode_turns

    def encode_turns(self, contents, dtype=None):
        if any(c.endswith("boom") for c in contents):
            raise RuntimeError("SentencePiece: internal error")
        return orig(self, contents, dtype)

    monkeypatch.setattr(Tokenizer, "encode_turns", encode_turns)
    monkeypatch.setattr(workers, "_TOKENIZER", tok)
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "boom"}]
    boom = json.dumps({"messages": turns}).encode()
    records = [("x.jsonl:1", _row(0)), ("x.jsonl:2", boom), ("x.jsonl:3", _row(2)),
               ("x.jsonl:4", boom)]  # fmt: skip
    with pytest.raises(DataError, match=r"^x\.jsonl:2: the tokenizer failed"):
        process(_chunk(0, records, tokenize=True))
