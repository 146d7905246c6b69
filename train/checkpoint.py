"""Checkpoints in Megatron's directory layout, with safetensors for tensors and JSON for the rest.

    {save}/latest_checkpointed_iteration.txt      "500", written last (atomically)
    {save}/iter_0000500/meta.json                 iteration, model config, vocab, tokenizer,
                                                  layout, args, consumed samples, scheduler
    {save}/iter_0000500/mp_rank_{tp:02d}_{pp:03d}/
        model.safetensors                         this (tp, pp) rank's parameter shards
        optim_dp{dp:03d}.safetensors              fp32 master weights + Adam moments
        state_dp{dp:03d}.json                     RNG states and the data loader's position

No pickles anywhere: tensors go to safetensors files, everything else to JSON. What a tensor
file holds (each tensor's layout metadata) and how any slice of a global tensor is read back
from any shard set (`ShardIndex`, `read_param`) is train/checkpoint_io.py; this module writes
the files and owns the directory protocol.

A whole checkpoint directory is first written under a temporary name and renamed into place,
and `latest_checkpointed_iteration.txt` is replaced only after that, every file and directory
entry fsynced before the step that relies on it, so a crash (of the process or of the machine)
never leaves a half-written iteration where a resume would find it.
"""

import errno
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from model.config import ModelConfig
from parallel.host_text import agree

# The tensor files' layout and reader (see checkpoint_io's docstring). read_param and
# OPTIM_KINDS are not used here: they are imported so that callers keep finding them as
# `ckpt.read_param` / `ckpt.OPTIM_KINDS`, like the rest of the checkpoint API.
from train.checkpoint_io import (
    MODEL_FILE,
    OPTIM_KINDS,  # noqa: F401  (for callers, see above)
    VOCAB_PARAMS,
    CheckpointError,
    ShardIndex,
    another_iteration,
    pad_vocab_rows,
    read_param,  # noqa: F401  (for callers, see above)
    tensor_layout,
)

FORMAT = "oasst-trainer-checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "meta.json"


# ----------------------------------------------------------------------------------------------
# names and paths


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_dir_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def optim_file_name(dp_rank: int) -> str:
    return f"optim_dp{dp_rank:03d}.safetensors"


def state_file_name(dp_rank: int) -> str:
    return f"state_dp{dp_rank:03d}.json"


def latest_iteration(save_dir: str | os.PathLike) -> int | None:
    """The iteration named by `latest_checkpointed_iteration.txt`, or None when there is none."""
    path = Path(save_dir) / LATEST_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); {_latest_hint(path.parent)}") from None
    try:
        it = int(text)
    except ValueError:
        it = -1
    if text == "release" and (path.parent / "release").is_dir():
        raise CheckpointError(f"{path.parent}: {_MEGATRON_LM}")
    if it < 0:
        raise CheckpointError(
            f"{path}: expected an iteration number (e.g. 500), found {text[:40]!r}; "
            f"{_latest_hint(path.parent)}"
        )
    return it


def _saved_iterations(save_dir: Path) -> list[str]:
    """Names of the complete iteration directories (those with a meta.json) in a save dir."""
    return sorted(p.parent.name for p in save_dir.glob(f"iter_*/{META_FILE}"))


_MEGATRON_LM = (
    "a Megatron-LM checkpoint (torch pickles, mp_rank_*/model_optim_rng.pt), which this trainer "
    "does not read (it loads no pickles): convert it to a Hugging Face directory with "
    "Megatron-LLM's weights_conversion/megatron_to_hf.py, then `python -m model.hf import HF_DIR "
    "OUT_DIR` and --load OUT_DIR --finetune"
)


def _is_megatron_lm(iter_dir: Path) -> bool:
    return any(iter_dir.glob("mp_rank_*/model_optim_rng.pt")) or any(
        iter_dir.glob("mp_rank_*/model_rng.pt")
    )


def _latest_hint(save_dir: Path) -> str:
    found = _saved_iterations(save_dir)
    if not found:
        return "the directory holds no complete iter_XXXXXXX/ checkpoint"
    return (
        f"complete iterations here: {', '.join(found[-5:])}; write one's number into {LATEST_FILE} "
        f"or pass that directory to --load"
    )


