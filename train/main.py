"""`python -m train`: parse, validate, (dry-run or) set up the ranks and train."""

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from parallel.dims import local_cuda_device
from parallel.host_text import agree
from train.args import ArgsError, no_effect_notes, parse_args
from train.config import RunConfig
from train.cpu import one_thread_unless_asked
from train.describe import describe
from train.metrics import is_logging_rank, log
from train.resolve import resolve

T = TypeVar("T")


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def _make_output_dirs(rc: RunConfig) -> str | None:
    """Create the directories the run writes into, now rather than at the first metrics line or
    the first checkpoint (minutes or hours in); the problem, or None."""
    for flag, value in (("--save", rc.ckpt.save), ("--run_dir", rc.log.run_dir),
                        ("--tensorboard_dir", rc.log.tensorboard_dir)):  # fmt: skip
        if not value:
            continue
        try:
            os.makedirs(value, exist_ok=True)
        except OSError as e:
            return f"{flag} {value}: cannot create the directory ({e.strerror}); give another"
        if not os.access(value, os.W_OK | os.X_OK):
            return f"{flag} {value}: the directory is not writable; give another"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        ns, given = parse_args(argv)
        rc = resolve(ns, given)
    except ArgsError as e:
        return _fail(str(e))
    rc.notes.extend(no_effect_notes(given))
    if ns.dry_run:
        print(describe(rc), flush=True)
        print("dry run: nothing allocated, no process launched", flush=True)
        return 0
    if rc.deferred:
        return _fail(
            "these settings need a later part of the project:\n  - " + "\n  - ".join(rc.deferred)
        )
    return train(rc, list(argv) if argv is not None else sys.argv[1:])


def _inside(path: str, root: str) -> bool:
    """`path` is `root` or lies below it (an iteration directory of a save directory)."""
    root_dir = Path(root).resolve()
    return root_dir in (Path(path).resolve(), *Path(path).resolve().parents)


def _first_launch(rc: RunConfig) -> bool:
    """--load names this run's own --save and nothing was saved there yet: Megatron's idiom for a
    job that resumes itself (the same --load and --save on every launch), whose first launch
    starts from scratch. Not under --finetune (weights to start from must exist), and not when
    the directory holds anything that looks like an iteration (an interrupted save is an error
    that says what to load)."""
    from train import checkpoint as ckpt

    load, save = rc.ckpt.load, rc.ckpt.save
    if not (load and save) or rc.ckpt.finetune:
        return False
    if Path(load).resolve() != Path(save).resolve():
        return False
    path = Path(load)
    if not path.exists():
        return True
    return (
        path.is_dir()
        and not (path / ckpt.LATEST_FILE).exists()
        and not (path / ckpt.META_FILE).exists()
        and not any(path.glob("iter_*"))
        and not any(path.glob("mp_rank_*"))
    )


def _earlier_run(rc: RunConfig) -> tuple[str | None, str | None]:
    """(error, warning) when --save already holds an earlier run's checkpoints that this run
    does not resume from: the iterations it saves would replace theirs, and the latest file would
    name its own. Refused unless --overwrite_save (then only warned): nothing already written is
    lost without being asked for."""
    from train import checkpoint as ckpt

    save, load, finetune = rc.ckpt.save, rc.ckpt.load, rc.ckpt.finetune
    if not save:
        return None, None
    try:
        it = ckpt.latest_iteration(save)
    except ckpt.CheckpointError:
        return None, None  # an unreadable latest file: loading it says what is wrong
    if it is None:
        return None, None
    own = bool(load) and _inside(load, save)
    if own and not finetune:
        return None, None  # resuming it (or one of its iterations)
    if own:
        why = (
            f"--finetune --load {load} starts this run at iteration 0 from its own --save {save} "
            f"(latest iteration {it}), and its saves would replace that run's iterations"
        )
        how = (
            "to resume that run, add --no_finetune; to fine-tune it further, choose another "
            "--save; to replace it, add --overwrite_save"
        )
    else:
        why = (
            f"--save {save} already holds an earlier run (its latest iteration is {it}) that this "
            f"run does not resume: the iterations this run saves would replace those with the "
            f"same number, and {ckpt.LATEST_FILE} would name this run's"
        )
        resume = f"--load {save}" + (" --no_finetune" if finetune else "")
        how = (
            f"to resume it, pass {resume}; to keep both, choose another --save; to replace it, "
            "add --overwrite_save"
        )
    if rc.ckpt.overwrite_save:
        return None, f" WARNING: {why} (--overwrite_save)"
    return f"{why}: {how}", None


