"""Audit of the loop's bookkeeping: validation keys, the LR schedule against Megatron-LLM's
definitions, flags accepted without effect, resuming under other schedule flags, and what the
throughput figures count."""

import json
import math
import os
import signal
from pathlib import Path

import pytest

from data.errors import DataError
from tests.train.helpers import SyntheticLoader, tiny_run, write_split
from train.args import ArgsError
from train.config import ScheduleConfig
from train.data import eval_splits
from train.loop import StepResult, Trainer
from train.lr import lr_at
from train.main import main
from train.run import run_training

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# a dataset named "all" against the whole split's "all"


def test_a_dataset_named_all_is_refused_naming_it_and_the_file(tmp_path):
    ds = write_split(tmp_path, "mix-val", [4, 5, 6], {"all": [0, 2], "b": [2, 3]})
    with pytest.raises(DataError) as e:
        eval_splits(ds)
    msg = str(e.value)
    assert "mix-val-meta.json" in msg and "named 'all'" in msg and "rename" in msg


def test_a_lone_dataset_named_all_is_the_wholewrite_split(tmp_path):
    # Only one dataset holds validation samples: no per-dataset entries, nothing to confuse.
    ds = write_split(tmp_path, "mix-val", [4, 5], {"all": [0, 2], "b": [2, 2]})
    assert eval_splits(ds) == {"all": None}


def test_training_refuses_a_dataset_named_all_before_building_the_model(tmp_path, capsys):
    write_split(tmp_path, "mix-train", [40, 50, 60, 70], {"all": [0, 2], "b": [2, 4]})
    write_split(tmp_path, "mix-val", [40, 50, 60], {"all": [0, 2], "b": [2, 3]})
    argv = ["--model", "tiny", "--micro_batch_size", "2", "--global_batch_size", "2",
            "--seq_length", "64", "--train_iters", "1", "--lr", "1e-3",
            "--data_path", str(tmp_path / "mix-train"), "--eval_iters", "1",
            "--eval_interval", "1", "--log_interval", "1",
            "--no-activation_memory_report"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mix-val-meta.json" in err and "named 'all'" in err


# ----------------------------------------------------------------------------------------------
# the LR schedule: Megatron-LLM's OptimizerParamScheduler.get_lr, case by case


def _megatron_lr(max_lr, min_lr, style, warmup, decay, steps):
    """Megatron-LLM's get_lr at `steps` steps taken, written out from its definition (cases in
    its order: warm-up, constant, past the decay, inverse square root, linear / cosine)."""
    if warmup > 0 and steps <= warmup:
        return max_lr * steps / warmup
    if style == "constant":
        return max_lr
    if steps > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * max(warmup, 1) ** 0.5 / max(steps, 1) ** 0.5)
    ratio = (steps - warmup) / (decay - warmup)
    coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
@pytest.mark.parametrize(("warmup", "decay"), [(0, 37), (7, 37), (16, 100)])
def test_lr_matches_megatron_at_every_step(style, warmup, decay):
    cfg = ScheduleConfig(lr=1.0, min_lr=0.01, decay_style=style, warmup_iters=warmup,
                         decay_iters=decay)  # fmt: skip
    for s in range(1, 3 * decay):
        want = _megatron_lr(1.0, 0.01, style, warmup, decay, s)
        assert lr_at(cfg, s) == pytest.approx(want, rel=1e-12, abs=1e-15), (style, s)


def test_inverse_square_root_ends_at_min_lr_after_the_decay():
    # Megatron's "past lr_decay_steps: min_lr" comes before the inverse square root: with
    # --lr_decay_iters 100 the lr drops to min_lr at step 101 (it was 4 / sqrt(101) = 0.398).
    isr = ScheduleConfig(lr=1.0, min_lr=0.01, decay_style="inverse-square-root",
                         warmup_iters=16, decay_iters=100)  # fmt: skip
    assert lr_at(isr, 100) == pytest.approx(0.4)
    assert lr_at(isr, 101) == 0.01


# ----------------------------------------------------------------------------------------------
# the seed's argument lists: flags accepted without effect are named, not passed over