def resolve_iteration_dir(path: str | os.PathLike) -> Path:
    """A save directory (follows latest_checkpointed_iteration.txt) or an iter_XXXXXXX directory."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint path {path} is a file; expected a save directory (with {LATEST_FILE}) "
            "or an iteration directory (iter_XXXXXXX/ with meta.json)"
        )
    it = latest_iteration(path)
    if it is None:
        if _is_megatron_lm(path):
            raise CheckpointError(f"{path} is {_MEGATRON_LM}")
        if any(p.is_dir() for p in path.glob("mp_rank_*")):
            raise CheckpointError(
                f"{path} has shard directories but no {META_FILE}: an incomplete iteration (an "
                f"interrupted save or a partial copy); {another_iteration(path)}"
            )
        if (path / "config.json").is_file() and (
            any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        ):
            raise CheckpointError(
                f"{path} is a Hugging Face model directory (config.json and weight files), not a "
                f"checkpoint of this trainer: convert it once with `python -m model.hf import "
                f"{path} OUT_DIR` (with the run's --tp/--pp to write its shards directly), then "
                "train with --load OUT_DIR --finetune"
            )
        raise CheckpointError(
            f"{path} holds no checkpoint: neither {META_FILE} (an iteration directory) nor "
            f"{LATEST_FILE} (a save directory) is there; {_latest_hint(path)}"
        )
    d = path / iteration_dir_name(it)
    if not (d / META_FILE).is_file():
        if _is_megatron_lm(d):
            raise CheckpointError(f"{d} is {_MEGATRON_LM}")
        old = path / f".old_{iteration_dir_name(it)}"
        why = (
            f"; a re-save of that iteration was interrupted and left the previous copy as {old}: "
            f"rename it to {d.name}"
            if (old / META_FILE).is_file()
            else f"; {_latest_hint(path)}"
        )
        raise CheckpointError(
            f"{path / LATEST_FILE} names iteration {it} but {d / META_FILE} is missing{why}"
        )
    return d


def _int_field(meta: dict, key: str, path: Path, where: str = "") -> None:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointError(
            f"{path}: '{where}{key}' must be an integer >= 0, found {v!r}; the file is damaged or "
            "not written by this trainer"
        )


def read_meta(iter_dir: str | os.PathLike) -> dict:
    """meta.json of an iteration directory, checked for what loading reads from it (a damaged
    or hand-edited file is refused here, naming the key, not with a KeyError deep in loading)."""
    path = Path(iter_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: {Path(iter_dir)} is not a complete checkpoint"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); the file is damaged: {another_iteration(iter_dir)}"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format={meta.get('format')!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: 'version' must be an integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this code ({FORMAT_VERSION})"
        )
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(
            f"{path}: 'model' (the model configuration) must be an object, found "
            f"{meta.get('model')!r:.60}"
        )
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        cfg.validate()
        cfg.param_shapes()  # arithmetic on every size: a string or null fails here, not later
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: 'model' is not a usable model configuration: {e}") from None
    for key in ("iteration", "vocab_size"):
        _int_field(meta, key, path)
    if meta.get("has_trainer_state"):  # what a resume reads
        _int_field(meta, "consumed_train_samples", path)
        opt = meta.get("optimizer")
        if not isinstance(opt, dict):
            raise CheckpointError(f"{path}: 'optimizer' must be an object, found {opt!r:.60}")
        _int_field(opt, "step", path, "optimizer.")
    if not isinstance(meta.get("tokenizer") or {}, dict):
        raise CheckpointError(f"{path}: 'tokenizer' must be an object")
    layout = meta.get("layout") or {}
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path}: 'layout' must be an object")
    # A copy (rsync, scp) that stopped half-way, or a node's directories left out: named here,
    # where every consumer looks first, not as a tensor the shards cover only in part.
    tp, pp = layout.get("tp"), layout.get("pp")
    if isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1:
        want = [shard_dir_name(t, p) for t in range(tp) for p in range(pp)]
        gone = [d for d in want if not (Path(iter_dir) / d).is_dir()]
        if gone:
            verb = "is" if len(gone) == 1 else "are"
            raise CheckpointError(
                f"{Path(iter_dir)}: saved at TP {tp} / PP {pp} (meta.json 'layout'), but "
                f"{gone[:8]} {verb} missing: the copy is incomplete; copy the missing mp_rank_* "
                f"directories, or {another_iteration(iter_dir)}"
            )
    return meta


# ----------------------------------------------------------------------------------------------
# atomic directory writes


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


class _RankFailed(OSError):
    """Raised on the ranks of a save whose own part went through when another rank's failed."""


