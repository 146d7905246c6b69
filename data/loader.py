"""Training batches from pretokenized text+role files.

Rows of `seq_length` tokens are built from a global sample order (a seeded permutation per
epoch), independent of the data-parallel size: packing (default) puts whole samples into rows,
first-fit over a few open rows in that order; padding puts one sample per row.

What a global batch of G = global_batch_size is (`batch_unit`):
- "samples" (the trainer's default): global step i takes samples [i*G, (i+1)*G) of the sample
  stream (epochs follow one another), as Megatron-LLM's one padded sample per row did, so the
  seed's batch size, iterations and epochs mean what they meant there. DP rank r packs its
  contiguous G/dp_size of them into as many rows as they need, in micro-batches of
  micro_batch_size rows (the last one filled up with all-padding rows): the number of
  micro-batches varies by step and rank, the compute spent on padding stays small.
- "rows": global step i takes rows [i*G, (i+1)*G) of the row stream, packed over the whole
  epoch; DP rank r takes its contiguous G/dp_size of them. With packing a step then sees several
  times the samples of G padded rows.
The state is the position in the sample (or row) stream, so a run resumed at another DP size sees
the same global batches.

Micro-batch (CPU tensors):
    tokens        (B, S) int64    inputs
    labels        (B, S) int64    next token of the same document (pad where there is none)
    loss_mask     (B, S) float32  1 where the label is an assistant-role token
    position_ids  (B, S) int64    restart at 0 at every document
    cu_seqlens    (segments+1,)   int32 boundaries over the flattened B*S tokens: one segment per
                                  document, the padding at the end of a packed row its own
                                  segment (padding mode: one segment per row)
    max_seqlen    int             longest segment
    num_truncated int             samples cut on the right (their last label is the true next
                                  token, the mask stays aligned with the labels)
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.chat import Role
from data.errors import DataError
from data.indexed import IndexedDataset

_OPEN_ROWS = 8  # rows kept open while packing: first fit among them, the oldest closed first
_ROUND = 16  # padding mode with variable_seq_lengths: lengths rounded up to this
_STATE_VERSION = 1


class SFTDataset:
    """`{prefix}-text.{bin,idx}` and `{prefix}-role.{bin,idx}`, checked against each other and
    against the pretokenizer's `{prefix}-meta.json` (tokenizer fingerprint, vocab size, pad id,
    per-dataset index ranges) when it is there.

    `vocab_size`: the model's vocabulary, to refuse token ids it cannot embed (defaults to the
    tokenizer's vocabulary recorded in the meta file).
    """

    def __init__(self, prefix: str, vocab_size: int | None = None, validate: bool = True):
        self.prefix = str(prefix)
        try:
            self.text = IndexedDataset(f"{self.prefix}-text")
            self.role = IndexedDataset(f"{self.prefix}-role")
        except DataError as e:
            # A file name given for the prefix is the usual slip: say what the prefix is.
            stem = self.prefix.removesuffix(".bin").removesuffix(".idx")
            if stem != self.prefix or stem.endswith(("-text", "-role")):
                stem = stem.removesuffix("-text").removesuffix("-role")
                raise DataError(
                    f"{e}; the data prefix is the path without -text/-role and .bin/.idx, "
                    f"e.g. {stem}"
                ) from None
            raise
        if len(self.text) != len(self.role) or not np.array_equal(self.text.sizes, self.role.sizes):
            bad = _first_mismatch(self.text.sizes, self.role.sizes)
            raise DataError(
                f"{self.role.idx_path}: does not match {self.text.idx_path} ({len(self.role)} vs "
                f"{len(self.text)} sequences; first difference at sequence {bad}); the two files "
                "come from different runs"
            )
        self.meta_path = Path(f"{self.prefix}-meta.json")
        self.meta: dict | None = None
        if self.meta_path.is_file():
            try:
                self.meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(
                    f"{self.meta_path}: unreadable ({e}); fix or delete it (it is optional), or "
                    "re-run data.pretokenize"
                ) from None
        meta = self._check_meta(self.meta) if self.meta is not None else {}
        tok = meta.get("tokenizer") or {}
        self.fingerprint: str | None = tok.get("fingerprint")
        self.vocab_size: int | None = tok.get("vocab_size")
        self.pad_id: int | None = tok.get("pad_id")
        # For the mismatch message only (not checked: the fingerprint is what decides).
        extra = tok.get("extra_ids")
        self.extra_ids: list[str] | None = (
            extra if isinstance(extra, list) and all(isinstance(x, str) for x in extra) else None
        )
        self.dataset_ranges: dict[str, tuple[int, int]] = {
            k: (int(a), int(b)) for k, (a, b) in (meta.get("dataset_ranges") or {}).items()
        }
        for name, (a, b) in self.dataset_ranges.items():
            if not 0 <= a <= b <= len(self):
                raise DataError(
                    f"{self.meta_path}: range of {name!r} [{a}, {b}) is outside [0, {len(self)}]"
                )
        if validate:
            self._validate(vocab_size if vocab_size is not None else self.vocab_size)

    def _check_meta(self, meta) -> dict:
        """The fields this class reads, with the types the pretokenizer writes: an edited or
        foreign meta file is reported, not met with a TypeError further on."""
        fix = "fix or delete it (it is optional), or re-run data.pretokenize"

        def bad(what: str) -> DataError:
            return DataError(f"{self.meta_path}: {what}; {fix}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(meta, dict):
            raise bad(f"expected a JSON object, found {type(meta).__name__}")
        tok = meta.get("tokenizer")
        if tok is not None:
            if not isinstance(tok, dict):
                raise bad(f"'tokenizer' must be an object, found {tok!r:.60}")
            if tok.get("fingerprint") is not None and not isinstance(tok["fingerprint"], str):
                raise bad(f"tokenizer.fingerprint must be a string, found {tok['fingerprint']!r}")
            for key in ("vocab_size", "pad_id"):
                if tok.get(key) is not None and not (is_int(tok[key]) and tok[key] >= 0):
                    raise bad(f"tokenizer.{key} must be a non-negative integer, found {tok[key]!r}")
        ranges = meta.get("dataset_ranges")
        if ranges is not None:
            if not isinstance(ranges, dict):
                raise bad(
                    f"'dataset_ranges' must map dataset names to [start, end], found {ranges!r:.60}"
                )
            for name, r in ranges.items():
                if not (isinstance(r, list) and len(r) == 2 and all(map(is_int, r))):
                    raise bad(
                        f"dataset_ranges[{name!r}] must be [start, end] integers, found {r!r}"
                    )
        return meta

    def _validate(self, vocab_size: int | None) -> None:
        roles = self.role.data
        if roles.size and int(roles.max()) > max(Role):
            raise DataError(
                f"{self.role.bin_path}: role id {int(roles.max())} in sequence "
                f"{self._sequence_of(int(np.argmax(roles > max(Role))))}; role ids are 0 system, "
                "1 user, 2 assistant, 3 context"
            )
        if roles.size and roles.dtype.kind == "i" and int(roles.min()) < 0:
            raise DataError(
                f"{self.role.bin_path}: role id {int(roles.min())} in sequence "
                f"{self._sequence_of(int(np.argmax(roles < 0)))}; role ids are 0 system, "
                "1 user, 2 assistant, 3 context"
            )
        tokens = self.text.data
        # Signed token files (int32 for large vocabularies) could hold ids the embedding
        # would index out of range; unsigned ones cannot.
        if tokens.size and tokens.dtype.kind == "i" and int(tokens.min()) < 0:
            raise DataError(
                f"{self.text.bin_path}: token id {int(tokens.min())} < 0 (first in sequence "
                f"{self._sequence_of(int(np.argmax(tokens < 0)))}); the file is corrupt or "
                "not a token file; re-run data.pretokenize"
            )
        if vocab_size is not None and tokens.size:
            hi = int(tokens.max())
            if hi >= vocab_size:
                seq = self._sequence_of(int(np.argmax(tokens >= vocab_size)))
                raise DataError(
                    f"{self.text.bin_path}: token id {hi} >= vocab size {vocab_size} (first in "
                    f"sequence {seq}); the data was made with another tokenizer or the model's "
                    "vocabulary is too small"
                )

    def _sequence_of(self, element: int) -> int:
        ends = np.cumsum(self.text.sizes, dtype=np.int64)
        return int(np.searchsorted(ends, element, side="right"))

    def check_tokenizer(self, fingerprint: str, extra_ids: list[str] | None = None) -> None:
        """Refuse data made with another tokenizer (skipped when the data has no meta file).
        `extra_ids`: the run's --vocab_extra_ids_list, to say when they are the difference."""
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            hint = "re-run data.pretokenize with the model's tokenizer"
            if extra_ids is not None and self.extra_ids is not None and extra_ids != self.extra_ids:
                # The usual case: the pretokenizer adds <|im_start|>,<|im_end|> by default, while
                # --vocab_extra_ids_list (Megatron-LLM's flag) defaults to none.
                hint = (
                    f"the data's extra ids are {','.join(self.extra_ids) or 'none'}, this run's "
                    f"--vocab_extra_ids_list gives {','.join(extra_ids) or 'none'}: pass "
                    f'--vocab_extra_ids_list "{",".join(self.extra_ids)}", or {hint}'
                )
            raise DataError(
                f"{self.meta_path}: made with tokenizer {self.fingerprint[:12]}..., not "
                f"{fingerprint[:12]}... (model file or extra ids differ); {hint}"
            )

    @property
    def sizes(self) -> np.ndarray:
        return self.text.sizes

    def __len__(self) -> int:
        return len(self.text)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, roles) of sample i, memory-mapped views."""
        return self.text[i], self.role[i]


def _first_mismatch(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class LoaderConfig:
    """How rows and micro-batches are made."""

    seq_length: int  # tokens per row (the model's sequence length)
    micro_batch_size: int  # rows per micro-batch
    global_batch_size: int  # samples (or rows, see batch_unit) per optimizer step, all DP ranks
    dp_rank: int = 0  # this rank's index among the data-parallel ranks
    dp_size: int = 1  # number of data-parallel ranks
    packing: bool = True  # whole samples packed per row (else one sample per row, padded)
    variable_seq_lengths: bool = (
        False  # padding mode: pad to the micro-batch's longest, rounded to 16
    )
    seed: int = 1234  # seeds the per-epoch sample order
    shuffle: bool = True  # a seeded permutation per epoch (else dataset order)
    drop_last: bool = False  # skip an epoch's last rows that do not fill a global batch
    pad_id: int | None = None  # padding token; None: the dataset's pad id, else 0
    # "rows": a global batch is global_batch_size rows; "samples": that many samples, packed per
    # step and DP rank into as many rows as they need (the module docstring)
    batch_unit: str = "rows"

    @property
    def by_samples(self) -> bool:
        """Global batches of samples packed per step (the same as rows without packing)."""
        return self.batch_unit == "samples" and self.packing

    def validate(self) -> None:
        problems = []
        if self.seq_length < 2:
            problems.append(f"seq_length={self.seq_length} must be at least 2")
        if self.batch_unit not in ("rows", "samples"):
            problems.append(f"batch_unit {self.batch_unit!r} must be 'rows' or 'samples'")
        if self.micro_batch_size < 1 or self.dp_size < 1:
            problems.append("micro_batch_size and dp_size must be positive")
        elif self.by_samples:
            if self.global_batch_size % self.dp_size:
                problems.append(
                    f"global_batch_size {self.global_batch_size} samples must be a multiple of "
                    f"dp_size {self.dp_size}"
                )
        elif self.global_batch_size % (self.micro_batch_size * self.dp_size):
            problems.append(
                f"global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size x dp_size = {self.micro_batch_size} x {self.dp_size}"
            )
        if self.global_batch_size < 1:
            problems.append("global_batch_size must be positive")
        if not 0 <= self.dp_rank < max(1, self.dp_size):
            problems.append(f"dp_rank {self.dp_rank} is outside [0, {self.dp_size})")
        if self.packing and self.variable_seq_lengths:
            problems.append("variable_seq_lengths applies to padding mode only (packing=False)")
        if problems:
            raise ValueError("invalid loader configuration: " + "; ".join(problems))


def pack_rows(
    order: np.ndarray, lengths: np.ndarray, seq_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pack samples, in `order`, into rows of `seq_length` tokens.

    First fit among the last `_OPEN_ROWS` open rows (a new row when none has room, the oldest
    emitted when too many are open), so rows follow the sample order closely while wasting little
    (next-fit alone loses about half a sample per row). Samples longer than a row get a row of
    their own (truncated later). Returns (samples, offsets): row k holds
    samples[offsets[k]:offsets[k + 1]].
    """
    capped = np.minimum(lengths[order], seq_length).tolist()
    order_list = order.tolist()
    rows: list[list[int]] = []
    open_rows: list[list[int]] = []  # each: [room, sample, sample, ...]
    for idx, n in zip(order_list, capped):
        k = next((k for k, row in enumerate(open_rows) if row[0] >= n), -1)
        if k < 0:
            if len(open_rows) == _OPEN_ROWS:
                rows.append(open_rows.pop(0))
            open_rows.append([seq_length, idx])
            k = len(open_rows) - 1
        else:
            open_rows[k].append(idx)
        open_rows[k][0] -= n
        if open_rows[k][0] == 0:  # full: emit now rather than when it is the oldest
            rows.append(open_rows.pop(k))
    rows += open_rows
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) - 1 for r in rows])
    samples = np.fromiter((i for r in rows for i in r[1:]), dtype=np.int64, count=int(offsets[-1]))
    return samples, offsets


