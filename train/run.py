"""The run: Trainer steps until --train_iters, with the log rows, evaluations, saves and early
stops (--exit_interval, --exit_duration_in_mins, SIGTERM under --exit_signal_handler) on their
intervals. `train.loop.Trainer` does one step; this module decides what happens around it."""

import time

import torch

from parallel.dims import ParallelDims
from train.config import RunConfig
from train.loop import Trainer
from train.lr import lr_at
from train.metrics import (
    Telemetry,
    eval_line,
    log,
    memory_gib,
    peak_flops_per_gpu,
    step_flops,
    train_line,
)
from train.profile import StepProfiler
from train.stop import StopCheck


def run_training(rc: RunConfig, dims: ParallelDims, trainer: Trainer, train_loader,
                 eval_loaders: dict, telemetry: Telemetry | None,
                 started: float | None = None) -> list[dict]:  # fmt: skip
    """The loop. eval_loaders: name -> zero-argument factory of an iterable of validation
    micro-batches (a fresh one per evaluation); started: time.time() at the run's start, the
    origin of --exit_duration_in_mins (default: now). Returns the logged rows.

    A stop before --train_iters (train.stop: --exit_interval, --exit_duration_in_mins, SIGTERM
    under --exit_signal_handler) saves when --save is given and skips the final evaluation, as
    Megatron-LLM's exit does: a job racing its time limit should spend it on the checkpoint."""
    with StopCheck(rc.loop, time.time() if started is None else started, trainer.device) as stops:
        return _run_training(rc, dims, trainer, train_loader, eval_loaders, telemetry, stops)