def _together(rank: int, action: Callable[[], None] | None) -> None:
    """Run this rank's part of one save step (None: nothing to do here), then learn whether
    every rank's part went through; a collective in place of a barrier. A rank whose write
    failed (a full disk on its node, a permission) used to leave the others in the barrier
    after it until the collective's timeout (a hang under NCCL, a traceback naming no file under
    gloo); now every rank raises, with one message naming the ranks that failed and why."""
    err = None
    try:
        if action is not None:
            action()
    except Exception as e:
        err = e
    if not _is_dist():
        if err is not None:
            raise err
        return
    failed = agree(None if err is None else str(err) or repr(err))
    if err is not None and not isinstance(err, OSError):
        raise err  # a bug, not the disk: its own traceback here, the message on the others
    if failed:
        raise _RankFailed(failed) from err


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk. The temporary-name-and-rename
    protocol only survives a crashed process by itself; after a power loss or kernel crash the
    page cache is gone, and a renamed iteration (or the latest file naming it, with the older
    iterations already pruned) could hold empty files unless they were flushed first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems refuse fsync on a directory; their entries are then as durable as
        # they make them.
        if not path.is_dir() or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself, before anything (pruning) relies on it


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


# The tensor files are written here, not in checkpoint_io: like every file of an iteration they
# are flushed (_fsync) before the rename that publishes them.
def _save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], layouts: dict[str, dict]
) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "tensors": json.dumps(layouts, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
    # safetensors creates its files 0600 whatever the umask, where the JSON beside them follows
    # it: a serving job or a colleague on a shared cluster could read meta.json but not the
    # weights. Give them the mode any other file of the run gets.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    _fsync(path)


@contextmanager
def _saving(save_dir: Path, iteration: int, rank: int):
    """An OSError while saving (disk full, no permission, --save naming a file) becomes a
    CheckpointError saying what is still there: nothing a resume reads is replaced before the
    new iteration is complete."""
    try:
        yield
    except OSError as e:
        # Every rank got here through _together: none is still writing into the temp dir.
        if rank == 0:
            shutil.rmtree(_tmp_dir(save_dir, iteration), ignore_errors=True)
        try:
            prev = latest_iteration(save_dir) if save_dir.is_dir() else None
        except CheckpointError:
            prev = None
        if prev is not None and (save_dir / iteration_dir_name(prev) / META_FILE).is_file():
            kept = f"{save_dir / LATEST_FILE} still names iteration {prev}, which is intact"
            resume = f"resume from it with --load {save_dir}"
        else:
            kept = "no earlier checkpoint there was changed"
            resume = "resume with --load"
        raise CheckpointError(
            f"saving iteration {iteration} to {save_dir} failed ({e}); {kept}. Free disk space "
            f"or choose a writable directory (--save), then {resume}"
        ) from e


def _tmp_dir(save_dir: Path, iteration: int) -> Path:
    return save_dir / f".tmp_{iteration_dir_name(iteration)}"


def _begin(save_dir: Path, iteration: int, rank: int) -> Path:
    tmp = _tmp_dir(save_dir, iteration)

    def make() -> None:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    _together(rank, make if rank == 0 else None)
    return tmp


def _commit(save_dir: Path, iteration: int, rank: int) -> Path:
    """Publish the temp dir as the iteration, then the latest file; call once every rank's
    files are written (after a _together)."""
    final = save_dir / iteration_dir_name(iteration)

    def publish() -> None:
        tmp = _tmp_dir(save_dir, iteration)
        # Every rank flushed its files; the directory entries that name them, before the rename.
        for d in [*tmp.glob("mp_rank_*"), tmp]:
            _fsync(d)
        if final.exists():  # re-saving an iteration: move the old one out of the way first
            old = save_dir / f".old_{iteration_dir_name(iteration)}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)  # the previous copy back where a resume looks for it
                raise
            _fsync(save_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
            _fsync(save_dir)  # the rename, before the latest file names the iteration
        _write_text_atomic(save_dir / LATEST_FILE, f"{iteration}\n")

    _together(rank, publish if rank == 0 else None)
    return final


def prune_iterations(save_dir: str | os.PathLike, newest: int, keep: int) -> list[Path]:
    """Delete the complete iteration directories of `save_dir` numbered below `newest` (the
    iteration just saved), all but the `keep - 1` most recent of them, so that `keep` remain with
    `newest`. Iterations numbered above `newest` (another run's), incomplete and temporary
    directories are left alone. Call on one rank after the save committed (the latest file names
    `newest`). Returns the deleted directories."""
    save_dir = Path(save_dir)
    if keep < 1:
        raise ValueError(f"keep {keep}: at least the newest checkpoint is kept (>= 1)")
    if latest_iteration(save_dir) != newest:
        raise CheckpointError(
            f"{save_dir / LATEST_FILE} does not name iteration {newest}: not pruning older ones"
        )
    older = []
    for d in save_dir.glob("iter_*"):
        try:
            it = int(d.name.removeprefix("iter_"))
        except ValueError:
            continue
        if d.is_dir() and (d / META_FILE).is_file() and it < newest:
            older.append((it, d))
    older.sort(reverse=True)
    doomed = [d for _, d in older[keep - 1 :]]
    for d in doomed:
        shutil.rmtree(d)
    return doomed


# ----------------------------------------------------------------------------------------------
# full (unsharded) checkpoints: HF import/export and tools


def _base_meta(meta: dict, iteration: int) -> dict:
    if "model" not in meta:
        raise CheckpointError(
            "meta must hold 'model': the ModelConfig as a dict (ModelConfig.to_dict())"
        )
    cfg = ModelConfig.from_dict(meta["model"])
    out = dict(meta)
    out["format"], out["version"] = FORMAT, FORMAT_VERSION
    out["iteration"] = int(iteration)
    out["vocab_size"] = int(meta.get("vocab_size", cfg.vocab_size))
    if out["vocab_size"] != cfg.vocab_size:
        raise CheckpointError(
            f"meta vocab_size {out['vocab_size']} differs from the model config's {cfg.vocab_size}"
        )
    return out


def write_full_checkpoint(
    save_dir: str | os.PathLike, iteration: int, state_dict: dict[str, torch.Tensor], meta: dict
) -> Path:
    """Write a complete checkpoint (as TP=1, PP=1, weights only) that `--load` accepts.

    state_dict: global names (those of `Llama(cfg).named_parameters()`), full tensors; the
    vocabulary matrices may have `vocab_size` rows or already be padded to the TP=1 padding
    (extra rows are added by copying row 0). meta: must hold "model" (ModelConfig.to_dict());
    "vocab_size" defaults to the config's; "tokenizer" (e.g. {"fingerprint": ...}) is checked
    against the data when training loads it; any other JSON-able keys are kept. Returns the
    iteration directory. A checkpoint without optimizer state loads as a release: training
    starts at iteration 0 with a fresh optimizer.
    """
    save_dir = Path(save_dir)
    meta = _base_meta(meta, iteration)
    cfg = ModelConfig.from_dict(meta["model"])
    padded = cfg.padded_vocab_size(1)
    expected = cfg.param_shapes(padded)
    missing = sorted(set(expected) - set(state_dict))
    unknown = sorted(set(state_dict) - set(expected))
    if missing or unknown:
        raise CheckpointError(
            f"state_dict does not match the model config: missing {missing[:8]}, "
            f"unknown {unknown[:8]}"
        )
    tensors, layouts = {}, {}
    for name, shape in expected.items():
        t = state_dict[name]
        if name in VOCAB_PARAMS:
            if t.shape[0] not in (cfg.vocab_size, padded) or tuple(t.shape[1:]) != shape[1:]:
                raise CheckpointError(
                    f"{name}: shape {tuple(t.shape)}; "
                    f"expected ({cfg.vocab_size} or {padded}, {shape[1]})"
                )
            t = pad_vocab_rows(t, padded)
        elif tuple(t.shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        tensors[name] = t
        layouts[name] = {"name": name, "global_shape": list(shape), "tp_dim": None, "pieces": None}
    meta.update(
        padded_vocab_size=padded,
        layout={"tp": 1, "pp": 1, "dp": 1},
        has_optimizer=False,
        has_trainer_state=False,
    )
    with _saving(save_dir, iteration, 0):  # one process writes it all
        tmp = _begin(save_dir, iteration, 0)
        (tmp / shard_dir_name(0, 0)).mkdir()
        _save_safetensors(tmp / shard_dir_name(0, 0) / MODEL_FILE, tensors, layouts)
        _write_json(tmp / META_FILE, meta)
        return _commit(save_dir, iteration, 0)


def read_full_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """All model tensors of a checkpoint (a save dir or an iter dir, any TP/PP layout), gathered
    to full tensors with the padded vocabulary rows trimmed to `vocab_size`; and its meta."""
    iter_dir = resolve_iteration_dir(path)
    meta = read_meta(iter_dir)
    index = ShardIndex(iter_dir, optimizer=False)
    out = {}
    for name in index.names("model"):
        t = index.read(name)
        out[name] = t[: meta["vocab_size"]] if name in VOCAB_PARAMS else t
    return out, meta


# ----------------------------------------------------------------------------------------------
# training checkpoints (every rank)


def rng_state() -> dict:
    """The torch CPU generator's state and that of this rank's own (current) CUDA device, as
    JSON lists of bytes.

    Only the current device's: a rank draws its dropout masks on cuda:LOCAL_RANK, and a resume
    at another layout restores a stage's stream from a file written by a rank with another
    local rank. Per-device states restored by index would give that rank one of the saver's
    untouched devices (so the TP ranks of a stage would draw different masks on replicated
    activations), or fail on a node with fewer devices."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states: the CUDA one into this rank's current device."""
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda_device"], dtype=torch.uint8))
    elif "cuda" in state:
        # Older checkpoints: every device's state by index, right only for the saving rank's
        # own device index (a resume at the saved layout).
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states])


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    *,
    params: dict[str, torch.Tensor],
    optim_state: dict[str, dict[str, torch.Tensor]] | None,
    meta: dict,
    rank_state: dict,
    ranks: tuple[int, int, int, int],
) -> Path:
    """Collective: every rank calls it. params: this rank's model parameters by global name (with
    the layout attributes); optim_state: kind -> name -> fp32 tensor with the parameter's local
    shape, written only by dp rank 0 (replicated over DP); meta: JSON, written by global rank 0;
    rank_state: this rank's RNG + loader state (JSON); ranks: (global, tp, pp, dp)."""
    save_dir = Path(save_dir)
    rank = ranks[0]
    meta = _base_meta(meta, iteration)
    with _saving(save_dir, iteration, rank):
        tmp = _begin(save_dir, iteration, rank)
        _together(rank, lambda: _write_rank_files(
            tmp, params, optim_state, meta, rank_state, ranks))  # fmt: skip
        return _commit(save_dir, iteration, rank)