class _Rows:
    """Row k of one epoch -> its sample indices."""

    def __init__(self, samples: np.ndarray, offsets: np.ndarray):
        self.samples = samples
        self.offsets = offsets

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, k: int) -> np.ndarray:
        return self.samples[self.offsets[k] : self.offsets[k + 1]]


def _plan_rows(ds: SFTDataset, order: np.ndarray, cfg: LoaderConfig) -> _Rows:
    if cfg.packing:
        return _Rows(*pack_rows(order, ds.sizes, cfg.seq_length))
    return _Rows(order.astype(np.int64), np.arange(order.size + 1, dtype=np.int64))


def build_micro_batch(
    ds: SFTDataset, rows: list[np.ndarray], cfg: LoaderConfig, batch_size: int | None = None
) -> dict:
    """One micro-batch from rows of sample indices (empty rows are all padding, mask 0)."""
    pad = _pad_id(ds, cfg)
    b_size = batch_size or len(rows)
    S = cfg.seq_length
    if not cfg.packing and cfg.variable_seq_lengths:
        longest = max((min(int(ds.sizes[r[0]]), S) for r in rows if len(r)), default=1)
        # At least one block: a micro-batch of empty samples must not become (B, 0).
        S = min(S, _ROUND * max(1, math.ceil(longest / _ROUND)))
    tokens = np.full((b_size, S), pad, dtype=np.int64)
    labels = np.full((b_size, S), pad, dtype=np.int64)
    mask = np.zeros((b_size, S), dtype=np.float32)
    pos = np.zeros((b_size, S), dtype=np.int64)
    cu = [0]
    truncated = 0
    for b in range(b_size):
        row = rows[b] if b < len(rows) else ()
        off = 0
        for i in row:
            t, r = ds.sample(int(i))
            n = min(t.size, S - off)
            if t.size > n:
                truncated += 1
                lab, lab_roles = t[1 : n + 1], r[1 : n + 1]  # the true next token exists
            else:
                lab, lab_roles = t[1:n], r[1:n]  # the document's last token has no label
            tokens[b, off : off + n] = t[:n]
            labels[b, off : off + lab.size] = lab
            mask[b, off : off + lab.size] = lab_roles == Role.ASSISTANT
            pos[b, off : off + n] = np.arange(n)
            off += n
            if cfg.packing and n:  # an empty document is no segment (cu_seqlens increase)
                cu.append(b * S + off)
        if off < S:
            pos[b, off:] = np.arange(S - off) if cfg.packing else np.arange(off, S)
        if not cfg.packing or off < S:
            cu.append((b + 1) * S)
    cu_seqlens = np.array(cu, dtype=np.int32)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(pos),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(np.diff(cu_seqlens).max()) if cu_seqlens.size > 1 else 0,
        "num_truncated": truncated,
        # Rows that hold samples: evaluation pads ranks with all-padding rows (see
        # iter_eval_batches), which per-row metrics must not count.
        "num_rows": sum(1 for r in rows if len(r)),
        "num_samples": sum(len(r) for r in rows),  # packed rows hold several
    }


