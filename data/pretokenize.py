"""Pretokenize a dataset mix into Megatron's indexed format.

    python -m data.pretokenize CONFIG.yaml [--data-root DIR] [--tokenizer PATH] [--output-dir DIR]
                               [--workers N] [--skip-bad-records] [--mix NAME]

For each mix of the config (or only `--mix`), writes into its output_dir:
  {prefix}-{train,val}-text.{bin,idx}   token ids (uint16 below 65500 ids, else int32)
  {prefix}-{train,val}-role.{bin,idx}   role ids (0 system, 1 user, 2 assistant, 3 context)
  {prefix}-{train,val}_stats.txt        the model card's statistics layout
  {prefix}-{train,val}-meta.json        tokenizer fingerprint, vocab, per-dataset index ranges
  stats.json, special_tokens.json
Every file is written under a temporary name and renamed only when the whole mix is done
(data/atomic.py: a failed rename puts back what the others replaced; a killed run's leftovers go
at the next run).

Reruns and failures: an output_dir holding this mix's previous outputs (same mix name and
filename_prefix, any other settings) is replaced as a whole when the new run succeeds (a note
says so); one holding another mix's outputs or foreign files is refused before anything is
written. A bad record (unless skipped), an unexpected error in a worker (named by file:line),
a worker process that dies (killed for memory), a write error (disk full), Ctrl-C or SIGTERM
stop the run with one message and exit status 2, 130 or 143: the mix being written is not
renamed into place (its previous outputs stay as they were), its temporary files are removed
and the workers stopped; mixes finished earlier in the same run stay written (the message lists
them). Memory does not grow with the tokens: they stream to disk (about 25 bytes per sample are
kept: the index sizes and, with val_split, the staging record). Without a terminal there is no
progress bar but a line per dataset on stderr (none with --no-progress).

How a dataset is read depends on its options: without val_split or fraction, in one pass; with a
fraction below 1, twice (a scanning pass parses and filters, keeping one byte per record, and fixes
the seeded train/val/unused assignment; the tokenizing pass then tokenizes only what is used);
with val_split alone, in one tokenizing pass into a staging file, routed to train and val once the
count is known. All routes give the same assignment. A tree kind (the OASST export) is split by
tree, but its `fraction` and `max_val_set` count threads, as Open-Assistant samples and caps the
flattened thread lists its loader returns: with either, it always takes the staged route, where
the threads are known. Samples are written per dataset in file order (the trainer shuffles);
nothing depends on `--workers`.

The stats files follow Open-Assistant's: each dataset under the name its pretokenizer prints
(`DatasetSpec.display`, `val_display`); the val stats leave out a sample dataset with val_split
0, which has no val set there (the export's loader always returns one, empty or not).
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.atomic import AtomicFileSet
from data.config import DatasetSpec, MixConfig, load_mixes
from data.errors import DataError
from data.indexed import IndexedWriter, best_dtype
from data.sources.files import iter_blocks
from data.stats import TokenStats, stats_text
from data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer
from data.workers import BAD, OK, Chunk, WorkerDied, Workers

SPLITS = ("train", "val")
TRAIN, VAL = 1, 2
FORMAT = "oasst-trainer/sft-indexed-v1"
_CHUNK_RECORDS = 512
_CHUNK_BYTES = 1 << 20
_BAD_EXAMPLES = 5
# A dataset with val_split and no fraction: one tokenizing pass, then the split (else scan first).
_STAGE_SPLITS = True


@dataclass
class SourceReport:
    """What one dataset's files held, before any split."""

    records: int = 0
    valid: int = 0  # usable records (samples, or trees for oasst_export)
    no_samples: int = 0  # valid records that gave no sample (a tree with no thread left)
    dropped: Counter = field(default_factory=Counter)  # reason -> records
    bad: int = 0
    bad_examples: list = field(default_factory=list)
    # split -> records (trees for oasst_export, before its thread-level fraction and cap)
    assigned: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "valid": self.valid,
            "no_samples": self.no_samples,
            "dropped": dict(self.dropped),
            "bad_records": self.bad,
            "bad_examples": [f"{loc}: {why}" for loc, why in self.bad_examples],
            "assigned": self.assigned,
        }


