"""train.main pinned in one process, with fakes for the ranks: `_on_every_rank`'s agreement, the
exit codes, the shutdown watchdog, the thread setting, the command line recorded, and the small
message helpers.

Found by a mutation pass: the multi-rank start-up and shutdown tests do not notice when a step's
agreement gets the default 1024 bytes instead of 4096, when a bug at world size 1 is also
printed as an error, when the watchdog's exit code or the error it prints are lost after an
exception, when the one-thread setting is dropped from training, or when the helpers' branches
flip."""

import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from train import main as main_mod
from train.main import _MESSAGE_BYTES, _on_every_rank, _Refused


def _dims(world: int, rank: int = 0):
    return SimpleNamespace(world_size=world, rank=rank)


def _tiny(*extra):
    return ["--model", "tiny", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--seq_length", "128", "--train_iters", "10", "--lr", "1e-3",
            "--data_path", "nowhere-train", *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# _on_every_rank


def test_at_world_size_one_a_bug_is_only_its_traceback(capsys):
    """A single process has no one to agree with: a bug (an exception not in `known`) goes out
    unchanged, without an "error:" line first (that line is for ranks that must say which rank
    printed the traceback), and a known exception becomes the user's message."""

    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        _on_every_rank(_dims(1), bug, (ValueError,))
    assert capsys.readouterr().err == ""

    def known():
        raise ValueError("--data_path x: no such file")

    with pytest.raises(_Refused, match="^--data_path x: no such file$"):
        _on_every_rank(_dims(1), known, (ValueError,))


def test_every_rank_agrees_with_the_wide_message_width(monkeypatch, capsys):
    """At world size > 1 every step ends in one agreement, also where this rank's step went
    through (the others may have failed; skipping it would leave them waiting), with 4096 bytes
    per rank: start-up messages name files and what to do, and 1024 would cut them."""
    calls = []

    def fake_agree(problem, width):
        calls.append((problem, width))
        return None if problem is None else f"rank 1: {problem}"

    monkeypatch.setattr(main_mod, "agree", fake_agree)
    assert _on_every_rank(_dims(2, 1), lambda: 42) == 42
    assert calls == [(None, _MESSAGE_BYTES)] and _MESSAGE_BYTES == 4096

    def missing():
        raise OSError("the data is not there")

    with pytest.raises(_Refused, match="^rank 1: the data is not there$"):
        _on_every_rank(_dims(2, 1), missing, (OSError,))
    assert calls[-1] == ("the data is not there", _MESSAGE_BYTES)

    def bug():
        raise KeyError("k")

    with pytest.raises(KeyError):  # this rank's own exception, for its traceback
        _on_every_rank(_dims(2, 1), bug)
    err = capsys.readouterr().err
    # the agreed message first, on this rank too
    assert "error: rank 1: KeyError: 'k' (unexpected; rank 1 printed its traceback)" in err


def test_a_known_exception_with_no_text_still_stops_the_ranks(one_rank):
    """A step that failed with an exception whose text is empty (OSError()) is agreed as a
    failure like any other: before, agree("") raised ValueError inside the collective on that
    rank only (torch.frombuffer refuses an empty buffer), so that rank left the agreement the
    others were waiting in. The message then says at least what was raised, not a bare
    "error: "."""

    def fails():
        raise OSError()

    with pytest.raises(_Refused, match=r"^OSError\(\)$"):
        _on_every_rank(_dims(2), fails, (OSError,))  # world 2 by dims: the agreement is real


# ----------------------------------------------------------------------------------------------
# train(): exit codes and the shutdown watchdog, on a faked 2-rank process group


def _train(monkeypatch, run, hang: bool):
    """train() with ParallelDims.build, the run and the process group faked; the watchdog's wait
    cut to 0.3 s and its os._exit recorded. A hanging shutdown returns once the watchdog has
    fired (or after 10 s). Returns (train's result or exception, [exit codes], destroyed)."""
    from parallel.dims import ParallelDims

    exits, destroyed, fired = [], [], threading.Event()
    monkeypatch.setattr(ParallelDims, "build", staticmethod(lambda *a, **k: _dims(2, 1)))
    monkeypatch.setattr(main_mod, "_set_up_and_run", run)
    monkeypatch.setattr(main_mod, "_SHUTDOWN_S", 0.3)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)

    def destroy():
        destroyed.append(True)
        if hang:
            fired.wait(10)

    def fake_exit(code):
        exits.append(code)
        fired.set()

    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(os, "_exit", fake_exit)
    rc = SimpleNamespace(parallel=SimpleNamespace(tp=1, pp=1, backend=None, timeout_minutes=1))
    try:
        out = main_mod.train(rc, [])
    except Exception as e:  # noqa: BLE001 - the test looks at it
        out = e
    time.sleep(0.6)  # past the watchdog's wait: one that should not fire has had its chance
    return out, exits, destroyed