def _write_rank_files(tmp: Path, params: dict[str, torch.Tensor],
                      optim_state: dict[str, dict[str, torch.Tensor]] | None, meta: dict,
                      rank_state: dict, ranks: tuple[int, int, int, int]) -> None:  # fmt: skip
    """This rank's files of save_checkpoint, into the temp dir."""
    rank, tp_rank, pp_rank, dp_rank = ranks
    shard = tmp / shard_dir_name(tp_rank, pp_rank)
    shard.mkdir(exist_ok=True)
    if dp_rank == 0:
        layouts = {n: tensor_layout(n, p) for n, p in params.items()}
        _save_safetensors(shard / MODEL_FILE, params, layouts)
        if optim_state is not None:
            tensors, olayouts = {}, {}
            for kind, by_name in optim_state.items():
                for n, t in by_name.items():
                    key = f"{kind}/{n}"
                    tensors[key] = t
                    olayouts[key] = dict(layouts[n], name=n)
            _save_safetensors(shard / optim_file_name(0), tensors, olayouts)
    _write_json(shard / state_file_name(dp_rank), rank_state)
    if rank == 0:
        _write_json(tmp / META_FILE, meta)


def read_rank_state(iter_dir: Path, tp_rank: int, pp_rank: int, dp_rank: int) -> dict | None:
    """This rank's saved RNG + loader state, or None when the checkpoint has none for it."""
    path = Path(iter_dir) / shard_dir_name(tp_rank, pp_rank) / state_file_name(dp_rank)
    if not path.is_file():
        return None
    return _read_rank_state(path)


def _read_rank_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); the file is damaged: "
            f"{another_iteration(path.parent.parent)}, or this one with --finetune (weights "
            "only, iteration 0)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(state).__name__}")
    return state


def find_rank_state(iter_dir: Path, pp_rank: int | None = None) -> dict | None:
    """The first saved rank state (in (tp, pp, dp) file order) of pipeline rank `pp_rank` (any
    when None), or None when the checkpoint has none: for a rank of another layout."""
    pattern = "mp_rank_*" if pp_rank is None else f"mp_rank_*_{pp_rank:03d}"
    for shard in sorted(p for p in Path(iter_dir).glob(pattern) if p.is_dir()):
        files = sorted(shard.glob("state_dp*.json"))
        if files:
            return _read_rank_state(files[0])
    return None
