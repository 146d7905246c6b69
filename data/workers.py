"""The pretokenizer's per-chunk work, run in worker processes (or in-process with one worker).

A chunk is a run of raw records of one file. Workers parse and check them (so the main process
only reads bytes), and, on the tokenizing pass, render the kept ones as ChatML and tokenize them
with one SentencePiece call per chunk. Results come back as flat numpy arrays in record order;
nothing here depends on how records were cut into chunks, so outputs do not depend on the number
of workers.
"""

import multiprocessing as mp
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.chat import ROLE_NAMES, Role
from data.errors import BadRecord
from data.indexed import best_dtype
from data.sources import KINDS
from data.tokenizer import Tokenizer

OK = "ok"
BAD = "bad"
UNASSIGNED = ""  # not read on the tokenizing pass: neither train nor val

_TOKENIZER: Tokenizer | None = None
_HEADER = {role: f"{name}\n" for role, name in ROLE_NAMES.items()}  # a turn's content starts so


def init_worker(model_path: str, extra_ids: list[str]) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(model_path, extra_ids)


@dataclass
class Chunk:
    kind: str  # KINDS key
    options: dict  # the dataset's kind options
    path: str  # the file the records come from
    start: int  # index of the first record in the dataset's record stream
    records: list  # [(location, raw)]
    assign: bytes | None  # per record: 0 unused, 1 train, 2 val; None: every record
    tokenize: bool


@dataclass
class ChunkResult:
    start: int
    status: list[str]  # per record: OK, BAD, UNASSIGNED or a drop reason
    bad: list[tuple[str, str]]  # (location, reason) of the BAD records
    sample_record: np.ndarray | None = None  # (samples,) record index within the chunk
    sizes: np.ndarray | None = None  # (samples,) tokens per sample
    assistant: np.ndarray | None = None  # (samples,) assistant-role tokens per sample
    tokens: np.ndarray | None = None  # (sum(sizes),) token ids, back to back
    roles: np.ndarray | None = None  # (sum(sizes),) role ids, uint8


def process(chunk: Chunk) -> ChunkResult:
    from pathlib import Path

    kind = KINDS[chunk.kind]
    path = Path(chunk.path)
    status: list[str] = []
    bad: list[tuple[str, str]] = []
    convs = []
    conv_record: list[int] = []
    for i, (location, raw) in enumerate(chunk.records):
        if chunk.assign is not None and chunk.assign[i] == 0:
            status.append(UNASSIGNED)
            continue
        try:
            out = kind.convert(raw, location, path, chunk.options)
        except BadRecord as e:
            status.append(BAD)
            bad.append((e.location, e.reason))
            continue
        if isinstance(out, str):
            status.append(out)
            continue
        status.append(OK)
        if chunk.tokenize:
            convs += out
            conv_record += [i] * len(out)
    result = ChunkResult(start=chunk.start, status=status, bad=bad)
    if chunk.tokenize:
        _tokenize(result, convs, conv_record)
    return result


def _tokenize(result: ChunkResult, convs: list, conv_record: list[int]) -> None:
    tok = _TOKENIZER
    assert tok is not None, "init_worker() was not called"
    contents: list[str] = []  # "{role}\n{text}" of every turn: ChatML without its fixed scaffold
    turn_roles: list[int] = []
    turns_per_conv: list[int] = []
    for conv in convs:
        turns = conv.turns
        if conv.system:
            contents.append(_HEADER[Role.SYSTEM] + conv.system)
            turn_roles.append(Role.SYSTEM)
        contents += [_HEADER[r] + t for r, t in turns]
        turn_roles += [r for r, _ in turns]
        turns_per_conv.append(len(turns) + (1 if conv.system else 0))
    ids, turn_len = tok.encode_turns(contents, dtype=best_dtype(tok.vocab_size))
    roles = np.array(turn_roles, dtype=np.uint8)
    result.tokens = ids
    result.roles = np.repeat(roles, turn_len)
    result.sample_record = np.array(conv_record, dtype=np.int64)
    if convs:
        # Every conversation has at least one turn, so reduceat's segments are never empty.
        starts = np.concatenate([[0], np.cumsum(turns_per_conv, dtype=np.int64)[:-1]])
        result.sizes = np.add.reduceat(turn_len, starts).astype(np.int64)
        assistant_len = turn_len * (roles == Role.ASSISTANT)
        result.assistant = np.add.reduceat(assistant_len, starts).astype(np.int64)
    else:
        result.sizes = np.zeros(0, dtype=np.int64)
        result.assistant = np.zeros(0, dtype=np.int64)


class Workers:
    """Ordered, bounded parallel map of `process` over chunks.

    `Pool.imap` would read the whole input ahead (its feeder thread drains the iterator), so the
    window of chunks in flight is kept here: at most `2 * workers + 2` at a time.
    """

    def __init__(self, workers: int, model_path: str, extra_ids: list[str]):
        self.workers = max(1, int(workers))
        self._pool = None
        if self.workers == 1:
            init_worker(model_path, extra_ids)
        else:
            # spawn: no inherited threads or file handles; each worker loads the tokenizer once.
            ctx = mp.get_context("spawn")
            self._pool = ctx.Pool(
                self.workers, initializer=init_worker, initargs=(model_path, extra_ids)
            )

    def map(self, chunks: Iterator[Chunk]) -> Iterator[ChunkResult]:
        if self._pool is None:
            for c in chunks:
                yield process(c)
            return
        window: deque = deque()
        limit = 2 * self.workers + 2
        for c in chunks:
            window.append(self._pool.apply_async(process, (c,)))
            if len(window) >= limit:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def close(self, abort: bool = False) -> None:
        if self._pool is not None:
            if abort:
                self._pool.terminate()
            else:
                self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)
