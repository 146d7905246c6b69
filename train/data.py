"""The trainer's side of the data pipeline: open the pretokenized splits, check them against the
tokenizer, and build one loader per split (and per dataset of the validation split)."""

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from train.config import DataConfig


@dataclass
class TokenizerInfo:
    """What the trainer needs from the tokenizer: checked against data and checkpoints."""

    vocab_size: int
    fingerprint: str | None
    im_start: int | None
    im_end: int | None
    vocab_file: str | None
    extra_ids: list[str]

    def to_dict(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            "vocab_file": self.vocab_file,
            "extra_ids": self.extra_ids,
        }


def _check_prefix(prefix: str, flag: str) -> None:
    missing = [prefix + s for s in ("-text.idx", "-text.bin", "-role.idx", "-role.bin")
               if not Path(prefix + s).is_file()]  # fmt: skip
    if missing and Path(prefix).is_dir():  # a directory instead of a prefix inside it
        found = sorted(str(p)[: -len("-text.idx")] for p in Path(prefix).glob("*-train-text.idx"))
        raise DataError(
            f"{flag} {prefix} is a directory; it takes a file prefix ({{PREFIX}}-text.idx etc.)"
            + (f", e.g. {found[0]}" if found else "; none is in that directory")
        )
    if missing:
        raise DataError(
            f"{flag} {prefix}: {', '.join(missing)} not found; pretokenize first "
            "(`make data` for the sample mix, or python -m data.pretokenize CONFIG.yaml)"
        )


def open_datasets(cfg: DataConfig):
    """(train dataset, validation dataset or None, TokenizerInfo). With --vocab_file the data
    must have been made by that tokenizer (same model file and extra ids)."""
    from data.loader import SFTDataset
    from data.tokenizer import Tokenizer, parse_extra_ids

    _check_prefix(cfg.train_prefix, "--data_path")
    extra = parse_extra_ids(cfg.vocab_extra_ids)
    tok = None
    if cfg.vocab_file is not None:
        if not Path(cfg.vocab_file).is_file():
            raise DataError(f"--vocab_file {cfg.vocab_file} does not exist")
        tok = Tokenizer(cfg.vocab_file, extra)

    def open_split(prefix: str) -> SFTDataset:
        if tok is not None:
            # The tokenizer first: data made with other extra ids also fails the token-id range
            # check, whose message cannot say that the tokenizer differs.
            SFTDataset(prefix, validate=False).check_tokenizer(tok.fingerprint, extra)
        return SFTDataset(prefix, vocab_size=tok.vocab_size if tok else None)

    train = open_split(cfg.train_prefix)
    if len(train) == 0:
        # Here, before the model is built: the loader would fail only after the checkpoint load.
        raise DataError(
            f"--data_path {cfg.train_prefix} holds no samples: the pretokenizer skipped or "
            f"dropped every record (see its warnings and {cfg.train_prefix}_stats.txt); fix the "
            "data or the mix and pretokenize again"
        )
    valid = None
    if cfg.valid_prefix is not None and Path(cfg.valid_prefix + "-text.idx").is_file():
        valid = open_split(cfg.valid_prefix)
    if tok is not None:
        chatml = [tok.special_tokens.get(t) for t in ("<|im_start|>", "<|im_end|>")]
        info = TokenizerInfo(tok.vocab_size, tok.fingerprint, *chatml, cfg.vocab_file, extra)
    else:
        if train.vocab_size is None:
            raise DataError(
                f"{cfg.train_prefix}: the data has no -meta.json naming its tokenizer; pass "
                "--vocab_file (and --vocab_extra_ids_list) so the vocabulary is known"
            )
        info = TokenizerInfo(train.vocab_size, train.fingerprint, None, None, None, extra)
    return train, valid, info


def loader_config(cfg: DataConfig, dp_rank: int, dp_size: int):
    from data.loader import LoaderConfig

    return LoaderConfig(
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        packing=cfg.packing,
        variable_seq_lengths=cfg.variable_seq_lengths,
        seed=cfg.seed,
        batch_unit=cfg.batch_unit,
    )


def make_loader(dataset, cfg: DataConfig, dp_rank: int, dp_size: int):
    """The training stream of global batches (epoch-aware, resumable)."""
    from data.loader import BatchLoader

    return BatchLoader(dataset, loader_config(cfg, dp_rank, dp_size))


def eval_batches(dataset, cfg: DataConfig, dp_rank: int, dp_size: int, indices, iters: int):
    """The first `iters` global batches' worth of validation micro-batches of this DP rank, in
    dataset order: every evaluation sees the same batches, so the curve compares like with like
    (Megatron instead continues through the split)."""
    from data.loader import iter_eval_batches

    lc = loader_config(cfg, dp_rank, dp_size)
    if lc.by_samples:  # global batches of samples: the first iters x G of them, packed
        order = np.arange(len(dataset), dtype=np.int64) if indices is None else indices
        return iter_eval_batches(dataset, lc, order[: iters * cfg.global_batch_size])
    per_rank = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)
    return itertools.islice(iter_eval_batches(dataset, lc, indices), iters * per_rank)


WHOLE_SPLIT = "all"  # the eval key of the whole validation split


def eval_splits(valid) -> dict[str, np.ndarray | None]:
    """name -> sample indices for per-dataset validation ("all" = the whole split); datasets
    are listed separately only when more than one has samples in the split (else its entry
    would repeat "all"). Empty when the split holds no samples (a mix without val_split still
    writes one): there is nothing to evaluate, and an evaluation of nothing would log loss 0,
    a perfect model.

    A dataset of the mix named "all" would share the whole split's key (its metrics would
    replace the whole split's, in the log, metrics.jsonl and TensorBoard): refused, naming
    the dataset and the meta file it is listed in."""
    if len(valid) == 0:
        return {}
    out: dict[str, np.ndarray | None] = {WHOLE_SPLIT: None}
    ranges = getattr(valid, "dataset_ranges", None) or {}
    held = {name: (a, b) for name, (a, b) in ranges.items() if b > a}
    if len(held) > 1:
        if WHOLE_SPLIT in held:
            where = getattr(valid, "meta_path", None) or "the validation split's -meta.json"
            raise DataError(
                f"{where}: the data mix has a dataset named {WHOLE_SPLIT!r}, the name validation "
                f"uses for the whole split, so its per-dataset metrics and the whole split's "
                f"would be logged under one key; rename that dataset in the data-mix YAML "
                f"(e.g. `- {WHOLE_SPLIT}_data: {{kind: ...}}`) and pretokenize again"
            )
        for name, (start, end) in held.items():
            out[str(name)] = np.arange(start, end, dtype=np.int64)
    return out


def to_device(mb: dict, device) -> dict:
    out = {}
    for k, v in mb.items():
        out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return out
