"""The tensors of a checkpoint: the layout metadata each one carries, and reading any slice of
any global tensor back from whatever shard set is on disk. train/checkpoint.py owns the rest: the
directory layout, writing the files (flushed, under a temporary directory renamed into place),
the latest file, retention and the public save/load entry points.

No pickles anywhere. Every tensor in a safetensors file carries its layout in the file's
`__metadata__["tensors"]` (a JSON map, key -> {name, global_shape, tp_dim, pieces}): `tp_dim` is
the sharded dimension (None: a full copy) and `pieces` the (global_start, length) ranges along it
that this shard holds, in local order (fused QKV / gate-up shards hold several). `ShardIndex.read`
assembles any slice of any global tensor from whatever shard set is on disk, reading lazily,
which is what loading at another tensor/pipeline layout needs.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

MODEL_FILE = "model.safetensors"
# What the trainer saves (fp32 or bf16 weights, fp32 optimizer state) and the export reads. An
# integer tensor under a weight's name (a file swapped in from another tool) would be cast to
# float by the loaders without a word.
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")
VOCAB_PARAMS = ("embed.weight", "output.weight")  # rows = padded vocabulary
OPTIM_KINDS = ("master", "exp_avg", "exp_avg_sq")


# Defined here, not in checkpoint.py, so that this module (which raises it) imports nothing from
# there: checkpoint.py imports it back, and `ckpt.CheckpointError` is this same class.
class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message saying why and what to do."""


def another_iteration(iter_dir: str | os.PathLike) -> str:
    """What to do about a damaged iteration directory, made concrete: the newest other complete
    iteration (one with a meta.json) saved beside it, preferring one below it (the run's previous
    checkpoint, which a resume from it saves over the damaged one)."""
    iter_dir = Path(iter_dir)

    def number(d: Path) -> int:
        try:
            return int(d.name.removeprefix("iter_"))
        except ValueError:
            return -1

    others = sorted(
        (p.parent for p in iter_dir.parent.glob("iter_*/meta.json") if p.parent != iter_dir),
        key=number,
    )
    if not others:
        return (
            f"no other complete iteration is saved in {iter_dir.parent}: copy this one again "
            "from where it was saved"
        )
    below = [d for d in others if number(d) < number(iter_dir)]
    pick = (below or others)[-1]
    return f"load another iteration instead, e.g. the newest other complete one: {pick}"


# ----------------------------------------------------------------------------------------------
# per-tensor layout


def tensor_layout(name: str, t: torch.Tensor) -> dict:
    """Layout metadata of a (possibly TP-sharded) parameter from the attributes the parallel
    layers set: tp_dim (int or None), tp_pieces [(global_start, length), ...], global_shape.
    A tensor without them is a full, unsharded copy."""
    tp_dim = getattr(t, "tp_dim", None)
    global_shape = list(getattr(t, "global_shape", None) or t.shape)
    pieces = getattr(t, "tp_pieces", None)
    if tp_dim is not None and pieces is None:
        raise CheckpointError(f"parameter {name} has tp_dim={tp_dim} but no tp_pieces")
    if tp_dim is not None:
        pieces = [[int(s), int(n)] for s, n in pieces]
        if sum(n for _, n in pieces) != t.shape[tp_dim]:
            raise CheckpointError(
                f"parameter {name}: tp_pieces {pieces} do not add up to the local shape"
            )
    return {"name": name, "global_shape": global_shape, "tp_dim": tp_dim, "pieces": pieces}


class _Entry:
    """One stored tensor: file, key and layout."""

    def __init__(self, file: Path, key: str, layout: dict):
        self.file, self.key = file, key
        self.tp_dim = layout["tp_dim"]
        self.pieces = layout["pieces"]
        self.global_shape = tuple(layout["global_shape"])


