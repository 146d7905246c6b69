"""`python -m train`: parse, validate, (dry-run or) set up the ranks and train."""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from train.args import ArgsError, no_effect_notes, parse_args
from train.config import RunConfig, describe, resolve
from train.metrics import is_logging_rank, log


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
    return train(rc)


def _earlier_run_note(rc: RunConfig) -> str | None:
    """A warning when --save already holds an earlier run's checkpoints that this run does not
    resume from: iterations it reaches replace theirs, and the latest file will name its own."""
    from train import checkpoint as ckpt

    save, load = rc.ckpt.save, rc.ckpt.load
    if not save:
        return None
    try:
        it = ckpt.latest_iteration(save)
    except ckpt.CheckpointError:
        return None
    if it is None:
        return None
    save_dir = Path(save).resolve()
    if load and save_dir in (Path(load).resolve(), *Path(load).resolve().parents):
        return None  # resuming from it (or from one of its iterations)
    return (
        f" WARNING: --save {save} already holds an earlier run (its latest iteration is {it}) and "
        "this run does not --load it: the iterations this run saves replace those with the same "
        f"number, and {ckpt.LATEST_FILE} will name this run's. To resume instead, pass --load "
        f"{save}; to keep both, choose another --save."
    )


def train(rc: RunConfig) -> int:
    """Set up this rank and run the loop; returns the exit code."""
    from parallel.dims import ParallelDims
    from train import checkpoint as ckpt
    from train.data import DataError, eval_batches, eval_splits, make_loader, open_datasets
    from train.loop import Trainer, run_training
    from train.memory import activation_report, peak_estimate, peak_line, state_memory_line
    from train.metrics import Telemetry

    t_setup = time.perf_counter()
    started = time.time()  # --exit_duration_in_mins counts the set-up too (as Megatron)
    try:
        dims = ParallelDims.build(rc.parallel.tp, rc.parallel.pp, backend=rc.parallel.backend,
                                  timeout_minutes=rc.parallel.timeout_minutes)  # fmt: skip
    except ValueError as e:
        return _fail(str(e))
    if dims.dp != rc.parallel.dp:
        return _fail(f"launched with data parallel size {dims.dp}, configured for {rc.parallel.dp}")
    problem = _make_output_dirs(rc)
    if problem is not None:
        return _fail(problem)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # One intra-op thread unless asked otherwise: measured on the tiny preset, a second
            # thread gains 1.3x on an idle 2-core machine (0.55 vs 0.72 s/iteration) and loses
            # 2.7x on a busy one (OpenMP threads spinning for a core they do not get), and
            # torchrun's CPU ranks want one thread each anyway.
            torch.set_num_threads(1)
    # Megatron's seeding: the same stream on every DP rank, offset per pipeline stage.
    torch.manual_seed(rc.loop.seed + 100 * dims.pp_rank)
    logging = is_logging_rank()
    try:
        train_ds, valid_ds, tok = open_datasets(rc.data)
        splits = eval_splits(valid_ds) if valid_ds is not None else {}
    except (DataError, OSError, ValueError) as e:
        return _fail(str(e))
    if tok.vocab_size != rc.model.vocab_size:
        rc.model = rc.model.replace(vocab_size=tok.vocab_size)
    try:
        trainer = Trainer(rc, dims, tok, device)
    except ValueError as e:
        return _fail(str(e))
    try:
        loader_state = trainer.load(rc.ckpt.load) if rc.ckpt.load else None
    except (ckpt.CheckpointError, ValueError) as e:
        return _fail(f"--load {rc.ckpt.load}: {e}")
    train_loader = make_loader(train_ds, rc.data, dims.dp_rank, dims.dp)
    if loader_state is not None:
        try:
            train_loader.load_state_dict(loader_state)
        except DataError as e:
            return _fail(f"{rc.ckpt.load}: {e}")
    eval_loaders = {}
    if valid_ds is not None:
        for name, indices in splits.items():
            eval_loaders[name] = lambda idx=indices: eval_batches(
                valid_ds, rc.data, dims.dp_rank, dims.dp, idx, rc.eval.iters
            )
    empty_valid = valid_ds is not None and not eval_loaders
    telemetry = None
    if logging:
        wandb_cfg = None
        if rc.log.wandb:
            wandb_cfg = {"project": rc.log.wandb_project, "entity": rc.log.wandb_entity,
                         "id": rc.log.wandb_id, "dir": rc.log.run_dir}  # fmt: skip
        telemetry = Telemetry(rc.log.run_dir, rc.log.tensorboard_dir, wandb_cfg, rc.to_dict())
        log(describe(rc))
        n_local = sum(p.numel() for _, p in trainer.named_parameters())
        log(f" parameters on this (tp {dims.tp_rank}, pp {dims.pp_rank}) rank: {n_local:,}; "
            f"device {device}, dtype {trainer.dtype}, world {dims.world_size} (tp {dims.tp} pp "
            f"{dims.pp} dp {dims.dp}); setup {time.perf_counter() - t_setup:.1f} s")  # fmt: skip
        log(" " + state_memory_line(trainer))
        note = _earlier_run_note(rc)
        if note:
            log(note)
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
    if rc.log.activation_memory_report:
        # A probe of up to 256 tokens, split evenly over TP (x2: sequence parallelism); at least
        # one token per rank however short seq_length is.
        tokens = max(min(rc.data.seq_length, 256) // (2 * dims.tp), 1) * (2 * dims.tp)
        rep = activation_report(trainer.model, tokens, device, trainer.dtype)  # all ranks
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
    try:
        run_training(rc, dims, trainer, train_loader, eval_loaders, telemetry, started)
    except ckpt.CheckpointError as e:  # a failed save: the message says what is still intact
        return _fail(str(e))
    finally:
        if telemetry is not None:
            telemetry.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