def test_a_prompt_shutdown_leaves_the_exit_to_the_run(monkeypatch):
    """The process group is shut down after a run, and a shutdown that returns stops the
    watchdog: it must never exit a process (with its own idea of the code) that is already on
    its way out, or a long-lived caller later."""
    out, exits, destroyed = _train(monkeypatch, lambda *a: 0, hang=False)
    assert out == 0 and destroyed and exits == []


def test_a_hung_shutdown_after_a_refusal_exits_with_the_refusals_code(monkeypatch, capsys):
    """A start-up refusal is exit code 2 (the user's problem, as every other refusal), and the
    watchdog ends a rank whose shutdown hangs with that same code and says why."""

    def refused(*a):
        raise _Refused("--load x: not there")

    out, exits, _ = _train(monkeypatch, refused, hang=True)
    assert out == 2 and exits == [2]
    err = capsys.readouterr().err
    assert "error: --load x: not there" in err
    assert "did not shut down within 0 s" in err and "exiting with code 2" in err


def test_a_hung_shutdown_after_a_bug_exits_with_1_and_prints_the_bug(monkeypatch, capsys):
    """An exception on its way out of train is exit code 1; when the shutdown then hangs, the
    watchdog's os._exit would swallow the traceback Python prints at exit, so the watchdog prints
    it first, and exits with 1, not 0 (a job scheduler must not see success)."""

    def bug(*a):
        raise RuntimeError("a bug in the loop")

    out, exits, _ = _train(monkeypatch, bug, hang=True)
    assert isinstance(out, RuntimeError) and exits == [1]
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the loop" in err
    assert "exiting with code 1" in err


# ----------------------------------------------------------------------------------------------
# main(): the thread setting and the command line recorded


@pytest.mark.parametrize("omp", [None, "2"])
def test_training_on_the_cpu_takes_one_thread_unless_asked(tmp_path, monkeypatch, capsys, omp):
    """On the CPU, set-up sets one intra-op thread before its first step unless OMP_NUM_THREADS
    is set (OpenMP's spinning threads make a shared machine's training several times slower);
    a refused --load after it shows the set-up got there."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main_mod.main(_tiny("--load", str(tmp_path / "missing"))) == 2
    assert f"--load {tmp_path / 'missing'}" in capsys.readouterr().err
    assert calls == ([1] if omp is None else [])


def test_a_local_rank_past_the_visible_gpus_is_refused_by_name(monkeypatch, capsys):
    """A process whose LOCAL_RANK names no GPU it sees stops at set-up with the reason, before
    its first CUDA call (CUDA would say "invalid device ordinal" at the first allocation)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d})"))
    assert main_mod.main(_tiny()) != 0
    assert "LOCAL_RANK 5, but this process sees 2 GPUs" in capsys.readouterr().err


def test_the_command_line_recorded_is_without_the_program(monkeypatch):
    """`python -m train ARGS` records ARGS (sys.argv[1:]) in metrics.jsonl's run_start, the same
    list a caller passing argv gets recorded; not the program's path."""
    seen = []
    monkeypatch.setattr(main_mod, "train", lambda rc, argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["/somewhere/train/__main__.py", *_tiny()])
    assert main_mod.main() == 0
    assert main_mod.main(_tiny("--seed", "3")) == 0
    assert seen == [_tiny(), _tiny("--seed", "3")]


# ----------------------------------------------------------------------------------------------
# helpers