def _git_commit() -> str | None:
    """The checkout's commit (with "-dirty" for uncommitted changes), for the run's record; None
    outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _resume_hint(rc: RunConfig) -> str:
    """What a stopped run left and how to go on from it."""
    from train import checkpoint as ckpt

    save = rc.ckpt.save
    try:
        it = ckpt.latest_iteration(save) if save else None
    except ckpt.CheckpointError:
        it = None
    if it is None:
        return "no checkpoint was saved; start the run again"
    resume = f"--load {save}" + (" --no_finetune" if rc.ckpt.finetune else "")
    return f"{save} holds complete checkpoints up to iteration {it}; resume with {resume}"


def _unshared_save_message(save: str, blind: list[tuple[int, str]]) -> str:
    """What `shared_fs.ranks_not_sharing` found, said to the user. blind: (rank, host)."""
    if blind[0][0] == 0:
        return f"--save {save}: rank 0 cannot write a file there; give a writable directory"
    hosts = sorted({h for _, h in blind})
    ranks = ("rank " if len(blind) == 1 else "ranks ") + ", ".join(str(r) for r, _ in blind)
    return (
        f"--save {save}: {ranks} (on {', '.join(hosts)}) do not see the file rank 0 wrote "
        "there: every rank writes its shards into one checkpoint directory, so --save must be "
        "on a file system that every node mounts at the same path (NFS, Lustre, ...), not on "
        "node-local storage; give such a directory"
    )


class _Refused(Exception):
    """A start-up problem, phrased for the user; at world size > 1, agreed by every rank."""


# Bytes of each rank's start-up message that travel (the data and checkpoint messages name
# files and say what to do; the save agreements' 1024 can cut them).
_MESSAGE_BYTES = 4096


def _on_every_rank(dims, step: Callable[[], T], known: tuple[type[Exception], ...] = ()) -> T:
    """Run one start-up step on this rank, then (at world size > 1) agree with every rank on
    whether all of theirs went through: a collective in place of hoping they did. A rank whose
    step failed (its node does not see the data or one checkpoint file, a damaged per-rank file)
    used to exit alone while the others went on into the first training collective: a gloo
    traceback naming nothing there, under NCCL a hang until the timeout. Now every rank raises
    _Refused with one message naming the ranks that failed and why.

    known: the exception types that are the user's problem (their text is the message);
    anything else is a bug, whose traceback this rank prints after the agreement."""
    problem, bug, out = None, None, None
    try:
        out = step()
    except _Refused as e:
        problem = str(e)
    except known as e:
        problem = str(e) or repr(e)  # OSError() has no text: say at least what it was
    except Exception as e:
        if dims.world_size == 1:
            raise
        bug = e
        problem = f"{type(e).__name__}: {e} (unexpected; rank {dims.rank} printed its traceback)"
    if dims.world_size > 1:
        problem = agree(problem, width=_MESSAGE_BYTES)
    if bug is not None:
        _fail(problem)  # every rank's log holds the whole story; the traceback follows
        raise bug
    if problem is not None:
        raise _Refused(problem)
    return out


def train(rc: RunConfig, argv: list[str] | None = None) -> int:
    """Set up this rank and run the loop; returns the exit code. argv: the command line, for
    the run's record in metrics.jsonl."""
    from parallel.dims import ParallelDims

    t_setup = time.perf_counter()
    started = time.time()  # --exit_duration_in_mins counts the set-up too (as Megatron)
    try:
        dims = ParallelDims.build(rc.parallel.tp, rc.parallel.pp, backend=rc.parallel.backend,
                                  timeout_minutes=rc.parallel.timeout_minutes)  # fmt: skip
    except ValueError as e:
        return _fail(str(e))
    code = 1  # an exception on its way out
    try:
        code = _set_up_and_run(rc, dims, argv, started, t_setup)
    except _Refused as e:
        code = _fail(str(e))
    finally:
        if dist.is_initialized():
            _shut_down(code, sys.exc_info()[1])
    return code


# How long the process group may take to shut down once the run is over. It takes milliseconds;
# under torch 2.4 and 2.5 a gloo rank sometimes never returns from it (README, "Versions").
_SHUTDOWN_S = 60.0