def _run_training(rc: RunConfig, dims: ParallelDims, trainer: Trainer, train_loader,
                  eval_loaders: dict, telemetry: Telemetry | None,
                  stops: StopCheck) -> list[dict]:  # fmt: skip
    loop = rc.loop
    peak = peak_flops_per_gpu() if trainer.device.type == "cuda" else None
    world = dims.world_size
    history: list[dict] = []
    fresh = {"loss": 0.0, "n": 0, "time": 0.0, "data": 0.0, "tokens": 0, "flops": 0.0, "skipped": 0,
             "truncated": 0}  # fmt: skip
    acc, clocks = dict(fresh), []  # clocks: the interval's PhaseClocks (--log_timers)
    profiler = StepProfiler(rc.log, dims.rank, trainer.device)
    t_start = time.perf_counter()
    start_iter = trainer.iteration
    last_norm = float("nan")

    def evaluate(it: int) -> None:
        for name, factory in eval_loaders.items():
            t0 = time.perf_counter()
            res = trainer.evaluate(factory())
            res["eval_s"] = time.perf_counter() - t0
            if telemetry is not None:
                log(eval_line(it, name, res))
                telemetry.record("eval", it, {"dataset": name, **res}, f"validation/{name}")
            history.append({"type": "eval", "iteration": it, "dataset": name, **res})

    stop = None
    if trainer.iteration >= loop.train_iters and telemetry is not None:
        log(f" iteration {trainer.iteration} already reaches --train_iters {loop.train_iters}: "
            "nothing to train (raise --train_iters to go on)")  # fmt: skip
    while trainer.iteration < loop.train_iters:
        t0 = time.perf_counter()
        batch = train_loader.next_global_batch()
        acc["data"] += time.perf_counter() - t0
        lr = lr_at(rc.schedule, trainer.iteration + 1)
        profiler.before_step(trainer.iteration + 1)
        res = trainer.train_step(batch, lr)
        it = trainer.iteration + 1
        logging = it % rc.log.log_interval == 0 or it == loop.train_iters
        evaluating = bool(eval_loaders) and rc.eval.iters > 0 and it % rc.eval.interval == 0
        saving = bool(rc.ckpt.save) and bool(
            (rc.ckpt.save_interval and it % rc.ckpt.save_interval == 0) or it == loop.train_iters
        )
        if trainer.device.type == "cuda" and (logging or evaluating or saving):
            # Only where a row is logged (or an evaluation or a save follows): between them the
            # host loads the next batch while the device runs this step's update. The step's
            # own host read (loss and gradient norm) keeps the host at most one update ahead,
            # so an interval's summed step times are still its wall time.
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rc.log.log_timers:
            clocks.append(res.phases)  # CUDA events: read after the synchronize above
        trainer.iteration += 1
        for path in profiler.after_step(trainer.iteration):
            log(f" profile of rank {dims.rank} written: {path}")
        trainer.consumed_samples += loop.global_batch_size
        last_norm = res.grad_norm
        if res.skipped:
            acc["skipped"] += 1
            if telemetry is not None:
                log(f" iteration {trainer.iteration}: gradient norm {res.grad_norm}, step skipped")
        else:
            acc["loss"] += res.loss
            acc["n"] += 1
        acc["time"] += dt
        acc["tokens"] += res.tokens
        acc["truncated"] += res.truncated
        acc["flops"] += step_flops(rc.model, trainer.padded_vocab, res.tokens, res.pairs)
        if logging:
            phases: dict[str, float] = {}
            for clock in clocks:
                for name, ms in clock.ms().items():
                    phases[name] = phases.get(name, 0.0) + ms
            elapsed = time.perf_counter() - t_start
            per_iter = elapsed / (it - start_iter)
            mem, mem_what = memory_gib()
            row = {
                "consumed_samples": trainer.consumed_samples,
                "iter_ms": 1000 * acc["time"] / (acc["n"] + acc["skipped"]),
                "lr": lr,
                "global_batch_size": loop.global_batch_size,
                "lm_loss": acc["loss"] / acc["n"] if acc["n"] else float("nan"),
                "grad_norm": last_norm,
                "skipped": acc["skipped"],
                "skipped_total": trainer.skipped_total,
                "tokens_per_s": acc["tokens"] / acc["time"],
                "tflops": acc["flops"] / acc["time"] / world / 1e12
                if trainer.device.type == "cuda"
                else None,
                "mfu": acc["flops"] / acc["time"] / world / peak if peak else None,
                "mem_gib": mem,
                "mem_what": mem_what,
                "loss_tokens": res.loss_tokens,
                "truncated": acc["truncated"],  # samples cut to --seq_length in the interval
                "eta_s": per_iter * (loop.train_iters - it),
            }
            if rc.log.log_timers:
                steps = acc["n"] + acc["skipped"]
                row["timers/data_ms"] = 1000 * acc["data"] / steps
                row["timers/step_ms"] = 1000 * (acc["time"] - acc["data"]) / steps
                row.update({f"timers/{k}_ms": v / steps for k, v in phases.items()})
            if telemetry is not None:
                log(train_line(it, loop.train_iters, row))
                if rc.log.log_timers:  # Megatron's timers line
                    timers = [f"{k.removeprefix('timers/').removesuffix('_ms')}: {v:.1f}"
                              for k, v in row.items() if k.startswith("timers/")]  # fmt: skip
                    log(" time (ms, mean per iteration) | " + " | ".join(timers) + " |")
                telemetry.record("train", it, row, "train")
            history.append({"type": "train", "iteration": it, **row})
            acc, clocks = dict(fresh), []
        if evaluating:
            evaluate(it)
        stop = stops.reason(it) if it < loop.train_iters else None
        if saving or (stop and rc.ckpt.save):
            t1 = time.perf_counter()
            trainer.save(train_loader.state_dict())
            if telemetry is not None:
                took = time.perf_counter() - t1
                log(f" saved checkpoint at iteration {it} to {rc.ckpt.save} ({took:.1f} s)")
                if rc.log.log_timers:
                    telemetry.record("checkpoint", it, {"timers/save_s": took}, "train")
        if stop:
            resume = ""
            if rc.ckpt.save:
                again = f"--load {rc.ckpt.save}" + (" --no_finetune" if rc.ckpt.finetune else "")
                resume = f"; resume with {again}"
            if telemetry is not None:
                log(f" exiting at iteration {it}: {stop}{resume}")
            break
    for path in profiler.finish(trainer.iteration):  # a window cut short by the run's end
        log(f" profile of rank {dims.rank} written: {path}")
    if (not stop and eval_loaders and rc.eval.iters > 0
            and trainer.iteration % rc.eval.interval != 0):  # fmt: skip
        evaluate(trainer.iteration)
    return history
