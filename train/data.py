"""The trainer's side of the data pipeline: open the pretokenized splits, check them against the
tokenizer, and build one loader per split (and per dataset of the validation split)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import DataConfig


class DataError(ValueError):
    """Missing or inconsistent data, with what to do about it."""


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
    if missing:
        raise DataError(
            f"{flag} {prefix}: {', '.join(missing)} not found; pretokenize first "
            "(`make data` for the sample mix, or python -m data.pretokenize CONFIG.yaml)"
        )


def open_datasets(cfg: DataConfig):
    """(train dataset, validation dataset or None, TokenizerInfo); the tokenizer named by
    --vocab_file must be the one the data was made with."""
    from data.loader import SFTDataset
    from data.tokenizer import Tokenizer, parse_extra_ids

    _check_prefix(cfg.train_prefix, "--data_path")
    train = SFTDataset(cfg.train_prefix)
    valid = None
    if cfg.valid_prefix is not None and Path(cfg.valid_prefix + "-text.idx").is_file():
        valid = SFTDataset(cfg.valid_prefix)
    extra = parse_extra_ids(cfg.vocab_extra_ids)
    im_start = im_end = None
    fingerprint = getattr(train, "fingerprint", None)
    if cfg.vocab_file is not None:
        if not Path(cfg.vocab_file).is_file():
            raise DataError(f"--vocab_file {cfg.vocab_file} does not exist")
        tok = Tokenizer(cfg.vocab_file, extra)
        if tok.vocab_size != train.vocab_size or (fingerprint and fingerprint != tok.fingerprint):
            raise DataError(
                f"--data_path {cfg.train_prefix} was tokenized with another tokenizer (vocab "
                f"{train.vocab_size}, fingerprint {fingerprint}) than --vocab_file "
                f"{cfg.vocab_file} "
                f"with extra ids {extra} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint}): "
                "pretokenize again with this tokenizer, or pass the one the data was made with"
            )
        fingerprint = tok.fingerprint
        im_start = tok.special_tokens.get("<|im_start|>")
        im_end = tok.special_tokens.get("<|im_end|>")
    if valid is not None and valid.vocab_size != train.vocab_size:
        raise DataError(
            f"{cfg.valid_prefix}: vocabulary {valid.vocab_size} differs from the train split's"
        )
    info = TokenizerInfo(train.vocab_size, fingerprint, im_start, im_end, cfg.vocab_file, extra)
    return train, valid, info


def make_loader(dataset, cfg: DataConfig, dp_rank: int, dp_size: int, indices=None, seed_offset=0):
    from data.loader import BatchLoader, LoaderConfig

    lcfg = LoaderConfig(
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        packing=cfg.packing,
        variable_seq_lengths=cfg.variable_seq_lengths,
        seed=cfg.seed + seed_offset,
    )
    return BatchLoader(dataset, lcfg, indices=indices)


def eval_splits(valid) -> dict[str, object]:
    """name -> document indices for per-dataset validation ("all" = the whole split)."""
    out = {"all": None}
    ranges = getattr(valid, "dataset_ranges", None) or {}
    items = ranges.items() if isinstance(ranges, dict) else ranges
    for name, r in items:
        start, end = (r.start, r.stop) if isinstance(r, range) else r
        if end > start and len(ranges) > 1:
            out[str(name)] = range(start, end)
    return out


def to_device(mb: dict, device) -> dict:
    out = {}
    for k, v in mb.items():
        out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return out
