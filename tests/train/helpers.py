"""Synthetic batches in the data loader's exact micro-batch format, and a tiny run config."""

import json

import numpy as np
import torch

from data.indexed import write_indexed
from data.loader import SFTDataset
from parallel.dims import ParallelDims
from train.args import parse_args
from train.data import TokenizerInfo
from train.resolve import resolve

VOCAB = 97


def make_doc(g: torch.Generator, length: int) -> torch.Tensor:
    """A learnable document: an arithmetic progression mod VOCAB (start and stride random)."""
    start = int(torch.randint(0, VOCAB, (1,), generator=g))
    stride = int(torch.randint(1, 5, (1,), generator=g))
    return (start + stride * torch.arange(length)) % VOCAB


def pack_micro_batch(docs: list[torch.Tensor], rows: int, seq: int) -> dict:
    """Pack documents (token tensors) greedily into `rows` rows of `seq`; the last row is padded
    with a pad document. Labels are the next token inside each document; the second half of each
    document (the 'assistant reply') carries the loss."""
    tokens = torch.zeros(rows, seq, dtype=torch.int64)
    labels = torch.zeros(rows, seq, dtype=torch.int64)
    mask = torch.zeros(rows, seq, dtype=torch.float32)
    pos = torch.zeros(rows, seq, dtype=torch.int64)
    cu = [0]
    r, c = 0, 0
    for d in docs:
        n = min(len(d), seq)
        if c + n > seq:
            if c < seq:  # pad the rest of the row as its own document
                cu.append(r * seq + seq)
            r, c = r + 1, 0
        if r == rows:
            break
        tokens[r, c : c + n] = d[:n]
        labels[r, c : c + n - 1] = d[1:n]
        mask[r, c + n // 2 : c + n - 1] = 1.0
        pos[r, c : c + n] = torch.arange(n)
        c += n
        cu.append(r * seq + c)
    if r < rows:
        if c < seq:
            cu.append(r * seq + seq)
        r += 1
    while r < rows:
        cu.append(r * seq + seq)
        r += 1
    cu_t = torch.tensor(cu, dtype=torch.int32)
    max_len = int((cu_t[1:] - cu_t[:-1]).max())
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": pos,
            "cu_seqlens": cu_t, "max_seqlen": max_len, "num_truncated": 0}  # fmt: skip


class SyntheticLoader:
    """`data.loader.BatchLoader`'s interface over generated documents; deterministic and
    resumable (the state is the number of global batches drawn)."""

    def __init__(self, micro: int, seq: int, num_micro: int, seed: int = 0):
        self.micro, self.seq, self.num_micro, self.seed = micro, seq, num_micro, seed
        self.step = 0

    def next_global_batch(self) -> list[dict]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.step)
        self.step += 1
        out = []
        for _ in range(self.num_micro):
            docs = [make_doc(g, int(torch.randint(8, self.seq, (1,), generator=g)))
                    for _ in range(3 * self.micro)]  # fmt: skip
            out.append(pack_micro_batch(docs, self.micro, self.seq))
        return out

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


TINY_ARGS = [
    "--num_layers", "2", "--hidden_size", "64", "--ffn_hidden_size", "160",
    "--num_attention_heads", "4", "--num_attention_heads_kv", "2",
    "--max_position_embeddings", "256", "--make_vocab_size_divisible_by", "16",
    "--seq_length", "64", "--micro_batch_size", "2", "--global_batch_size", "4",
    "--train_iters", "20", "--lr", "3e-3", "--min_lr", "3e-4", "--lr_decay_style", "cosine",
    "--lr_warmup_iters", "2", "--adam_beta2", "0.95", "--weight_decay", "0.01",
    "--hidden_dropout", "0.0", "--data_path", "synthetic-train", "--log_interval", "1",
    "--eval_interval", "1000", "--eval_iters", "0", "--no-activation_memory_report",
]  # fmt: skip


def tiny_run(extra: list[str] = (), tmp_path=None):
    """(RunConfig, dims, TokenizerInfo) for a 2-layer GQA model over the synthetic vocabulary."""
    argv = list(TINY_ARGS) + list(extra)
    if tmp_path is not None:
        argv += ["--save", str(tmp_path / "ckpt")]
    ns, given = parse_args(argv)
    rc = resolve(ns, given, world_size=1)
    rc.model = rc.model.replace(vocab_size=VOCAB)
    tok = TokenizerInfo(VOCAB, "synthetic", None, None, None, [])
    return rc, ParallelDims(tp=1, pp=1, dp=1, rank=0), tok


def write_split(tmp_path, name: str, lengths: list[int], ranges: dict) -> SFTDataset:
    """A pretokenized split `{tmp_path}/{name}` of `lengths` samples (assistant role throughout,
    vocabulary 100) whose meta lists `ranges` (dataset name -> [start, end) of its samples)."""
    texts = [(np.arange(n, dtype=np.uint16) % 90) + 5 for n in lengths]
    roles = [np.full(n, 2, dtype=np.uint16) for n in lengths]
    write_indexed(f"{tmp_path}/{name}-text", texts, np.uint16)
    write_indexed(f"{tmp_path}/{name}-role", roles, np.uint16)
    meta = {"tokenizer": {"vocab_size": 100, "pad_id": 0}, "dataset_ranges": ranges}
    (tmp_path / f"{name}-meta.json").write_text(json.dumps(meta))
    return SFTDataset(f"{tmp_path}/{name}")


def fs_events(monkeypatch) -> list[tuple[str, str, str]]:
    """Record the checkpoint writer's fsyncs and renames, in order: ("fsync", path, "") and
    ("replace", src, dst), both still done."""
    import os

    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