@pytest.mark.parametrize("stage", [1, 2])
def test_seed_flags_without_effect_are_named_in_the_notes(stage, capsys):
    args = ROOT / "configs" / "train" / f"llama2-70b-stage{stage}.args"
    assert main([f"@{args}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    notes = out[out.index("notes:") :]
    for flag in ("--use_flash_attn", "--no_bias_gelu_fusion", "--no_bias_dropout_fusion"):
        assert f"{flag}: accepted without effect" in notes, flag
    assert "--use_multiquery_attn" not in notes  # not in the seed's lists


def test_unknown_megatron_flags_are_errors_naming_them(capsys):
    args = ROOT / "configs" / "train" / "llama2-70b-stage2.args"
    for flag in ("--override_opt_param_scheduler", "--exit_on_missing_checkpoint"):
        assert main([f"@{args}", flag, "--dry_run"]) == 2
        assert f"unknown flag {flag}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# resuming under other schedule flags


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """Three steps of the tiny model (--train_iters 3: the decay ends there), saved."""
    tmp = tmp_path_factory.mktemp("sched")
    rc, dims, tok = tiny_run(["--train_iters", "3", "--lr_warmup_iters", "1"], tmp)
    trainer = Trainer(rc, dims, tok)
    run_training(rc, dims, trainer, SyntheticLoader(2, 64, 1), {}, None)
    return tmp / "ckpt"


def _resume_log(three_steps, tmp_path, capsys, train_iters: int):
    """(run config, what Trainer.load logs) resuming `three_steps` with --train_iters N."""
    extra = ["--train_iters", str(train_iters), "--lr_warmup_iters", "1", "--load",
             str(three_steps)]  # fmt: skip
    rc, dims, tok = tiny_run(extra, tmp_path)
    trainer = Trainer(rc, dims, tok)
    capsys.readouterr()
    trainer.load(rc.ckpt.load)
    return rc, capsys.readouterr().out


def test_resume_under_another_schedule_warns(three_steps, tmp_path, capsys):
    # An extended --train_iters moves the default --lr_decay_iters: the saved run had decayed to
    # min_lr, the resumed one jumps back up. Megatron-LLM refuses this resume by default.
    rc, out = _resume_log(three_steps, tmp_path, capsys, 6)
    assert "WARNING: resuming" in out and "decay_iters 3 -> 6" in out, out
    assert f"step 4 runs at lr {lr_at(rc.schedule, 4):.6E}" in out
    assert f"gave {rc.schedule.min_lr:.6E}" in out


def test_resume_under_the_same_schedule_is_quiet(three_steps, tmp_path, capsys):
    _, out = _resume_log(three_steps, tmp_path, capsys, 3)
    assert "schedule" not in out


# ----------------------------------------------------------------------------------------------
# throughput counts: interleaved 1F1B's filler micro-batches are not model work

_FILLER_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from parallel.dims import ParallelDims
from tests.train.helpers import TINY_ARGS, VOCAB, make_doc, pack_micro_batch
from train.args import parse_args
from train.resolve import resolve
from train.data import TokenizerInfo
from train.loop import Trainer
from train.metrics import causal_pairs

out = sys.argv[1]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=2)
torch.set_num_threads(1)
argv = [*TINY_ARGS, "--num_layers", "4", "--pipeline_model_parallel_size", "2",
        "--num_layers_per_virtual_pipeline_stage", "1", "--global_batch_size", "2"]
rc = resolve(*parse_args(argv), world_size=2)
rc.model = rc.model.replace(vocab_size=VOCAB)
dims = ParallelDims.build(1, 2, backend="gloo")
trainer = Trainer(rc, dims, TokenizerInfo(VOCAB, "synthetic", None, None, None, []))
assert trainer.pipe.v == 2
g = torch.Generator().manual_seed(0)
mb = pack_micro_batch([make_doc(g, n) for n in (20, 30, 9)], 2, 64)  # one: a filler makes two
res = trainer.train_step([mb], lr=0.0)
if rank == 1:
    with open(f"{out}/result.json", "w") as f:
        json.dump({"tokens": res.tokens, "pairs": res.pairs, "want_tokens": mb["tokens"].numel(),
                   "want_pairs": causal_pairs(mb["cu_seqlens"])}, f)
dist.destroy_process_group()
"""


def test_filler_micro_batches_are_not_counted_as_tokens_or_flops(tmp_path):
    # Interleaved 1F1B rounds a step's micro-batches up to a multiple of pp with fillers (no
    # loss tokens). They were counted as processed tokens and attention pairs: tokens/s, TFLOP/s
    # and MFU went up by the wasted work (here 2x).
    from tests.gloo_ranks import run_ranks

    worker = tmp_path / "worker.py"
    worker.write_text(_FILLER_WORKER)
    run_ranks(str(worker), [str(tmp_path)], 2, timeout=240, what="interleaved step")
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["tokens"] == got["want_tokens"] == 128
    assert got["pairs"] == got["want_pairs"]


# ----------------------------------------------------------------------------------------------
# the loop's bookkeeping: log-interval means, skipped steps, eval / save / exit intervals


def _scripted_run(extra: list[str], tmp_path, skip_at=(), stop_after=None, signal_at=None):
    """run_training over scripted steps (loss 10 x iteration, norm = iteration, skipped at
    `skip_at`): what the loop logs, evaluates and saves, without the model's arithmetic."""
    rc, dims, tok = tiny_run(extra, tmp_path)
    trainer = Trainer(rc, dims, tok)
    lrs, saved, evals = [], [], []

    def step(batch, lr):
        it = trainer.iteration + 1
        lrs.append(lr)
        skipped = it in skip_at
        trainer.skipped_total += skipped
        if it == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return StepResult(10.0 * it, 5, 128, 100, math.inf if skipped else float(it), skipped)

    def evaluate(mbs):
        evals.append(trainer.iteration)
        return {"loss": 1.0}

    trainer.train_step = step
    trainer.save = lambda state: saved.append(trainer.iteration)
    trainer.evaluate = evaluate
    history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 1), {"all": list}, None)
    return rc, trainer, history, lrs, saved, evals