def split_assignment(valid: np.ndarray, spec: DatasetSpec, seed: int) -> np.ndarray:
    """Per record (valid or not): 0 unused, 1 train, 2 val.

    One seeded permutation of the valid records: its first `val_size` are the val part (the
    first max_val_set of them kept, for a sample kind), the next int(n_train * fraction) are the
    train sample (without replacement). Seeded by (rng_seed, dataset name) only. A tree kind's
    fraction and max_val_set count threads, not trees: every tree is assigned here, and
    `select_threads` samples and caps once the threads are known.
    """
    idx = np.flatnonzero(valid)
    n = idx.size
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(spec.name.encode())]))
    perm = rng.permutation(n)
    n_val = val_size(n, spec)
    per_sample = spec.kind.unit == "sample"
    capped = spec.max_val_set is not None and per_sample
    n_val_kept = min(n_val, spec.max_val_set) if capped else n_val
    # Open-Assistant's pretokenizer: int(len(train) * fraction), no rounding up.
    n_train_kept = int((n - n_val) * (spec.fraction if per_sample else 1.0))
    assign = np.zeros(valid.size, dtype=np.int8)
    assign[idx[perm[:n_val_kept]]] = VAL
    assign[idx[perm[n_val : n_val + n_train_kept]]] = TRAIN
    return assign


def val_size(n: int, spec: DatasetSpec) -> int:
    """How many of `n` valid records (samples, or trees) Open-Assistant holds out for val.

    Samples: sklearn's `train_test_split(test_size=val_split)`, i.e. ceil(val_split * n) in plain
    float arithmetic (0.07 * 100 = 7.000000000000001 holds out 8). Trees (the OASST export):
    torch's `random_split(trees, [1 - val_split, val_split])`, i.e. the floor of each share and
    the remainder dealt out one by one from the train share on, so 21 trees at 0.05 give 1.
    """
    v = spec.val_split
    if v <= 0:
        return 0
    if spec.kind.unit == "tree":
        shares = [math.floor(n * (1.0 - v)), math.floor(n * v)]
        for i in range(n - sum(shares)):
            shares[i % 2] += 1
        return shares[1]
    return min(n, math.ceil(v * n))


def select_threads(splits: np.ndarray, spec: DatasetSpec, seed: int) -> np.ndarray:
    """A tree kind's per-sample (thread) split ids, with the threads `fraction` and max_val_set
    leave out set to 0 (unused): a seeded int(n_train_threads * fraction) of the train threads
    are kept, and a seeded max_val_set of the val threads. Open-Assistant's loader returns the
    export as flattened thread lists, one per split; its pretokenizer samples `fraction` of the
    train list and `get_one_dataset` caps the val list, so both count threads, not trees. Each
    draw has its own stream, seeded by (rng_seed, dataset name, split)."""
    out = splits.copy()
    name = zlib.crc32(spec.name.encode())
    train = np.flatnonzero(splits == TRAIN)
    # Open-Assistant's pretokenizer: int(len(train) * fraction), no rounding up.
    n_train = int(train.size * spec.fraction)
    if n_train < train.size:
        rng = np.random.default_rng(np.random.SeedSequence([seed, name, TRAIN]))
        out[train[rng.permutation(train.size)[n_train:]]] = 0
    val = np.flatnonzero(splits == VAL)
    if spec.max_val_set is not None and val.size > spec.max_val_set:
        rng = np.random.default_rng(np.random.SeedSequence([seed, name, VAL]))
        out[val[rng.permutation(val.size)[spec.max_val_set :]]] = 0
    return out


def _chunks(spec: DatasetSpec, assign: np.ndarray | None, tokenize: bool) -> Iterator[Chunk]:
    """The dataset's records in order, cut into chunks that never span two files."""
    columns = list(spec.kind.columns) if spec.kind.columns else None
    start = 0
    for path in spec.files:
        for block in iter_blocks(path, columns, _CHUNK_RECORDS, _CHUNK_BYTES):
            yield _chunk(spec, path, start, block, assign, tokenize)
            start += len(block)


def _chunk(
    spec: DatasetSpec, path: Path, start: int, records: list, assign, tokenize: bool
) -> Chunk:
    a = None if assign is None else assign[start : start + len(records)].tobytes()
    return Chunk(spec.kind.name, spec.options, str(path), start, records, a, tokenize)