def test_git_commit_marks_a_dirty_checkout_only_when_dirty(monkeypatch):
    """The run's record names the commit, with "-dirty" only when tracked files differ from it
    (a clean checkout marked dirty, or the reverse, misleads whoever reproduces the run); None
    when git fails or is missing."""

    def fake(status_out, head_rc=0, raises=None):
        def run(cmd, **kw):
            if raises:
                raise raises
            if cmd[1] == "rev-parse":
                return SimpleNamespace(returncode=head_rc, stdout="abc123\n")
            return SimpleNamespace(returncode=0, stdout=status_out)

        monkeypatch.setattr(subprocess, "run", run)
        return main_mod._git_commit()

    assert fake("") == "abc123"
    assert fake(" M train/main.py\n") == "abc123-dirty"
    assert fake("", head_rc=128) is None
    assert fake("", raises=FileNotFoundError("git")) is None
    assert fake("", raises=subprocess.TimeoutExpired("git", 10)) is None


def test_unshared_save_message_names_rank_0_or_the_blind_ranks_and_hosts():
    """Rank 0 blind means its own --save is not writable; other ranks blind means node-local
    storage, named by rank and host."""
    assert main_mod._unshared_save_message("/s", [(0, "a")]) == (
        "--save /s: rank 0 cannot write a file there; give a writable directory"
    )
    one = main_mod._unshared_save_message("/s", [(2, "b")])
    assert one.startswith("--save /s: rank 2 (on b) do not see the file rank 0 wrote")
    two = main_mod._unshared_save_message("/s", [(2, "c"), (3, "b"), (5, "c")])
    assert two.startswith("--save /s: ranks 2, 3, 5 (on b, c) do not see") and "NFS" in two


def test_resume_hint_says_what_to_pass(tmp_path):
    """After Ctrl-C: the latest complete iteration and the flags that resume from it
    (--no_finetune too for a --finetune run, or the resumed run would restart at 0)."""

    def hint(save, finetune):
        ckpt = SimpleNamespace(save=save, finetune=finetune)
        return main_mod._resume_hint(SimpleNamespace(ckpt=ckpt))

    save = tmp_path / "ckpt"
    assert hint(None, False) == "no checkpoint was saved; start the run again"
    assert hint(str(save), False) == "no checkpoint was saved; start the run again"
    (save / "iter_0000004").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    assert hint(str(save), False).endswith(f"up to iteration 4; resume with --load {save}")
    assert hint(str(save), True).endswith(f"resume with --load {save} --no_finetune")


@pytest.mark.parametrize("denied", [os.W_OK, os.X_OK], ids=["not_writable", "not_searchable"])
def test_an_output_dir_needs_write_and_search_permission(tmp_path, monkeypatch, denied):
    """A directory the run cannot write into, or cannot enter (no x bit: no file in it can be
    opened), is refused at start-up, not at the first save hours in."""
    from tests.train.helpers import tiny_run

    save = tmp_path / "ckpt"
    rc, _, _ = tiny_run()
    rc.ckpt = rc.ckpt.__class__(**{**rc.ckpt.__dict__, "save": str(save)})
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(save) and m & denied else real(p, m)
    )
    assert main_mod._make_output_dirs(rc) == (
        f"--save {save}: the directory is not writable; give another"
    )


# ----------------------------------------------------------------------------------------------
# set-up order, the shared --save check and the seed, through main()


