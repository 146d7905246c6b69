"""The pretokenizer's per-chunk work, run in worker processes (or in-process with one worker).

A chunk is a run of raw records of one file. Workers parse and check them (so the main process
only reads bytes), and, on the tokenizing pass, render the kept ones as ChatML and tokenize them
with one SentencePiece call per chunk. Results come back as flat numpy arrays in record order;
nothing here depends on how records were cut into chunks, so outputs do not depend on the number
of workers.
"""

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from data.chat import ROLE_NAMES, Role
from data.errors import BadRecord, DataError
from data.indexed import best_dtype
from data.sources import KINDS
from data.tokenizer import Tokenizer

OK = "ok"
BAD = "bad"
UNASSIGNED = ""  # not read on the tokenizing pass: neither train nor val

_TOKENIZER: Tokenizer | None = None
_HEADER = {role: f"{name}\n" for role, name in ROLE_NAMES.items()}  # a turn's content starts so


class WorkerDied(RuntimeError):
    """A worker process ended without returning its chunk (killed, out of memory, crashed)."""


def init_worker(model_path: str, extra_ids: list[str]) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(model_path, extra_ids)


def _init_pool_worker(model_path: str, extra_ids: list[str], parent: int) -> None:
    # Ctrl-C reaches the whole process group: the main process alone handles it (and stops the
    # workers), so that an interrupt prints one message, not a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    init_worker(model_path, extra_ids)


def _exit_with_parent(parent: int) -> None:
    """End this worker once the main process `parent` is gone. A main process that is killed
    outright (SIGKILL, the out-of-memory killer) cleans up nothing: its workers, waiting on a
    task queue whose write end they hold themselves, never saw it end and stayed alive for good,
    and with them the resource tracker. Polled: on Linux a parent-death signal would fire when
    the thread that started the worker ends, which need not be the main process ending."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


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
    """Parse, check and (on the tokenizing pass) tokenize one chunk.

    Anything but a BadRecord (which is counted) comes out as a DataError naming the record (or,
    before the first record, the file): a plain message, the same from a worker process as in
    process, that `python -m data.pretokenize` prints without a traceback."""
    where: list = [None]  # the location of the record being read
    try:
        return _process(chunk, where)
    except DataError as e:
        raise DataError(str(e)) from None  # a plain DataError: subclasses may not unpickle
    except Exception as e:
        location = where[0] or _location(chunk, 0)
        raise DataError(
            f"{location}: unexpected {type(e).__name__} while reading this record: {e}"
        ) from None


def _location(chunk: Chunk, i: int) -> str:
    """The location of the chunk's i-th record (records may be a list or ArrowRows)."""
    for k, (location, _) in enumerate(chunk.records):
        if k == i:
            return location
    return chunk.path


def _process(chunk: Chunk, where: list) -> ChunkResult:
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
        where[0] = location
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
        try:
            _tokenize(result, convs, conv_record)
        except Exception as e:
            # One call tokenizes the whole chunk: find the first record it fails on alone.
            for k, conv in enumerate(convs):
                try:
                    _tokenize(ChunkResult(0, [], []), [conv], [0])
                except Exception:
                    where[0] = _location(chunk, conv_record[k])
                    break
            raise DataError(
                f"{where[0]}: the tokenizer failed on this record: {type(e).__name__}: {e}"
            ) from None
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
    window of chunks in flight is kept here: at most `2 * workers + 2` at a time. A
    ProcessPoolExecutor, not a `multiprocessing.Pool`: a worker that dies (the OOM killer, a
    crash) breaks the executor, which fails the pending chunks (`WorkerDied`), where a Pool would
    start a new worker and wait forever for the lost chunk's result.
    """

    def __init__(self, workers: int, model_path: str, extra_ids: list[str]):
        self.workers = max(1, int(workers))
        self._pool = None
        if self.workers == 1:
            init_worker(model_path, extra_ids)
        else:
            # spawn: no inherited threads or file handles; each worker loads the tokenizer once.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_pool_worker,
                initargs=(model_path, extra_ids, os.getpid()),
            )

    def map(self, chunks: Iterator[Chunk]) -> Iterator[ChunkResult]:
        if self._pool is None:
            for c in chunks:
                yield process(c)
            return
        window: deque = deque()
        limit = 2 * self.workers + 2
        for c in chunks:
            try:
                future = self._pool.submit(process, c)
            except BrokenProcessPool:  # a worker died since the last result: report it there
                future = self._pool_broken()
            window.append((c.path, c.start, future))
            if len(window) >= limit:
                yield _result(*window.popleft())
        while window:
            yield _result(*window.popleft())

    @staticmethod
    def _pool_broken():
        from concurrent.futures import Future

        future: Future = Future()
        future.set_exception(BrokenProcessPool("a worker process died"))
        return future

    def close(self, abort: bool = False) -> None:
        """Stop the workers: after the chunks in flight (abort=False), or at once (abort=True:
        an error or an interrupt), so that no worker process outlives the run."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if abort:
            # No public way to stop running workers before Python 3.14's terminate_workers():
            # cancel what is queued, terminate the processes, then wait for the executor's
            # manager thread, which reaps them (joining them here too would race with it for
            # their exit status, and a process could look alive after it was gone).
            procs = list((getattr(pool, "_processes", None) or {}).values())
            manager = getattr(pool, "_executor_manager_thread", None)
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            if manager is not None:
                manager.join(timeout=60)
            for p in procs:
                p.join(timeout=5)
        pool.shutdown(wait=True)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)


def _result(path: str, start: int, future) -> ChunkResult:
    try:
        return future.result()
    except BrokenProcessPool:
        raise WorkerDied(
            f"a worker process ended abruptly while reading {path} (the chunk from record "
            f"{start} of its dataset, or one after it): killed for lack of memory, or crashed; "
            "rerun, with fewer --workers if memory is short"
        ) from None