def test_log_rows_average_the_advanced_steps_and_count_the_skipped(tmp_path):
    rc, trainer, history, lrs, _, _ = _scripted_run(
        ["--train_iters", "7", "--log_interval", "3"], tmp_path, skip_at=(2, 3)
    )
    rows = {r["iteration"]: r for r in history if r["type"] == "train"}
    assert sorted(rows) == [3, 6, 7]  # every log_interval, and the last iteration
    assert rows[3]["lm_loss"] == 10.0  # steps 2 and 3 were skipped: their losses are left out
    assert rows[6]["lm_loss"] == pytest.approx(50.0) and rows[7]["lm_loss"] == 70.0
    assert [rows[i]["skipped"] for i in (3, 6, 7)] == [2, 0, 0]
    assert rows[7]["skipped_total"] == 2 == trainer.skipped_total
    assert rows[3]["grad_norm"] == math.inf and rows[6]["grad_norm"] == 6.0  # the last step's
    assert [rows[i]["consumed_samples"] for i in (3, 6, 7)] == [12, 24, 28]
    # the schedule moves on skipped steps too: step s runs at lr(s)
    assert lrs == [lr_at(rc.schedule, s) for s in range(1, 8)]
    assert rows[6]["lr"] == lr_at(rc.schedule, 6)
    assert rows[6]["tokens_per_s"] > 0 and rows[6]["loss_tokens"] == 5


def test_eval_and_save_intervals_and_the_end(tmp_path):
    extra = ["--train_iters", "7", "--eval_interval", "3", "--eval_iters", "1",
             "--save_interval", "2"]  # fmt: skip
    _, _, history, _, saved, evals = _scripted_run(extra, tmp_path)
    assert evals == [3, 6, 7]  # every eval_interval, and once more at the end
    assert saved == [2, 4, 6, 7]  # every save_interval, and the end
    assert [r["iteration"] for r in history if r["type"] == "eval"] == [3, 6, 7]


def test_exit_interval_saves_and_stops(tmp_path):
    extra = ["--train_iters", "20", "--exit_interval", "5", "--save_interval", "4",
             "--eval_interval", "100", "--eval_iters", "1"]  # fmt: skip
    _, trainer, _, lrs, saved, evals = _scripted_run(extra, tmp_path)
    assert trainer.iteration == 5 and len(lrs) == 5
    assert saved == [4, 5]  # the exit saves what the interval did not
    assert evals == []  # an early exit skips the final evaluation (Megatron exits at once)


def test_exit_duration_saves_and_stops_after_the_first_late_iteration(tmp_path):
    extra = ["--train_iters", "20", "--exit_duration_in_mins", "1e-9", "--eval_interval", "100",
             "--eval_iters", "1"]  # fmt: skip
    _, trainer, _, lrs, saved, evals = _scripted_run(extra, tmp_path)
    assert trainer.iteration == 1 and saved == [1] and evals == []


def test_sigterm_under_exit_signal_handler_finishes_the_iteration_saves_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    extra = ["--train_iters", "20", "--exit_signal_handler", "--eval_interval", "100",
             "--eval_iters", "1", "--save_interval", "2"]  # fmt: skip
    # the scripted step of iteration 3 receives SIGTERM, as from a scheduler
    _, trainer, _, lrs, saved, evals = _scripted_run(extra, tmp_path, signal_at=3)
    assert trainer.iteration == 3 and len(lrs) == 3
    assert saved == [2, 3] and evals == []
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_exit_duration_must_be_positive(value):
    with pytest.raises(ArgsError, match=f"--exit_duration_in_mins {value}: must be > 0"):
        tiny_run(["--exit_duration_in_mins", value])


_STOP_WORKER = """
import json, os, signal, sys, time
import torch
import torch.distributed as dist
from train.config import LoopConfig
from train.stop import StopCheck

out = sys.argv[1]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=2)
loop = LoopConfig(20, 1, 2, 1, "global", False, "none", None, 1, 0, None,
                  exit_duration_in_mins=None, exit_signal_handler=True)
stopped = None
with StopCheck(loop, time.time(), torch.device("cpu")) as stops:
    for it in range(1, 8):
        if rank == 1 and it == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told
        reason = stops.reason(it)
        if reason:
            stopped = [it, reason]
            break
json.dump(stopped, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_iteration(tmp_path):
    # A rank that stopped alone would leave the others waiting in their next collective.
    from tests.gloo_ranks import run_ranks

    worker = tmp_path / "worker.py"
    worker.write_text(_STOP_WORKER)
    run_ranks(str(worker), [str(tmp_path)], 2, timeout=120, what="stop agreement")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] == [4, "SIGTERM received (--exit_signal_handler)"]