class _SplitOutput:
    """The text and role writers of one split, and its statistics."""

    def __init__(self, files: AtomicFileSet, base: Path, tok: Tokenizer):
        self.base = base
        self.text_idx = files.path(f"{base}-text.idx")
        self.role_idx = files.path(f"{base}-role.idx")
        self.text = IndexedWriter(
            files.path(f"{base}-text.bin"), best_dtype(tok.vocab_size), tok.vocab_size
        )
        self.role = IndexedWriter(files.path(f"{base}-role.bin"), np.uint16, 4)
        self.stats: dict[str, TokenStats] = {}  # dataset name -> its stats, in mix order
        self.ranges: dict[str, list[int]] = {}

    def write(self, tokens, roles, sizes, keep: np.ndarray) -> None:
        per_token = np.repeat(keep, sizes)
        self.text.add_many(tokens[per_token], sizes[keep])
        self.role.add_many(roles[per_token], sizes[keep])

    def finalize(self) -> None:
        self.text.finalize(self.text_idx)
        self.role.finalize(self.role_idx)

    def close(self) -> None:
        self.text.close()
        self.role.close()


class _NoBar:
    """Stands in for tqdm when progress is off or tqdm is not installed."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # a bare environment (e.g. a GPU image): pretokenize without a bar
        return _NoBar()
    if not enabled:
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        unit="rec",
        disable=None,  # tqdm's own rule: no bar when stderr is not a terminal
        leave=False,
        file=sys.stderr,
    )


def _no_samples(res) -> int:
    """Valid records of a tokenized chunk that gave no sample (an OASST tree with no thread)."""
    return sum(s == OK for s in res.status) - int(np.unique(res.sample_record).size)


def _count(report: SourceReport, status: list[str], bad: list, skip_bad: bool) -> None:
    for s in status:
        report.records += 1
        if s == OK:
            report.valid += 1
        elif s != BAD:
            report.dropped[s] += 1
    if bad:
        if not skip_bad:
            location, reason = bad[0]
            raise DataError(
                f"{location}: {reason}\n  fix the record, or pass --skip-bad-records to skip "
                "and count such records"
            )
        report.bad += len(bad)
        room = _BAD_EXAMPLES - len(report.bad_examples)
        report.bad_examples += bad[: max(0, room)]


class _Staging:
    """Tokenized samples of one dataset, kept on disk until its split is known.

    Holds the tokens and roles back to back in two temporary files and, per sample, its record
    index and assistant-token count (16 bytes per sample in memory); `replay` reads them back in
    order, in bounded chunks."""

    def __init__(self, directory: Path, dtype):
        stem = directory / f".stage.{os.getpid()}"
        self.paths = (Path(f"{stem}.text"), Path(f"{stem}.role"))
        directory.mkdir(parents=True, exist_ok=True)
        self._files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 - closed in close()
        self.dtype = np.dtype(dtype)
        self.sizes, self.assistant, self.record = array("i"), array("i"), array("q")

    def add(self, res) -> None:
        self._files[0].write(np.ascontiguousarray(res.tokens, dtype=self.dtype).tobytes())
        self._files[1].write(res.roles.astype(np.uint8).tobytes())
        self.sizes.frombytes(res.sizes.astype(np.int32).tobytes())
        self.assistant.frombytes(res.assistant.astype(np.int32).tobytes())
        self.record.frombytes((res.sample_record + res.start).astype(np.int64).tobytes())

    def replay(self, max_tokens: int = 1 << 20) -> Iterator[tuple]:
        """(sizes, assistant, tokens, roles, record) for consecutive runs of samples of at most
        `max_tokens` tokens (or one sample), so memory stays bounded whatever the sample lengths.

        Plain reads, not a memory map: mapped pages would count in the RSS the pipeline keeps
        flat."""
        for f in self._files:
            f.close()
        sizes = np.frombuffer(self.sizes, dtype=np.int32)
        assistant = np.frombuffer(self.assistant, dtype=np.int32)
        record = np.frombuffer(self.record, dtype=np.int64)
        with open(self.paths[0], "rb") as ft, open(self.paths[1], "rb") as fr:
            a = 0
            while a < sizes.size:
                ends = np.cumsum(sizes[a : a + 4096], dtype=np.int64)
                take = max(1, int(np.searchsorted(ends, max_tokens, side="right")))
                n = sizes[a : a + take].astype(np.int64)
                total = int(ends[take - 1])
                tokens = np.fromfile(ft, dtype=self.dtype, count=total)
                roles = np.fromfile(fr, dtype=np.uint8, count=total)
                if tokens.size != total or roles.size != total:
                    raise DataError(f"{self.paths[0]}: staging file truncated (disk full?)")
                yield (
                    n,
                    assistant[a : a + take].astype(np.int64),
                    tokens,
                    roles,
                    record[a : a + take],
                )
                a += take

    def close(self) -> None:
        for f in self._files:
            f.close()
        for p in self.paths:
            p.unlink(missing_ok=True)


def _route(outputs, stats, mat, sizes, assistant, tokens, roles, splits) -> None:
    """Count and write a run of samples: each to its split, when it has enough assistant tokens."""
    accepted = assistant >= mat
    for split, out in outputs.items():
        in_split = splits == split
        if not in_split.any():
            continue
        stats[split].add(sizes[in_split], assistant[in_split], accepted[in_split])
        out.write(tokens, roles, sizes, in_split & accepted)


def _process_dataset(
    spec: DatasetSpec,
    mix: MixConfig,
    workers: Workers,
    outputs: dict[int, _SplitOutput],
    skip_bad: bool,
    progress: bool,
) -> SourceReport:
    """Tokenize one dataset into the split outputs, by one of three routes:

    - no val_split and no fraction: one pass, everything to train;
    - fraction < 1: a scanning pass fixes the assignment, so that only the kept part is
      tokenized on the second pass;
    - val_split only: one tokenizing pass into a staging area, then the assignment (the same as
      the scanning route would give) routes the staged samples. A tree kind with fraction, or
      with val_split and max_val_set, always takes this route: they count threads, known only
      once tokenized.
    """
    report = SourceReport()
    mat = mix.min_assistant_tokens or 0
    stats = {
        TRAIN: TokenStats(spec.display, spec.fraction),
        VAL: TokenStats(spec.val_display(capped=False), 1.0),
    }
    first = {s: len(outputs[s].text) for s in outputs}

    def assignment(valid: bytearray) -> np.ndarray:
        assign = split_assignment(np.frombuffer(bytes(valid), dtype=bool), spec, mix.rng_seed)
        report.assigned = {"train": int((assign == TRAIN).sum()), "val": int((assign == VAL).sum())}
        return assign

    # A tree kind's train threads are sampled and its val threads capped once they are known:
    # only the staged route has them.
    tree = spec.kind.unit == "tree"
    by_thread = tree and (
        spec.fraction < 1 or (spec.val_split > 0 and spec.max_val_set is not None)
    )
    if not by_thread and (spec.fraction < 1 or (spec.val_split > 0 and not _STAGE_SPLITS)):
        valid = bytearray()
        bar = _progress(None, f"{spec.name}: scan", progress)
        for res in workers.map(_chunks(spec, None, tokenize=False)):
            _count(report, res.status, res.bad, skip_bad)
            valid += bytes(s == OK for s in res.status)
            bar.update(len(res.status))
        bar.close()
        assign = assignment(valid)
        bar = _progress(sum(report.assigned.values()), f"{spec.name}: tokenize", progress)
        for res in workers.map(_chunks(spec, assign, tokenize=True)):
            a = assign[res.start : res.start + len(res.status)]
            if len(a) != len(res.status) or any(
                (a[i] != 0) != (s == OK) for i, s in enumerate(res.status)
            ):
                raise DataError(
                    f"{spec.location}: the dataset changed between the scanning and the "
                    "tokenizing pass; rerun when its files are no longer being written"
                )
            report.no_samples += _no_samples(res)
            splits = a[res.sample_record]
            _route(outputs, stats, mat, res.sizes, res.assistant, res.tokens, res.roles, splits)
            bar.update(int(np.count_nonzero(a)))
        bar.close()
    elif spec.val_split > 0 or by_thread:
        valid = bytearray()
        staging = _Staging(mix.output_dir, outputs[TRAIN].text.dtype)
        try:
            bar = _progress(None, f"{spec.name}: tokenize", progress)
            for res in workers.map(_chunks(spec, None, tokenize=True)):
                _count(report, res.status, res.bad, skip_bad)
                report.no_samples += _no_samples(res)
                valid += bytes(s == OK for s in res.status)
                staging.add(res)
                bar.update(len(res.status))
            bar.close()
            assign = assignment(valid)
            splits = assign[np.frombuffer(staging.record, dtype=np.int64)]
            if tree:
                n_val = int(np.count_nonzero(splits == VAL))  # val threads, before the cap
                capped = spec.max_val_set is not None and n_val > spec.max_val_set
                stats[VAL].name = spec.val_display(capped)
                splits = select_threads(splits, spec, mix.rng_seed)
            k = 0
            for sizes, assistant, tokens, roles, _ in staging.replay():
                part = splits[k : k + sizes.size]
                _route(outputs, stats, mat, sizes, assistant, tokens, roles, part)
                k += sizes.size
        finally:
            staging.close()
    else:
        bar = _progress(None, f"{spec.name}: tokenize", progress)
        for res in workers.map(_chunks(spec, None, tokenize=True)):
            _count(report, res.status, res.bad, skip_bad)
            report.no_samples += _no_samples(res)
            splits = np.full(res.sizes.size, TRAIN, dtype=np.int8)
            _route(outputs, stats, mat, res.sizes, res.assistant, res.tokens, res.roles, splits)
            bar.update(len(res.status))
        bar.close()
        report.assigned = {"train": report.valid, "val": 0}
    if report.records == 0:
        # An empty file (an interrupted download, a wrong file) would otherwise pass as a dataset
        # that merely contributed nothing.
        names = ", ".join(str(f) for f in spec.files[:3]) + (" ..." if len(spec.files) > 3 else "")
        raise DataError(
            f"{spec.location}: dataset {spec.name!r} holds no records ({names}); expected "
            f"{spec.kind.name} records (JSON Lines, a JSON array or Parquet rows): check that "
            "the files are complete, or remove the dataset from the mix"
        )
    for split, out in outputs.items():
        # Open-Assistant has no val set for a sample dataset with val_split 0 (its
        # train_val_dataset returns None), so its val stats do not list it; the export's loader
        # always returns a val ListDataset, empty or not.
        if split == TRAIN or spec.val_split > 0 or tree:
            out.stats[spec.name] = stats[split]
        out.ranges[spec.name] = [first[split], len(out.text)]
    return report


def check_output_dir(mix: MixConfig) -> bool:
    """Refuse an output_dir that is a file or holds another mix's outputs (stats.json and
    special_tokens.json are not prefixed, so they would be replaced). True when it holds this
    mix's previous outputs, which a successful run replaces as a whole."""
    try:
        return _check_output_dir(mix)
    except OSError as e:  # e.g. a name too long: even asking whether the path exists fails
        raise DataError(
            f"output_dir {mix.output_dir} of mix {mix.name!r}: cannot use it "
            f"({e.strerror or repr(e)}): set another output_dir (or --output-dir)"
        ) from e