class ShardIndex:
    """Every tensor stored in one iteration directory, by (kind, global name).

    kind is "model" (model.safetensors) or one of "master", "exp_avg", "exp_avg_sq" (the
    optimizer files, keys "{kind}/{name}"). Only headers are read here; tensors are read lazily.
    optimizer=False indexes the model files alone: a consumer of the weights (--finetune,
    --no_load_optim, export, sampling) then does not fail on a damaged optimizer file it would
    never read.
    """

    def __init__(self, iter_dir: str | os.PathLike, optimizer: bool = True):
        self.dir = Path(iter_dir)
        self.entries: dict[tuple[str, str], list[_Entry]] = {}
        shard_dirs = sorted(p for p in self.dir.glob("mp_rank_*") if p.is_dir())
        if not shard_dirs:
            raise CheckpointError(f"{self.dir} has no mp_rank_* shard directories")
        for sd in shard_dirs:
            # Every (tp, pp) shard directory gets its model file from dp rank 0.
            if not (sd / MODEL_FILE).is_file():
                raise CheckpointError(
                    f"{sd / MODEL_FILE} is missing: the checkpoint is incomplete; "
                    f"{another_iteration(self.dir)}"
                )
            self._add(sd / MODEL_FILE, "model")
            # Optimizer state replicated over DP is stored once (dp 0); a sharded optimizer would
            # write one file per dp rank, each holding its own pieces.
            if optimizer:
                for f in sorted(sd.glob("optim_dp*.safetensors")):
                    self._add(f, None)

    def _add(self, file: Path, kind: str | None) -> None:
        if not file.is_file():
            return
        try:
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                layouts = json.loads(meta.get("tensors", "{}"))
                keys = list(f.keys())
                # get_dtype arrived in safetensors 0.4; without it the check is skipped
                dtypes = {k: getattr(f.get_slice(k), "get_dtype", lambda: "F32")() for k in keys}
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            # safetensors' own message names no file. Only a resume indexes the optimizer
            # files, and it can go on without them.
            optim = "" if kind else "resume with --no_load_optim (these weights, fresh Adam "
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({e}); it is truncated or corrupt: "
                f"{optim and optim + 'moments), or '}{another_iteration(self.dir)}"
            ) from None
        for key in keys:
            if dtypes[key] not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{file}: tensor {key} is {dtypes[key]}, expected a floating-point dtype "
                    f"({', '.join(FLOAT_DTYPES)}): the file was not written by this trainer; "
                    f"{another_iteration(self.dir)}"
                )
            if key not in layouts:
                raise CheckpointError(f"{file}: tensor {key} has no layout metadata")
            k, name = (kind, key) if kind else key.split("/", 1)
            self.entries.setdefault((k, name), []).append(_Entry(file, key, layouts[key]))

    def names(self, kind: str = "model") -> list[str]:
        return [n for k, n in self.entries if k == kind]

    def has(self, name: str, kind: str = "model") -> bool:
        return (kind, name) in self.entries

    def global_shape(self, name: str, kind: str = "model") -> tuple[int, ...]:
        return self._entries(name, kind)[0].global_shape

    def _entries(self, name: str, kind: str) -> list[_Entry]:
        if (kind, name) not in self.entries:
            raise CheckpointError(f"{self.dir}: no {kind} tensor named {name}")
        return self.entries[(kind, name)]

    def read(
        self,
        name: str,
        kind: str = "model",
        dim: int | None = None,
        pieces: Iterable[tuple[int, int]] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The slice of global tensor `name` made of `pieces` [(global_start, length), ...] along
        `dim`, concatenated in that order (the whole tensor when dim is None), from any shard set.
        """
        entries = self._entries(name, kind)
        shape = list(entries[0].global_shape)
        want = [(0, shape[0])] if dim is None else [(int(s), int(n)) for s, n in pieces]
        dim_w = 0 if dim is None else dim
        out_shape = list(shape)
        out_shape[dim_w] = sum(n for _, n in want)
        full = [e for e in entries if e.tp_dim is None]
        sources = full[:1] if full else entries  # one full copy suffices; shards are disjoint
        out = None
        covered = 0
        for e in sources:
            with safe_open(str(e.file), "pt") as f:
                sl = f.get_slice(e.key)
                stored = [(0, shape[0])] if e.tp_dim is None else e.pieces
                dim_s = 0 if e.tp_dim is None else e.tp_dim
                local_s = 0
                for s_start, s_len in stored:
                    out_off = 0
                    for w_start, w_len in want:
                        box = _intersect(shape, dim_s, s_start, s_len, dim_w, w_start, w_len)
                        if box is not None:
                            src = [slice(lo, hi) for lo, hi in box]
                            dst = [slice(lo, hi) for lo, hi in box]
                            src[dim_s] = slice(
                                box[dim_s][0] - s_start + local_s, box[dim_s][1] - s_start + local_s
                            )
                            dst[dim_w] = slice(
                                box[dim_w][0] - w_start + out_off, box[dim_w][1] - w_start + out_off
                            )
                            part = sl[tuple(src)]
                            if out is None:
                                out = torch.empty(out_shape, dtype=dtype or part.dtype)
                            out[tuple(dst)] = part.to(out.dtype)
                            covered += part.numel()
                        out_off += w_len
                    local_s += s_len
        expected = 1
        for d in out_shape:
            expected *= d
        if out is None or covered != expected:
            raise CheckpointError(
                f"{self.dir}: the stored shards of {kind} tensor {name} cover {covered} of the "
                f"{expected} asked for (dim {dim}, pieces {want}): the shard set is incomplete"
            )
        return out


def _intersect(shape, dim_a, a_start, a_len, dim_b, b_start, b_len):
    """Per-dimension [lo, hi) of the intersection of two slabs of a tensor of `shape` (each full
    except along its own dimension), or None when empty."""
    box = [[0, n] for n in shape]
    for d, s, n in ((dim_a, a_start, a_len), (dim_b, b_start, b_len)):
        box[d] = [max(box[d][0], s), min(box[d][1], s + n)]
        if box[d][0] >= box[d][1]:
            return None
    return box


# ----------------------------------------------------------------------------------------------
# vocabulary padding


def pad_vocab_rows(t: torch.Tensor, rows: int, zeros: bool = False) -> torch.Tensor:
    """Pad (or trim) the rows of an embedding/output matrix to `rows`; new rows copy row 0 (the
    unk token), the convention of the released checkpoint, so padded logits stay unremarkable;
    zeros=True pads with zeros instead (Adam moments: a padding row never gets a gradient)."""
    if t.shape[0] >= rows:
        return t[:rows]
    if zeros:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)
    extra = t[:1].expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


def read_param(
    index: ShardIndex,
    name: str,
    meta: dict,
    padded_vocab: int,
    kind: str = "model",
    dim: int | None = None,
    pieces: Iterable[tuple[int, int]] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Read a parameter slice for a model whose vocabulary is padded to `padded_vocab` rows.
    Vocabulary matrices saved with another padding are trimmed to the real vocabulary and padded
    again (row 0 copies for weights, zeros for Adam moments), then sliced; only the real rows
    are read."""
    if name in VOCAB_PARAMS and index.global_shape(name, kind)[0] != padded_vocab:
        vocab = int(meta["vocab_size"])
        full = index.read(name, kind, dim=0, pieces=[(0, vocab)], dtype=dtype)
        full = pad_vocab_rows(full, padded_vocab, zeros=kind in ("exp_avg", "exp_avg_sq"))
        if dim is None:
            return full
        return torch.cat([full.narrow(dim, s, n) for s, n in pieces], dim=dim)
    return index.read(name, kind, dim=dim, pieces=pieces, dtype=dtype)