def test_a_refused_load_leaves_no_output_directory_behind(tmp_path, monkeypatch):
    """The paths are checked before any directory is made: a run that cannot start (here its
    --load does not exist) leaves no empty --save / --run_dir to confuse the next launch."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    save, run = tmp_path / "ckpt", tmp_path / "run"
    argv = _tiny("--load", str(tmp_path / "missing"), "--save", str(save), "--run_dir", str(run))
    assert main_mod.main(argv) == 2
    assert not save.exists() and not run.exists()


def test_a_save_dir_other_ranks_do_not_see_is_refused_before_the_data(
    tmp_path, monkeypatch, capsys
):
    """Every rank must see rank 0's --save (one checkpoint directory, shared storage): ranks
    that do not are refused at start-up, before the data is opened, not at the first save."""
    from train import shared_fs

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(shared_fs, "ranks_not_sharing", lambda save: [(1, "node-b")])
    assert main_mod.main(_tiny("--save", str(tmp_path / "ckpt"))) == 2
    err = capsys.readouterr().err
    assert "rank 1 (on node-b) do not see the file rank 0 wrote" in err
    assert "nowhere" not in err  # the data was not opened


def test_the_seed_is_offset_by_pipeline_stage_not_by_rank(monkeypatch):
    """Megatron's seeding: seed + 100 x pipeline rank, the same on every data-parallel rank (the
    replicas of a stage must draw the same stream). Rank 3 of a faked 4-rank world at pipeline
    rank 1; the run stops at the (missing) data after seeding."""
    from parallel.dims import ParallelDims

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dims = SimpleNamespace(world_size=4, rank=3, pp_rank=1, dp=1, dp_rank=0)
    monkeypatch.setattr(ParallelDims, "build", staticmethod(lambda *a, **k: dims))
    monkeypatch.setattr(main_mod, "agree", lambda problem, width: problem)
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", seeds.append)
    assert main_mod.main(_tiny("--seed", "7")) == 2
    assert seeds == [107]


# ----------------------------------------------------------------------------------------------
# the set-up steps after the paths, with the data, the model, the loop and telemetry faked


class _Fakes:
    """main() at world size 1 with open_datasets, eval_splits, make_loader, Trainer, Telemetry,
    _log_set_up and run_training faked; each fake can be told to raise, and records what it
    was given."""

    def __init__(self, monkeypatch):
        from train import data, loop, metrics, run

        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("RANK", raising=False)
        self.raises: dict[str, BaseException] = {}
        self.valid, self.splits = None, {}
        self.seen: dict[str, object] = {}
        self.closed = 0
        fakes = self

        def maybe(what):
            if what in fakes.raises:
                raise fakes.raises[what]

        def open_datasets(cfg):
            maybe("data")
            return SimpleNamespace(), fakes.valid, SimpleNamespace(vocab_size=300)

        class Trainer:
            iteration = 0

            def __init__(self, rc, dims, tok, device):
                maybe("trainer")
                fakes.seen["vocab_size"] = rc.model.vocab_size

        class Telemetry:
            def __init__(self, *a):
                maybe("telemetry")

            def run_start(self, iteration, info):
                fakes.seen["run_start"] = info

            def close(self):
                fakes.closed += 1

        def run_training(rc, dims, trainer, loader, eval_loaders, telemetry, started):
            fakes.seen["eval_loaders"] = sorted(eval_loaders)
            fakes.seen["telemetry"] = telemetry
            maybe("run")

        def log_set_up(rc, dims, trainer, device, t_setup, notes, train_ds, empty_valid):
            fakes.seen["empty_valid"] = empty_valid

        monkeypatch.setattr(data, "open_datasets", open_datasets)
        monkeypatch.setattr(data, "eval_splits", lambda valid: fakes.splits)
        monkeypatch.setattr(data, "make_loader", lambda *a: "loader")
        monkeypatch.setattr(loop, "Trainer", Trainer)
        monkeypatch.setattr(metrics, "Telemetry", Telemetry)
        monkeypatch.setattr(run, "run_training", run_training)
        monkeypatch.setattr(main_mod, "_log_set_up", log_set_up)
        monkeypatch.setattr(main_mod, "_git_commit", lambda: "abc")

    def main(self, *extra) -> int:
        return main_mod.main(_tiny("--no-activation_memory_report", *extra))


def test_the_model_takes_the_tokenizers_vocabulary(monkeypatch):
    """The data's tokenizer decides the vocabulary (the tiny preset says 32007, the data 300):
    a model built for another size would index past its embedding or train rows no token uses,
    and its checkpoint would not match the tokenizer it is used with."""
    fakes = _Fakes(monkeypatch)
    assert fakes.main() == 0
    assert fakes.seen["vocab_size"] == 300


@pytest.mark.parametrize(
    ("what", "error"),
    [
        ("data", OSError("--data_path x: x-text.idx: no such file")),
        ("data", ValueError("--data_path x: a bad index")),
        ("trainer", ValueError("--num_layers 3 does not split over 2 pipeline stages")),
        ("telemetry", OSError("wandb: cannot log in")),
    ],
    ids=["data_oserror", "data_valueerror", "model_valueerror", "telemetry_oserror"],
)
def test_the_users_problems_in_set_up_are_messages_not_tracebacks(monkeypatch, capsys, what, error):
    """The exceptions each set-up step expects from bad input (a missing or damaged data file,
    a model that does not fit the layout, W&B or a log file that cannot be opened) end the run
    with exit code 2 and their text, the way every start-up refusal does; not a traceback."""
    fakes = _Fakes(monkeypatch)
    fakes.raises[what] = error
    assert fakes.main() == 2
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize(
    ("error", "code"),
    [(None, 0), ("save", 2), (KeyboardInterrupt(), 130)],
    ids=["finished", "failed_save", "ctrl_c"],
)
def test_telemetry_is_closed_however_the_loop_ends(monkeypatch, error, code):
    """The metrics files and loggers are closed (flushed, W&B finished) after the loop, also
    when it ends in a failed save or Ctrl-C: their last rows say how the run ended."""
    from train import checkpoint as ckpt

    fakes = _Fakes(monkeypatch)
    if error == "save":
        error = ckpt.CheckpointError("saving iteration 4: disk full")
    if error is not None:
        fakes.raises["run"] = error
    assert fakes.main() == code
    assert fakes.closed == 1
    assert fakes.seen["run_start"]["git"] == "abc" and fakes.seen["run_start"]["load"] is None


@pytest.mark.parametrize(
    ("splits", "empty", "loaders"),
    [({}, True, []), ({"all": None}, False, ["all"]), ({"a": [1], "b": [2]}, False, ["a", "b"])],
)
def test_an_empty_validation_split_is_noted_and_others_are_evaluated(
    monkeypatch, splits, empty, loaders
):
    """A validation split with no samples is said at start-up (no validation in this run); one
    with samples gets one evaluation loader per dataset."""
    fakes = _Fakes(monkeypatch)
    fakes.valid, fakes.splits = SimpleNamespace(), splits
    assert fakes.main() == 0
    assert fakes.seen["empty_valid"] is empty and fakes.seen["eval_loaders"] == loaders


@pytest.mark.parametrize("rank", [0, 1])
def test_only_the_logging_rank_opens_telemetry(monkeypatch, rank):
    """Of a (faked) 2-rank world only the last rank, the logging one, opens the metrics files and
    loggers: every rank appending to one metrics.jsonl, or starting its own W&B run, would
    repeat each row world-size times."""
    from parallel.dims import ParallelDims

    fakes = _Fakes(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    dims = SimpleNamespace(world_size=2, rank=rank, pp_rank=0, dp=2, dp_rank=rank)
    monkeypatch.setattr(ParallelDims, "build", staticmethod(lambda *a, **k: dims))
    monkeypatch.setattr(main_mod, "agree", lambda problem, width: problem)
    assert fakes.main() == 0
    assert (fakes.seen["telemetry"] is not None) == (rank == 1)
    assert fakes.closed == (rank == 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_ctrl_c_is_explained_by_the_logging_rank_only(monkeypatch, capsys, rank):
    """Ctrl-C reaches every rank; one of them (the logging rank) says what is intact and how to
    resume, instead of world-size copies of the same lines; every rank exits with 130."""
    from parallel.dims import ParallelDims

    fakes = _Fakes(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    dims = SimpleNamespace(world_size=2, rank=rank, pp_rank=0, dp=2, dp_rank=rank)
    monkeypatch.setattr(ParallelDims, "build", staticmethod(lambda *a, **k: dims))
    monkeypatch.setattr(main_mod, "agree", lambda problem, width: problem)
    fakes.raises["run"] = KeyboardInterrupt()
    assert fakes.main() == 130
    said = capsys.readouterr().err
    assert ("interrupted: no checkpoint was saved" in said) == (rank == 1), said


def test_settings_that_need_a_later_part_are_refused_before_any_work(monkeypatch, capsys):
    """A configuration resolve marks as not runnable yet ends with exit code 2 and the list of
    what is missing, before a process group or a model is made (a dry run still describes it)."""
    real = main_mod.resolve

    def resolve(ns, given):
        rc = real(ns, given)
        rc.deferred.append("--some_flag: arrives later")
        return rc

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(main_mod, "resolve", resolve)
    monkeypatch.setattr(main_mod, "train", lambda *a: pytest.fail("train was started"))
    assert main_mod.main(_tiny()) == 2
    assert capsys.readouterr().err == (
        "error: these settings need a later part of the project:\n  - --some_flag: arrives later\n"
    )
    assert main_mod.main(_tiny("--dry_run")) == 0