def _pad_id(ds: SFTDataset, cfg: LoaderConfig) -> int:
    if cfg.pad_id is not None:
        return int(cfg.pad_id)
    return int(ds.pad_id) if ds.pad_id is not None else 0


class BatchLoader:
    """Deterministic, epoch-aware, resumable stream of global batches for one DP rank.

    `indices`: the samples to use (default: all), e.g. one dataset's range.
    """

    def __init__(self, dataset: SFTDataset, cfg: LoaderConfig, indices: np.ndarray | None = None):
        cfg.validate()
        self.ds = dataset
        self.cfg = cfg
        self.indices = (
            np.arange(len(dataset), dtype=np.int64)
            if indices is None
            else np.asarray(indices, np.int64)
        )
        if self.indices.size == 0:
            raise DataError(f"{dataset.prefix}: no samples to train on")
        if self.indices.min() < 0 or self.indices.max() >= len(dataset):
            raise ValueError(f"indices must be in [0, {len(dataset)})")
        self._epoch = 0
        self._row = 0  # next row (by_samples: next sample) of the current epoch
        self.consumed_rows = 0  # rows (by_samples: samples) consumed
        self.consumed_documents = 0
        self._plans: dict[int, _Rows] = {}
        self._order_cache: tuple[int, np.ndarray] = (-1, self.indices)

    # -- the row stream -------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if not self.cfg.shuffle:
            return self.indices
        if self._order_cache[0] != epoch:  # by_samples reads it every step
            rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, epoch]))
            self._order_cache = (epoch, self.indices[rng.permutation(self.indices.size)])
        return self._order_cache[1]

    def _plan(self, epoch: int) -> _Rows:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = _plan_rows(self.ds, self._order(epoch), self.cfg)
        return self._plans[epoch]

    @property
    def epoch(self) -> int:
        """Epoch of the next row."""
        return self._epoch

    @property
    def rows_per_epoch(self) -> int:
        """Rows of the current epoch (with packing it can differ slightly between epochs);
        by_samples: the samples of an epoch."""
        if self.cfg.by_samples:
            return int(self.indices.size)
        return len(self._plan(self._epoch))

    @property
    def consumed_samples(self) -> int:
        """Megatron's consumed_samples: samples (batch_unit "samples"), else rows of
        seq_length, consumed so far."""
        return self.consumed_rows

    def _take_samples(self, count: int) -> np.ndarray:
        """The next `count` samples of the stream (by_samples): the epochs' orders one after
        another; with drop_last an epoch's tail shorter than a global batch is skipped."""
        G = self.cfg.global_batch_size
        if self.cfg.drop_last and self.indices.size < G:
            raise DataError(
                f"{self.ds.prefix}: an epoch has {self.indices.size} samples, fewer than "
                f"global_batch_size {G}; with drop_last no global batch could ever be filled"
            )
        parts: list[np.ndarray] = []
        got = 0
        while got < count:
            left = self.indices.size - self._row
            if left <= 0 or (self.cfg.drop_last and got == 0 and left < G):
                self._epoch += 1
                self._row = 0
                continue
            take = min(left, count - got)
            parts.append(self._order(self._epoch)[self._row : self._row + take])
            self._row += take
            got += take
        return np.concatenate(parts)

    def _take_rows(self, count: int) -> list[np.ndarray]:
        G = self.cfg.global_batch_size
        out: list[np.ndarray] = []
        while len(out) < count:
            plan = self._plan(self._epoch)
            if self.cfg.drop_last and len(plan) < G:
                raise DataError(
                    f"{self.ds.prefix}: an epoch has {len(plan)} rows, fewer than "
                    f"global_batch_size {G}; with drop_last no global batch could ever be filled"
                )
            left = len(plan) - self._row
            if left <= 0 or (self.cfg.drop_last and len(out) == 0 and left < G):
                self._epoch += 1
                self._row = 0
                continue
            take = min(left, count - len(out))
            out += [plan[self._row + k] for k in range(take)]
            self._row += take
        return out

    def next_global_batch(self) -> list[dict]:
        """This DP rank's micro-batches for the next optimizer step (by_samples: as many as its
        share of the samples fills, every one micro_batch_size rows)."""
        cfg = self.cfg
        mbs = cfg.micro_batch_size
        if cfg.by_samples:
            samples = self._take_samples(cfg.global_batch_size)
            self.consumed_rows += samples.size
            self.consumed_documents += samples.size
            per_rank = cfg.global_batch_size // cfg.dp_size
            mine = samples[cfg.dp_rank * per_rank : (cfg.dp_rank + 1) * per_rank]
            rows = _Rows(*pack_rows(mine, self.ds.sizes, cfg.seq_length))
            return [
                build_micro_batch(
                    self.ds,
                    [rows[j] for j in range(k, min(k + mbs, len(rows)))],
                    cfg,
                    batch_size=mbs,
                )  # fmt: skip
                for k in range(0, len(rows), mbs)
            ]
        rows = self._take_rows(cfg.global_batch_size)
        self.consumed_rows += len(rows)
        self.consumed_documents += sum(len(r) for r in rows)
        per_rank = cfg.global_batch_size // cfg.dp_size
        mine = rows[cfg.dp_rank * per_rank : (cfg.dp_rank + 1) * per_rank]
        return [build_micro_batch(self.ds, mine[k : k + mbs], cfg) for k in range(0, per_rank, mbs)]

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_global_batch()

    # -- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable position in the row stream (independent of the DP layout)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "row_in_epoch": self._row,
            "consumed_samples": self.consumed_rows,
            "consumed_documents": self.consumed_documents,
            "num_samples": int(self.indices.size),
            "seed": self.cfg.seed,
            "seq_length": self.cfg.seq_length,
            "packing": self.cfg.packing,
            "shuffle": self.cfg.shuffle,
            "drop_last": self.cfg.drop_last,
            "batch_unit": "samples" if self.cfg.by_samples else "rows",
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(
                f"data loader state version {state.get('version')!r}; expected {_STATE_VERSION}"
            )
        ours = self.state_dict()
        state = {"batch_unit": "rows", **state}  # states saved before batch_unit count rows
        # These define the row stream: a change would silently show other batches.
        keys = ("num_samples", "seed", "seq_length", "packing", "shuffle", "drop_last",
                "batch_unit")  # fmt: skip
        for key in keys:
            if state.get(key) != ours[key]:
                hint = (
                    f" (--global_batch_unit {state.get(key)} resumes it)"
                    if key == "batch_unit"
                    else ""
                )
                raise DataError(
                    f"cannot resume the data loader: {key} was {state.get(key)!r} when the state "
                    f"was saved and is {ours[key]!r} now (the batches would differ){hint}"
                )
        position = ("epoch", "row_in_epoch", "consumed_samples", "consumed_documents")
        bad = [
            k
            for k in position
            if not (isinstance(state.get(k), (int, np.integer)) and not isinstance(state[k], bool))
            or state[k] < 0
        ]
        if bad:
            # A damaged checkpoint would otherwise end in a bare KeyError/TypeError.
            raise DataError(
                f"cannot resume the data loader: its state lacks valid {', '.join(bad)} "
                f"(non-negative integers; found {[state.get(k) for k in bad]!r}); the "
                "checkpoint's loader state is damaged, resume from another checkpoint"
            )
        self._epoch = int(state["epoch"])
        self._row = int(state["row_in_epoch"])
        self.consumed_rows = int(state["consumed_samples"])
        self.consumed_documents = int(state["consumed_documents"])


def iter_eval_batches(
    dataset: SFTDataset, cfg: LoaderConfig, indices: np.ndarray | None = None
) -> Iterator[dict]:
    """One pass over the samples in dataset order, in micro-batches of this DP rank.

    Micro-batch j goes to rank j % dp_size. Every rank yields the same number of micro-batches,
    each of micro_batch_size rows: the missing ones are padding with loss_mask 0, so ranks that
    reduce after every micro-batch stay in step.
    """
    cfg.validate()
    order = (
        np.arange(len(dataset), dtype=np.int64)
        if indices is None
        else np.asarray(indices, np.int64)
    )
    rows = _plan_rows(dataset, order, cfg)
    mbs = cfg.micro_batch_size
    n_micro = math.ceil(len(rows) / mbs)
    per_rank = math.ceil(n_micro / cfg.dp_size)
    for k in range(per_rank):
        j = k * cfg.dp_size + cfg.dp_rank
        chunk = [rows[r] for r in range(j * mbs, min((j + 1) * mbs, len(rows)))]
        yield build_micro_batch(dataset, chunk, cfg, batch_size=mbs)