def _shut_down(code: int, error: BaseException | None) -> None:
    """destroy_process_group, bounded: a run that has trained, saved and said so must end. A
    watchdog exits the process with the run's code (after printing the error on its way out, if
    any) when the shutdown has not returned after _SHUTDOWN_S seconds."""
    import threading
    import traceback

    done = threading.Event()

    def watchdog() -> None:
        if done.wait(_SHUTDOWN_S):
            return
        if error is not None:
            traceback.print_exception(error)
        print(f"warning: torch.distributed did not shut down within {_SHUTDOWN_S:.0f} s (torch "
              f"{torch.__version__}); the run is over: exiting with code {code}",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.stdout.flush()
        os._exit(code)

    threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()
    dist.destroy_process_group()
    done.set()


def _log_set_up(rc: RunConfig, dims, trainer, device, t_setup: float, notes: list[str],
                train_ds, empty_valid: bool) -> None:  # fmt: skip
    """The logging rank's start-up lines: the configuration, this rank's share, the notes."""
    from train.memory import state_memory_line

    log(describe(rc))
    n_local = sum(p.numel() for _, p in trainer.named_parameters())
    log(f" parameters on this (tp {dims.tp_rank}, pp {dims.pp_rank}) rank: {n_local:,}; "
        f"device {device}, dtype {trainer.dtype}, world {dims.world_size} (tp {dims.tp} pp "
        f"{dims.pp} dp {dims.dp}); setup {time.perf_counter() - t_setup:.1f} s")  # fmt: skip
    log(" " + state_memory_line(trainer))
    for line in notes:
        log(line)
    long = int((train_ds.sizes > rc.data.seq_length).sum())
    if long:
        # Cut on the right (Megatron-LLM's t[:seq_length + 1]): the tail of each is never
        # trained on; the log rows count them as they come.
        seq = rc.data.seq_length
        log(f" note: {long:,} of {len(train_ds):,} training samples "
            f"({100 * long / len(train_ds):.2f}%) are longer than --seq_length {seq} "
            f"tokens; each is cut to its first {seq}")  # fmt: skip
    if empty_valid and rc.eval.iters > 0:
        log(f" note: the validation split {rc.data.valid_prefix} holds no samples (no "
            "val_split in the data mix?): no validation in this run")  # fmt: skip


def _report_activations(rc: RunConfig, dims, trainer, device, telemetry) -> None:
    """--activation_memory_report: measure a probe micro-batch's activations per layer (a
    collective under TP), then log them and the peak estimate from the logging rank."""
    from train.memory import activation_report, peak_estimate, peak_line

    # A probe of up to 256 tokens, split evenly over TP (x2: sequence parallelism); at least
    # one token per rank however short seq_length is.
    tokens = max(min(rc.data.seq_length, 256) // (2 * dims.tp), 1) * (2 * dims.tp)
    rep = activation_report(trainer.stages, tokens, device, trainer.dtype)  # all ranks
    if telemetry is not None:
        per_mb = rc.data.seq_length * rc.data.micro_batch_size
        parts = [f"{k} {v:,.0f} B/token = {v * per_mb / 2**20:.1f} MiB per micro-batch"
                 for k, v in rep.items()]  # fmt: skip
        log(
            f" activation memory per layer on this rank, measured ({per_mb} tokens per "
            f"micro-batch): {'; '.join(parts)}; this run: {rc.loop.recompute_granularity}"
        )
        values = {f"bytes_per_token_{k}": v for k, v in rep.items()}
        telemetry.record("activation_memory", trainer.iteration, values, "memory")
        line, too_big = peak_line(peak_estimate(trainer, rep), device)
        log(" " + line)
        if too_big:
            log(" WARNING: that is more than 92% of the device's memory, so the first steps "
                "may run out of it: lower --micro_batch_size, recompute more "
                "(--recompute_granularity full), add tensor or pipeline parallelism, or "
                "--use_distributed_optimizer (with --optimizer_cpu_offload)")  # fmt: skip


def _set_up_and_run(rc: RunConfig, dims, argv, started: float, t_setup: float) -> int:
    """Every start-up step that can fail on some ranks only goes through `_on_every_rank`, so
    the ranks leave together with one message, or go on together into training."""
    from train import checkpoint as ckpt
    from train.data import DataError, eval_batches, eval_splits, make_loader, open_datasets
    from train.loop import Trainer
    from train.metrics import Telemetry
    from train.run import run_training
    from train.shared_fs import ranks_not_sharing

    if dims.dp != rc.parallel.dp:
        raise _Refused(f"launched with data parallel size {dims.dp}, configured for "
                       f"{rc.parallel.dp}")  # fmt: skip
    if torch.cuda.is_available():
        device = _on_every_rank(dims, local_cuda_device, known=(ValueError,))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    one_thread_unless_asked(device)

    def check_paths() -> tuple[bool, str | None]:
        # Before any directory is made: a run that cannot start leaves nothing behind.
        first = _first_launch(rc)
        if not first and rc.ckpt.load:
            try:
                ckpt.resolve_iteration_dir(rc.ckpt.load)
            except ckpt.CheckpointError as e:
                raise _Refused(f"--load {rc.ckpt.load}: {e}") from e
        refused, warning = _earlier_run(rc)
        if refused:
            raise _Refused(refused)
        return first, warning

    first_launch, earlier = _on_every_rank(dims, check_paths)
    if first_launch:
        rc.ckpt = dataclasses.replace(rc.ckpt, load=None)

    def make_dirs() -> None:
        problem = _make_output_dirs(rc)
        if problem is not None:
            raise _Refused(problem)

    _on_every_rank(dims, make_dirs)
    if rc.ckpt.save:  # before training: on node-local storage the first save would fail
        blind = ranks_not_sharing(rc.ckpt.save)
        if blind:
            raise _Refused(_unshared_save_message(rc.ckpt.save, blind))
    # Megatron's seeding: the same stream on every DP rank, offset per pipeline stage.
    torch.manual_seed(rc.loop.seed + 100 * dims.pp_rank)
    logging = is_logging_rank()

    def open_data():
        train_ds, valid_ds, tok = open_datasets(rc.data)
        return train_ds, valid_ds, tok, eval_splits(valid_ds) if valid_ds is not None else {}

    train_ds, valid_ds, tok, splits = _on_every_rank(dims, open_data,
                                                     (DataError, OSError, ValueError))  # fmt: skip
    if tok.vocab_size != rc.model.vocab_size:
        rc.model = rc.model.replace(vocab_size=tok.vocab_size)
    trainer = _on_every_rank(dims, lambda: Trainer(rc, dims, tok, device), (ValueError,))

    def load():
        loader = make_loader(train_ds, rc.data, dims.dp_rank, dims.dp)
        if not rc.ckpt.load:
            return loader
        try:
            loader_state = trainer.load(rc.ckpt.load)
        except (ckpt.CheckpointError, ValueError) as e:
            raise _Refused(f"--load {rc.ckpt.load}: {e}") from e
        if loader_state is not None:
            try:
                loader.load_state_dict(loader_state)
            except DataError as e:
                raise _Refused(f"{rc.ckpt.load}: {e}") from e
        return loader

    train_loader = _on_every_rank(dims, load)
    eval_loaders = {}
    if valid_ds is not None:
        for name, indices in splits.items():
            eval_loaders[name] = lambda idx=indices: eval_batches(
                valid_ds, rc.data, dims.dp_rank, dims.dp, idx, rc.eval.iters
            )
    empty_valid = valid_ds is not None and not eval_loaders

    def open_telemetry():
        if not logging:
            return None
        wandb_cfg = None
        if rc.log.wandb:
            wandb_cfg = {"project": rc.log.wandb_project, "entity": rc.log.wandb_entity,
                         "id": rc.log.wandb_id, "dir": rc.log.run_dir}  # fmt: skip
        out = Telemetry(rc.log.run_dir, rc.log.tensorboard_dir, wandb_cfg, rc.to_dict())
        out.run_start(trainer.iteration, {
            "argv": argv, "load": rc.ckpt.load, "finetune": rc.ckpt.finetune,
            "world_size": dims.world_size, "git": _git_commit()})  # fmt: skip
        return out

    # The logging rank's files and loggers (W&B's login): their failure stops every rank.
    telemetry = _on_every_rank(dims, open_telemetry, (OSError,))
    notes = [earlier] if earlier else []
    if first_launch:
        notes.append(f" note: --load {rc.ckpt.save} is this run's --save and holds no checkpoint "
                     "yet: starting from scratch (a later launch resumes from it)")  # fmt: skip
    try:
        if logging:
            _log_set_up(rc, dims, trainer, device, t_setup, notes, train_ds, empty_valid)
        if rc.log.activation_memory_report:
            _report_activations(rc, dims, trainer, device, telemetry)
        try:
            run_training(rc, dims, trainer, train_loader, eval_loaders, telemetry, started)
        except ckpt.CheckpointError as e:  # a failed save: the message says what is intact
            return _fail(str(e))
        except KeyboardInterrupt:  # Ctrl-C: say what is intact instead of a traceback
            if logging:
                print(f"interrupted: {_resume_hint(rc)}", file=sys.stderr, flush=True)
            return 130
    finally:
        if telemetry is not None:
            telemetry.close()
    return 0