def _check_output_dir(mix: MixConfig) -> bool:
    out = mix.output_dir
    if out.exists() and not out.is_dir():
        raise DataError(
            f"output_dir {out} of mix {mix.name!r} exists and is not a directory: set another "
            "output_dir (or --output-dir)"
        )
    above = next((p for p in out.parents if p.exists()), None)  # found before any tokenizing
    if above is not None and not above.is_dir():
        raise DataError(
            f"output_dir {out} of mix {mix.name!r} is under {above}, which is a file, not a "
            "directory: set another output_dir (or --output-dir)"
        )
    # Where the outputs (or the missing folders leading to them) would be created.
    nearest = out if out.exists() else above
    if nearest is not None and not os.access(nearest, os.W_OK | os.X_OK):
        raise DataError(
            f"output_dir {out} of mix {mix.name!r}: no permission to write into {nearest}: set "
            "another output_dir (or --output-dir)"
        )
    stats = out / "stats.json"
    if not stats.exists():
        return False
    try:
        prev = json.loads(stats.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prev = None
    if not isinstance(prev, dict) or prev.get("format") != FORMAT:
        raise DataError(
            f"{stats}: not written by data.pretokenize; refusing to replace it: set another "
            f"output_dir for mix {mix.name!r} (or --output-dir), or remove the file"
        )
    if (prev.get("mix"), prev.get("filename_prefix")) != (mix.name, mix.filename_prefix):
        raise DataError(
            f"{out} holds the outputs of mix {prev.get('mix')!r} (filename_prefix "
            f"{prev.get('filename_prefix')!r}); mix {mix.name!r} would replace its stats.json "
            "and special_tokens.json: set another output_dir (or --output-dir), or remove them"
        )
    return True


def pretokenize_mix(
    mix: MixConfig,
    tokenizer_path: str = DEFAULT_TOKENIZER_PATH,
    workers: int = 1,
    skip_bad_records: bool = False,
    progress: bool = True,
    on_commit: Callable[[], None] | None = None,
) -> dict:
    """Tokenize one mix and write its files; returns what stats.json holds. `on_commit` is called
    once every file is renamed into place, before an interrupt can land."""
    replacing = check_output_dir(mix)
    tok = Tokenizer(tokenizer_path)
    out_dir = mix.output_dir
    prefix = out_dir / mix.filename_prefix
    reports: dict[str, SourceReport] = {}
    with AtomicFileSet() as files, Workers(workers, tokenizer_path, tok.extra_ids) as pool:
        outputs = {
            TRAIN: _SplitOutput(files, Path(f"{prefix}-train"), tok),
            VAL: _SplitOutput(files, Path(f"{prefix}-val"), tok),
        }
        try:
            # Without a terminal (a log file, `make data` in CI) tqdm draws no bar: a line per
            # dataset instead, so that a long run shows where it is.
            log = progress and not _is_terminal(sys.stderr)
            for k, spec in enumerate(mix.datasets, 1):
                reports[spec.name] = _process_dataset(
                    spec, mix, pool, outputs, skip_bad_records, progress
                )
                if log:
                    r = reports[spec.name]
                    print(
                        f"{mix.name}: dataset {k}/{len(mix.datasets)} {spec.name}: {r.records} "
                        f"records read, {r.valid} usable",
                        file=sys.stderr,
                        flush=True,
                    )
            for out in outputs.values():
                out.finalize()
            if len(outputs[TRAIN].text) == 0:
                # Every record skipped (a format the kind does not read, with
                # --skip-bad-records) or dropped: an empty mix would only fail in the trainer,
                # after the model is loaded; the previous outputs, if any, stay.
                counts = "; ".join(
                    f"{name}: {r.records} records read, {r.valid} usable, {r.bad} bad"
                    + (f", dropped {dict(r.dropped)}" if r.dropped else "")
                    + "".join(f"; e.g. {loc}: {why}" for loc, why in r.bad_examples[:1])
                    for name, r in reports.items()
                )
                raise DataError(
                    f"{mix.source}: mix {mix.name!r} gives no training sample ({counts}); check "
                    "each dataset's kind and path against its files"
                )
        finally:
            for out in outputs.values():
                out.close()
        summary = {
            "format": FORMAT,
            "mix": mix.name,
            "config": mix.source,
            "output_dir": str(out_dir),
            "filename_prefix": mix.filename_prefix,
            "min_assistant_tokens": mix.min_assistant_tokens,
            "rng_seed": mix.rng_seed,
            "tokenizer": tok.describe(),
            "datasets": {
                s.name: {
                    "kind": s.kind.name,
                    "location": str(s.location),
                    "files": [str(f) for f in s.files],
                    "fraction": s.fraction,
                    "val_split": s.val_split,
                    "max_val_set": s.max_val_set,
                    **reports[s.name].to_dict(),
                }
                for s in mix.datasets
            },
            "splits": {},
        }
        texts = {}
        for split_id, name in zip((TRAIN, VAL), SPLITS):
            out = outputs[split_id]
            total = TokenStats("total", 1.0)
            for s in out.stats.values():
                total.merge(s)
            summary["splits"][name] = {
                "datasets": {k: s.to_dict() for k, s in out.stats.items()},
                "total": total.to_dict(),
            }
            texts[name] = stats_text(str(out_dir), list(out.stats.values()), total)
            files.path(f"{out.base}_stats.txt").write_text(texts[name], encoding="utf-8")
            meta = {
                "format": FORMAT,
                "mix": mix.name,
                "split": name,
                "num_samples": len(out.text),
                "num_tokens": out.text.num_elements,
                "text_dtype": str(out.text.dtype),
                "role_ids": {"system": 0, "user": 1, "assistant": 2, "context": 3},
                "dataset_ranges": out.ranges,
                "tokenizer": tok.describe(),
            }
            _write_json(files.path(f"{out.base}-meta.json"), meta)
        _write_json(files.path(out_dir / "stats.json"), summary)
        _write_json(files.path(out_dir / "special_tokens.json"), tok.special_tokens)
        with _signals_deferred():  # all files renamed, or none: not old and new ones mixed
            files.commit()
            if on_commit is not None:
                on_commit()
    if replacing:
        print(
            f"note: replaced the previous outputs of mix {mix.name!r} in {out_dir}", file=sys.stderr
        )
    for name in SPLITS:
        print(texts[name])
    return summary


@contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM back until the block is done; one that came meanwhile is raised
    again, and handled as usual, when it ends. Python-level handlers (they run on the main
    thread, whichever thread the signal reached), not a signal mask: other threads (the
    executor's) would take a signal that the main thread blocks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if pending:
            signal.raise_signal(pending[0])


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.pretokenize",
        description="Tokenize Open-Assistant style dataset mixes into Megatron indexed files.",
    )
    parser.add_argument("config", help="YAML file of mixes (e.g. configs/data/oasst_top1.yaml)")
    parser.add_argument(
        "--data-root",
        default=".",
        help="where dataset names and relative paths resolve (default: .)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model (default: the bundled sample tokenizer)",
    )
    parser.add_argument("--output-dir", default=None, help="override the mix's output_dir")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument(
        "--skip-bad-records", action="store_true", help="count and skip unreadable records"
    )
    parser.add_argument("--mix", default=None, help="only this mix of the config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    tokenizer = args.tokenizer or DEFAULT_TOKENIZER_PATH
    # SIGTERM (`timeout`, a scheduler's limit, `docker stop`) takes Ctrl-C's way out: temporary
    # files removed, workers stopped, instead of dying with them left behind.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return _run(args, tokenizer)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as SIGINT raises KeyboardInterrupt."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _run(args, tokenizer: str) -> int:
    written: list[str] = []  # mixes renamed into place by this run
    current = None  # the mix being tokenized
    try:
        mixes = load_mixes(args.config, args.data_root, args.output_dir, args.mix)
        if not Path(tokenizer).is_file():
            what = "is a directory" if Path(tokenizer).is_dir() else "not found"
            raise DataError(
                f"{tokenizer}: tokenizer model {what} (--tokenizer expects a SentencePiece "
                "tokenizer.model file)"
            )
        try:
            Tokenizer(tokenizer)
        except ValueError as e:  # not a SentencePiece model: fail before any mix is tokenized
            raise DataError(
                f"{str(e).strip()}; --tokenizer expects a SentencePiece tokenizer.model "
                "(e.g. Llama-2's)"
            ) from None
        for mix in mixes:  # every mix's folder, before the first one is written
            check_output_dir(mix)
        for mix in mixes:
            current = mix
            summary = pretokenize_mix(
                mix,
                tokenizer,
                args.workers,
                args.skip_bad_records,
                not args.no_progress,
                on_commit=lambda name=mix.name: written.append(name),
            )
            current = None
            for name, info in summary["datasets"].items():
                if info["bad_records"]:
                    print(
                        f"warning: {mix.name}/{name}: skipped {info['bad_records']} bad "
                        "record(s), e.g. " + "; ".join(info["bad_examples"][:2]),
                        file=sys.stderr,
                    )
            tr, va = summary["splits"]["train"]["total"], summary["splits"]["val"]["total"]
            print(
                f"{mix.name}: wrote {mix.output_dir}/{mix.filename_prefix}-{{train,val}}-* "
                f"(train {tr['accepted_samples']} samples / {tr['accepted_tokens']} tokens, "
                f"val {va['accepted_samples']} / {va['accepted_tokens']})"
            )
    except (DataError, WorkerDied) as e:
        print(f"error: {e}{_not_written(current, written)}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the outputs (disk full, permissions): the previous ones stay
        print(f"error: {e}{_not_written(current, written)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what, code = ("terminated", 143) if isinstance(e, _Terminated) else ("interrupted", 130)
        print(f"{what}{_not_written(current, written)}", file=sys.stderr)
        return code
    return 0


def _not_written(mix: MixConfig | None, written: list[str]) -> str:
    """What a failed or interrupted run left: the mix it was on is not renamed into place (its
    previous outputs, if any, are untouched); the mixes before it are complete."""
    done = f"mixes written by this run: {', '.join(written)}" if written else ""
    if mix is None or mix.name in written:  # failed before the first mix, or after its commit
        return f"\n  {done}" if done else ""
    return (
        f"\n  mix {mix.name!r} was not written: its previous outputs in {mix.output_dir}, if "
        f"any, are untouched{'; ' + done if done else ''}"
    )


if __name__ == "__main__":
    sys.exit(main())
