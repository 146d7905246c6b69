"""Behaviour a mutation pass over train/checkpoint.py, train/run.py and train/stop.py found
unpinned: each test kills mutants that the other tests let through (a changed comparison, a
dropped check, a skipped fsync or cleanup), so a change that could lose a user's checkpoints,
resume at the wrong place or ignore a stop request fails here."""

import dataclasses
import errno
import json
import math
import os
import signal
import time
import types

import pytest
import torch

import train.run
import train.stop
from model.config import ModelConfig
from tests.train.helpers import SyntheticLoader, fs_events, tiny_run
from train import checkpoint as ckpt
from train.config import LoopConfig
from train.loop import StepResult, Trainer
from train.run import run_training
from train.stop import StopCheck

CFG = ModelConfig(name="mut", vocab_size=40, hidden_size=32, ffn_hidden_size=48, num_layers=1,
                  num_attention_heads=2, num_kv_heads=2, max_position_embeddings=16,
                  make_vocab_size_divisible_by=8)  # fmt: skip


def _write(save, iteration: int):
    sd = {n: torch.randn(s) for n, s in CFG.param_shapes().items()}
    return ckpt.write_full_checkpoint(save, iteration, sd, {"model": CFG.to_dict()})


def _save(save, iteration: int, optim: bool = True):
    """save_checkpoint as one process (TP 1, PP 1, DP 1) of a run with trainer state."""
    params = {n: torch.randn(s) for n, s in CFG.param_shapes(CFG.padded_vocab_size(1)).items()}
    optim_state = (
        {k: {n: torch.randn_like(t) for n, t in params.items()} for k in ckpt.OPTIM_KINDS}
        if optim
        else None
    )
    meta = {"model": CFG.to_dict(), "has_trainer_state": True, "has_optimizer": optim,
            "consumed_train_samples": 4 * iteration,
            "optimizer": {"step": iteration, "skipped": 0}}  # fmt: skip
    return ckpt.save_checkpoint(save, iteration, params=params, optim_state=optim_state,
                                meta=meta, rank_state={"loader": {"step": iteration}},
                                ranks=(0, 0, 0, 0))  # fmt: skip


def _edit_meta(iter_dir, **changes) -> None:
    path = iter_dir / ckpt.META_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# the latest file and --load


def test_a_latest_file_that_is_not_a_number_is_refused_not_read_as_iteration_zero(tmp_path):
    """Text that is no number was once the same as -1 (refused); read as 0 instead, a save dir
    holding a weights-only iteration 0 (an imported model) would silently resume from it."""
    _write(tmp_path, 0)
    _write(tmp_path, 4)
    (tmp_path / ckpt.LATEST_FILE).write_text("four\n")
    with pytest.raises(ckpt.CheckpointError, match="expected an iteration number .* 'four'"):
        ckpt.latest_iteration(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="expected an iteration number"):
        ckpt.resolve_iteration_dir(tmp_path)


def test_release_in_the_latest_file_is_megatron_only_with_a_release_directory(tmp_path):
    """Megatron-LM names its release checkpoint 'release' (with a release/ directory beside):
    only then is the directory called a Megatron-LM checkpoint; a hand-written 'release\\n' is
    still recognised (the text is stripped), and 'release' alone is a damaged latest file."""
    _write(tmp_path, 2)
    (tmp_path / ckpt.LATEST_FILE).write_text("release")
    with pytest.raises(ckpt.CheckpointError, match="expected an iteration number") as e:
        ckpt.resolve_iteration_dir(tmp_path)
    assert "Megatron" not in str(e.value) and "iter_0000002" in str(e.value)
    (tmp_path / "release").mkdir()
    (tmp_path / ckpt.LATEST_FILE).write_text("release\n")
    with pytest.raises(ckpt.CheckpointError, match="a Megatron-LM checkpoint"):
        ckpt.resolve_iteration_dir(tmp_path)


def test_a_damaged_latest_file_names_the_five_newest_complete_iterations_in_order(tmp_path):
    """The hint lists the newest complete iterations, oldest first, whatever order the file
    system lists them in."""
    for it in (5, 1, 7, 3, 2, 6, 4):
        (tmp_path / ckpt.iteration_dir_name(it)).mkdir()
        (tmp_path / ckpt.iteration_dir_name(it) / ckpt.META_FILE).write_text("{}")
    (tmp_path / ckpt.LATEST_FILE).write_text("x")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.latest_iteration(tmp_path)
    names = ", ".join(ckpt.iteration_dir_name(i) for i in range(3, 8))
    assert f"complete iterations here: {names};" in str(e.value)


def test_a_latest_file_name_that_is_a_directory_is_no_latest_file(tmp_path):
    """Only a file is a latest file: a directory of that name reads as no latest file (a save
    dir without one), not as an unreadable one."""
    (tmp_path / ckpt.LATEST_FILE).mkdir()
    assert ckpt.latest_iteration(tmp_path) is None


def test_an_old_copy_without_meta_is_not_offered_as_the_previous_iteration(tmp_path):
    """After an interrupted re-save the message offers .old_iter_X only when it is complete; a
    half-deleted one would be a second broken checkpoint."""
    d = _write(tmp_path, 1)
    _write(tmp_path, 3)
    (d / ckpt.META_FILE).unlink()
    old = tmp_path / ".old_iter_0000001"
    old.mkdir()
    (tmp_path / ckpt.LATEST_FILE).write_text("1")
    with pytest.raises(ckpt.CheckpointError, match="meta.json is missing") as e:
        ckpt.resolve_iteration_dir(tmp_path)
    assert "rename it" not in str(e.value) and "iter_0000003" in str(e.value)


# ----------------------------------------------------------------------------------------------
# meta.json: what a resume reads is checked


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"iteration": True}, "'iteration'"),  # a bool is an int to Python, not to us
        (
            {"has_trainer_state": True, "consumed_train_samples": -4, "optimizer": {"step": 1}},
            "'consumed_train_samples'",
        ),
        (
            {"has_trainer_state": True, "consumed_train_samples": 4, "optimizer": {"step": "1"}},
            "'optimizer.step'",
        ),
        ({"version": ckpt.FORMAT_VERSION + 1}, "newer than this code"),
    ],
)
def test_a_damaged_or_newer_meta_is_refused_naming_the_key(tmp_path, changes, key):
    d = _write(tmp_path, 2)
    _edit_meta(d, **changes)
    with pytest.raises(ckpt.CheckpointError, match=key):
        ckpt.read_meta(d)


def test_missing_shard_directories_are_named_at_any_tp_and_pp(tmp_path):
    """A TP 1 checkpoint saved over 3 pipeline stages, copied with only the first stage's
    directory: both missing directories are named (and 'are', for two)."""
    d = _write(tmp_path, 2)
    _edit_meta(d, layout={"tp": 1, "pp": 3, "dp": 1})
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"TP 1 / PP 3 .* \['mp_rank_00_001', 'mp_rank_00_002'\] are missing",
    ):
        ckpt.read_meta(d)


# ----------------------------------------------------------------------------------------------
# saving: temp dir, fsync, rename, latest file


def test_the_latest_file_is_flushed_renamed_and_its_directory_flushed(tmp_path, monkeypatch):
    """The latest file is written under another name and fsynced before the rename that
    replaces it (else a power loss could leave it empty), and the directory is fsynced after
    that rename, before pruning deletes what the old latest file named."""
    save = (tmp_path / "save").resolve()
    _save(save, 1)
    events = fs_events(monkeypatch)
    _save(save, 2)
    latest = str(save / ckpt.LATEST_FILE)
    (i,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == latest]
    src = events[i][1]
    assert src != latest
    assert ("fsync", src, "") in events[:i]
    assert ("fsync", str(save), "") in events[i + 1 :]


def test_a_failed_rename_of_the_latest_file_leaves_it_naming_the_previous(tmp_path, monkeypatch):
    """The latest file is never written in place: a failure while replacing it keeps the old
    one whole."""
    _save(tmp_path, 1)
    real = os.replace

    def fail_latest(src, dst):
        if str(dst).endswith(ckpt.LATEST_FILE):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_latest)
    with pytest.raises(ckpt.CheckpointError, match="still names iteration 1, which is intact"):
        _save(tmp_path, 2)
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert ckpt.latest_iteration(tmp_path) == 1


def _fsync_failing(monkeypatch, on_dir: bool, err: int) -> None:
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") == on_dir:
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_refusing_directory_fsync_still_saves(tmp_path, monkeypatch, err):
    _fsync_failing(monkeypatch, on_dir=True, err=err)
    d = _save(tmp_path, 3)
    assert ckpt.resolve_iteration_dir(tmp_path) == d


@pytest.mark.parametrize(("on_dir", "err"), [(True, errno.EIO), (False, errno.EINVAL)])
def test_an_fsync_error_fails_the_save_and_keeps_the_previous(tmp_path, monkeypatch, on_dir, err):
    """A directory's EIO, or any error on a file, means the data may not be on the disk: the
    save fails rather than naming an iteration that a power loss could empty."""
    _save(tmp_path, 1)
    _fsync_failing(monkeypatch, on_dir=on_dir, err=err)
    with pytest.raises(ckpt.CheckpointError, match="still names iteration 1, which is intact"):
        _save(tmp_path, 2)
    assert ckpt.latest_iteration(tmp_path) == 1
    assert not (tmp_path / ckpt.iteration_dir_name(2)).exists()


def test_a_failed_save_over_a_damaged_previous_does_not_call_it_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    (tmp_path / ckpt.iteration_dir_name(1) / ckpt.META_FILE).unlink()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_safetensors", disk_full)
    with pytest.raises(ckpt.CheckpointError) as e:
        _save(tmp_path, 2)
    assert "intact" not in str(e.value)
    assert "no earlier checkpoint there was changed" in str(e.value)


def test_a_failed_save_over_a_damaged_latest_file_still_says_what_failed(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    (tmp_path / ckpt.LATEST_FILE).write_text("garbage")

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_safetensors", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="saving iteration 2 .* No space left"):
        _save(tmp_path, 2)


def test_a_crashed_saves_leftovers_do_not_block_or_leak_into_the_next_save(tmp_path):
    """A killed save leaves .tmp_iter_X (and a killed re-save .old_iter_X): the next save of
    that iteration replaces them, and none of their files end up in the checkpoint."""
    _save(tmp_path, 2)
    stale = tmp_path / ".tmp_iter_0000003"
    (stale / "mp_rank_07_000").mkdir(parents=True)
    (stale / "junk").write_text("x")
    old = tmp_path / ".old_iter_0000002"
    old.mkdir()
    (old / "junk").write_text("x")
    d = _save(tmp_path, 3)
    assert sorted(p.name for p in d.iterdir()) == [ckpt.META_FILE, "mp_rank_00_000"]
    _save(tmp_path, 2)  # a re-save with a stale .old_ copy in the way
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002",
        "iter_0000003",
        ckpt.LATEST_FILE,
    ]
    assert ckpt.latest_iteration(tmp_path) == 2


def test_a_resave_moves_the_previous_copy_aside_by_a_rename(tmp_path, monkeypatch):
    """The previous copy of a re-saved iteration is renamed out of the way (atomic), never
    copied and deleted (a crash in between would leave half of it where --load looks)."""
    save = (tmp_path / "save").resolve()
    _save(save, 4)
    events = fs_events(monkeypatch)
    _save(save, 4)
    final = save / ckpt.iteration_dir_name(4)
    assert ("replace", str(final), str(save / ".old_iter_0000004")) in events


def test_a_save_without_optimizer_state_writes_no_optimizer_file(tmp_path):
    """--no_save_optim: optim_state None; the shard holds weights and the rank state only."""
    d = _save(tmp_path, 1, optim=False)
    assert sorted(p.name for p in (d / "mp_rank_00_000").iterdir()) == [
        ckpt.MODEL_FILE,
        ckpt.state_file_name(0),
    ]
    assert ckpt.read_meta(d)["has_optimizer"] is False


# ----------------------------------------------------------------------------------------------
# pruning (--keep_last_n_checkpoints)


def _fake_iteration(save, name: str):
    d = save / name
    d.mkdir(parents=True)
    (d / ckpt.META_FILE).write_text("{}")
    return d


def test_prune_orders_iterations_by_number_not_by_name(tmp_path):
    """Past iteration 9,999,999 the directory names grow a digit: by name iter_10000000 sorts
    below iter_9999999, and the newer checkpoint would be the one deleted."""
    for it in (9_999_998, 9_999_999, 10_000_000, 10_000_001):
        _fake_iteration(tmp_path, ckpt.iteration_dir_name(it))
    (tmp_path / ckpt.LATEST_FILE).write_text("10000001\n")
    gone = ckpt.prune_iterations(tmp_path, 10_000_001, keep=2)
    assert sorted(p.name for p in gone) == ["iter_9999998", "iter_9999999"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_10000000", "iter_10000001"]


def test_prune_leaves_a_users_copy_with_another_name_alone(tmp_path):
    """iter_0000100.bak (a user's copy) is not a number: pruning skips it instead of failing
    with a ValueError, which the trainer (catching OSError and CheckpointError) would not
    survive."""
    for name in ("iter_0000100", "iter_0000100.bak", "iter_0000200"):
        _fake_iteration(tmp_path, name)
    (tmp_path / ckpt.LATEST_FILE).write_text("200\n")
    assert ckpt.prune_iterations(tmp_path, 200, keep=1) == [tmp_path / "iter_0000100"]
    assert (tmp_path / "iter_0000100.bak").is_dir()


# ----------------------------------------------------------------------------------------------
# rank state files


def _state(iter_dir, tp: int, pp: int, dp: int) -> None:
    d = iter_dir / ckpt.shard_dir_name(tp, pp)
    d.mkdir(parents=True, exist_ok=True)
    (d / ckpt.state_file_name(dp)).write_text(json.dumps({"from": [tp, pp, dp]}))


def test_rank_state_of_another_layout(tmp_path):
    """A rank the checkpoint has no file for gets None from read_rank_state; find_rank_state
    gives the first file in (tp, pp, dp) order of the asked pipeline stage (whose RNG stream it
    restores), or of any stage."""
    for tp, pp, dp in [(1, 1, 1), (1, 1, 0), (0, 1, 1), (0, 1, 0), (1, 0, 0), (0, 0, 1)]:
        _state(tmp_path, tp, pp, dp)
    assert ckpt.read_rank_state(tmp_path, 2, 0, 0) is None
    assert ckpt.read_rank_state(tmp_path, 1, 1, 1) == {"from": [1, 1, 1]}
    assert ckpt.find_rank_state(tmp_path, pp_rank=1) == {"from": [0, 1, 0]}
    assert ckpt.find_rank_state(tmp_path, pp_rank=0) == {"from": [0, 0, 1]}
    assert ckpt.find_rank_state(tmp_path) == {"from": [0, 0, 1]}
    assert ckpt.find_rank_state(tmp_path, pp_rank=2) is None


def test_each_rank_writes_its_own_files_into_its_shard_directory(tmp_path):
    """Of one save, a rank writes its (tp, pp) shard's weights and optimizer state only at DP
    rank 0 (the others hold replicas), its own state_dp{dp}.json always, and meta.json only as
    global rank 0. Each rank alone, into its own directory: the files it owns."""
    params = {n: torch.randn(s) for n, s in CFG.param_shapes(CFG.padded_vocab_size(1)).items()}
    optim = {k: {n: torch.randn_like(t) for n, t in params.items()} for k in ckpt.OPTIM_KINDS}
    owned = {}
    for ranks in [(0, 0, 0, 0), (5, 1, 2, 0), (6, 1, 2, 3)]:
        tmp = tmp_path / str(ranks[0])
        tmp.mkdir()
        ckpt._write_rank_files(tmp, params, optim, {"m": 1}, {"r": ranks[0]}, ranks)
        owned[ranks[0]] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    assert owned == {
        0: ["meta.json", "mp_rank_00_000/model.safetensors",
            "mp_rank_00_000/optim_dp000.safetensors", "mp_rank_00_000/state_dp000.json"],
        5: ["mp_rank_01_002/model.safetensors", "mp_rank_01_002/optim_dp000.safetensors",
            "mp_rank_01_002/state_dp000.json"],
        6: ["mp_rank_01_002/state_dp003.json"],
    }  # fmt: skip


_BUG_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["PYTHONPATH"])
from model.config import ModelConfig
from train import checkpoint as ckpt

out = sys.argv[1]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"file://{out}/rdzv", rank=rank, world_size=2)
cfg = ModelConfig(name="t", vocab_size=40, hidden_size=32, ffn_hidden_size=48, num_layers=1,
                  num_attention_heads=2, num_kv_heads=2, max_position_embeddings=16,
                  make_vocab_size_divisible_by=8)
params = {n: torch.zeros(s) for n, s in cfg.param_shapes(cfg.padded_vocab_size(1)).items()}
meta = {"model": cfg.to_dict()}
if rank == 1:
    def buggy(path, obj):
        raise TypeError("a bug, not the disk")
    ckpt._write_json = buggy
try:
    ckpt.save_checkpoint(f"{out}/save", 1, params=params, optim_state=None, meta=meta,
                         rank_state={}, ranks=(rank, 0, 0, rank))
    got = None
except Exception as e:
    got = [type(e).__name__, str(e)]
json.dump(got, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_a_bug_in_one_ranks_save_keeps_its_own_traceback_there(tmp_path):
    """A rank whose part of a save fails with something other than an OSError (a bug) raises
    that exception itself, for its traceback; the other ranks fail with the save message naming
    it. Made an OSError like a full disk, the bug would read as a disk problem."""
    from tests.gloo_ranks import run_ranks

    worker = tmp_path / "worker.py"
    worker.write_text(_BUG_WORKER)
    run_ranks(str(worker), [str(tmp_path)], 2, 120, "a save with a bug on one rank")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[1] == ["TypeError", "a bug, not the disk"]
    assert got[0][0] == "CheckpointError" and "rank 1: a bug, not the disk" in got[0][1]
    assert not (tmp_path / "save" / ckpt.LATEST_FILE).exists()


def test_a_rank_state_that_is_not_an_object_is_refused(tmp_path):
    """Named here, not as an AttributeError where the loader state is read from it."""
    _state(tmp_path, 0, 0, 0)
    path = tmp_path / ckpt.shard_dir_name(0, 0) / ckpt.state_file_name(0)
    path.write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="expected a JSON object, found list"):
        ckpt.read_rank_state(tmp_path, 0, 0, 0)


# ----------------------------------------------------------------------------------------------
# the loop (train/run.py), over scripted steps and a clock that only the steps move


class _Telemetry:
    """The logging rank's Telemetry, minus the files: records what would be written."""

    def __init__(self):
        self.records = []

    def record(self, kind, it, row, section):
        self.records.append((kind, it))


def _scripted(extra: list[str], tmp_path, monkeypatch, *, save=True, skip_at=(), evals=True,
              rc_change=None, load_at=0, on_step=None, logging=True):  # fmt: skip
    """run_training over scripted steps (loss 10 x iteration; skipped at `skip_at`), each of
    which takes exactly one second of a fake clock: timings in the rows are exact. logging:
    run as the logging rank (a telemetry stand-in) or as any other rank (None).
    Returns (trainer, history, saved iterations, evaluated iterations)."""
    rc, dims, tok = tiny_run(extra, tmp_path if save else None)
    if rc_change:
        rc.ckpt = dataclasses.replace(rc.ckpt, **rc_change)
    trainer = Trainer(rc, dims, tok)
    trainer.iteration = load_at  # as if resumed there
    trainer.consumed_samples = load_at * rc.loop.global_batch_size
    saved, evaluated = [], []
    now = [1000.0]
    monkeypatch.setattr(train.run, "time", types.SimpleNamespace(
        perf_counter=lambda: now[0], time=time.time))  # fmt: skip

    def step(batch, lr):
        it = trainer.iteration + 1
        now[0] += 1.0
        if on_step:
            on_step(it)
        skipped = it in skip_at
        trainer.skipped_total += skipped
        return StepResult(10.0 * it, 5, 128, 100, math.inf if skipped else 1.0, skipped)

    def evaluate(mbs):
        evaluated.append(trainer.iteration)
        return {"loss": 1.0}

    trainer.train_step = step
    trainer.save = lambda state: saved.append(trainer.iteration)
    trainer.evaluate = evaluate
    history = run_training(rc, dims, trainer, SyntheticLoader(2, 64, 1),
                           {"all": list} if evals else {},
                           _Telemetry() if logging else None)  # fmt: skip
    return trainer, history, saved, evaluated


def test_only_the_logging_rank_prints_the_loop_s_lines(tmp_path, monkeypatch, capsys):
    """Every rank runs the loop; only the logging rank (the one with telemetry) prints, so an
    exit or a finished run's "nothing to train" reads once, not once per rank."""
    _scripted(["--train_iters", "9", "--exit_interval", "2", "--log_interval", "1"], tmp_path,
              monkeypatch, logging=False)  # fmt: skip
    _scripted(["--train_iters", "2"], tmp_path, monkeypatch, load_at=2, logging=False)
    assert capsys.readouterr().out == ""
    _scripted(["--train_iters", "9", "--exit_interval", "2", "--log_interval", "1"], tmp_path,
              monkeypatch)  # fmt: skip
    _scripted(["--train_iters", "2"], tmp_path, monkeypatch, load_at=2)
    out = capsys.readouterr().out
    assert out.count("exiting at iteration 2") == 1 and out.count("nothing to train") == 1
    assert out.count(" iteration        1/       9 |") == 1, out


def test_without_save_interval_only_the_last_iteration_is_saved(tmp_path, monkeypatch):
    """--save without --save_interval: one checkpoint, at --train_iters, not one per step."""
    _, _, saved, _ = _scripted(["--train_iters", "4"], tmp_path, monkeypatch)
    assert saved == [4]


def test_without_save_nothing_is_saved_not_even_at_an_exit(tmp_path, monkeypatch, capsys):
    """No --save: neither the last iteration nor an --exit_interval stop calls save, and the
    exit line offers no --load to resume from."""
    _, _, saved, _ = _scripted(["--train_iters", "3"], tmp_path, monkeypatch, save=False)
    assert saved == []
    trainer, _, saved, _ = _scripted(["--train_iters", "9", "--exit_interval", "2"], tmp_path,
                                     monkeypatch, save=False)  # fmt: skip
    assert trainer.iteration == 2 and saved == []
    out = capsys.readouterr().out
    assert "exiting at iteration 2: --exit_interval 2" in out and "resume with" not in out


def test_the_exit_line_of_a_finetune_run_resumes_with_no_finetune(tmp_path, monkeypatch, capsys):
    """A --finetune run's own checkpoint must be resumed without --finetune (which would load
    its weights only and restart at iteration 0): the exit line says --no_finetune."""
    _scripted(["--train_iters", "9", "--exit_interval", "2"], tmp_path, monkeypatch,
              rc_change={"finetune": True})  # fmt: skip
    out = capsys.readouterr().out
    assert f"resume with --load {tmp_path / 'ckpt'} --no_finetune" in out


def test_an_exit_interval_at_the_last_iteration_is_a_normal_end(tmp_path, monkeypatch, capsys):
    """The run ending at --train_iters is no early exit, even where --exit_interval divides it:
    one save, the final evaluation, no 'exiting' line."""
    extra = ["--train_iters", "6", "--exit_interval", "3", "--eval_interval", "4",
             "--eval_iters", "1"]  # fmt: skip
    trainer, _, saved, evaluated = _scripted(extra, tmp_path, monkeypatch, load_at=3)
    assert trainer.iteration == 6 and saved == [6] and evaluated == [4, 6]
    assert "exiting" not in capsys.readouterr().out


def test_an_exit_interval_one_before_the_end_stops_there(tmp_path, monkeypatch):
    """The stop check runs after every iteration before the last, the one before it too."""
    extra = ["--train_iters", "6", "--exit_interval", "5"]
    trainer, _, saved, _ = _scripted(extra, tmp_path, monkeypatch)
    assert trainer.iteration == 5 and saved == [5]


def test_eval_iters_zero_never_evaluates(tmp_path, monkeypatch):
    """--eval_iters 0 turns evaluation off, on the intervals as at the end."""
    extra = ["--train_iters", "5", "--eval_interval", "2", "--eval_iters", "0"]
    _, history, _, evaluated = _scripted(extra, tmp_path, monkeypatch)
    assert evaluated == [] and not [r for r in history if r["type"] == "eval"]


def test_row_timings_count_skipped_steps_and_eta_counts_from_the_resume(tmp_path, monkeypatch):
    """Each scripted step takes one second: iter_ms is the interval's time over all its steps
    (skipped ones too), eta_s the remaining iterations at the rate since this run's start (a
    resumed run's earlier iterations took none of its time), and an interval of skipped steps
    only has no loss (NaN, not 0)."""
    extra = ["--train_iters", "10", "--log_interval", "2"]
    _, history, _, _ = _scripted(extra, tmp_path, monkeypatch, skip_at=(5, 7, 8), load_at=4)
    rows = {r["iteration"]: r for r in history if r["type"] == "train"}
    assert sorted(rows) == [6, 8, 10]
    assert [rows[i]["iter_ms"] for i in (6, 8, 10)] == [1000.0, 1000.0, 1000.0]
    assert [rows[i]["eta_s"] for i in (6, 8, 10)] == [4.0, 2.0, 0.0]
    assert rows[6]["lm_loss"] == 60.0 and math.isnan(rows[8]["lm_loss"])
    assert rows[8]["skipped"] == 2 and rows[10]["consumed_samples"] == 10 * 4


def test_the_profile_window_covers_exactly_its_steps(tmp_path, monkeypatch):
    """--profile_step_start 2 --profile_step_end 4 profiles iterations 2 and 3, not 4."""

    def mark(it):
        with torch.profiler.record_function(f"scripted_iteration_{it}"):
            torch.ones(2).add_(it)

    extra = ["--train_iters", "5", "--profile", "--profile_step_start", "2",
             "--profile_step_end", "4"]  # fmt: skip
    _scripted(extra, tmp_path, monkeypatch, evals=False, on_step=mark)
    trace = json.loads((tmp_path / "ckpt" / "profile" / "rank0-iter2-4.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    marks = sorted(n for n in names if n.startswith("scripted_iteration_"))
    assert marks == ["scripted_iteration_2", "scripted_iteration_3"]


# ----------------------------------------------------------------------------------------------
# stopping (train/stop.py)


def _loop(**kw) -> LoopConfig:
    rc, _, _ = tiny_run()
    return dataclasses.replace(rc.loop, **kw)


@pytest.mark.parametrize(("minutes_ago", "late"), [(0.5, False), (1.0, False), (1.5, True)])
def test_exit_duration_counts_minutes_since_the_start(monkeypatch, minutes_ago, late):
    """--exit_duration_in_mins 1 stops once more than one minute has passed since `started`
    (the run's start, not the loop's): a fixed clock, no waiting."""
    monkeypatch.setattr(train.stop, "time", types.SimpleNamespace(time=lambda: 6000.0))
    loop = _loop(exit_duration_in_mins=1.0)
    with StopCheck(loop, 6000.0 - 60 * minutes_ago, torch.device("cpu")) as stops:
        got = stops.reason(3)
    assert got == ("the run has lasted over --exit_duration_in_mins 1.0" if late else None)


def test_run_training_measures_the_duration_from_the_given_start(tmp_path, monkeypatch):
    """`started` (the process's start, set-up included, as Megatron) is the origin, not the
    loop's first step: two minutes of set-up exceed --exit_duration_in_mins 1 at once."""
    monkeypatch.setattr(train.stop, "time", types.SimpleNamespace(time=lambda: 6000.0))
    rc, dims, tok = tiny_run(["--train_iters", "5", "--exit_duration_in_mins", "1"], tmp_path)
    trainer = Trainer(rc, dims, tok)
    trainer.train_step = lambda batch, lr: StepResult(1.0, 5, 128, 100, 1.0, False)
    trainer.save = lambda state: None
    run_training(rc, dims, trainer, SyntheticLoader(2, 64, 1), {}, None, started=6000.0 - 120)
    assert trainer.iteration == 1


def test_sigterm_is_left_alone_without_exit_signal_handler():
    """Without --exit_signal_handler a SIGTERM must end the process as before (the scheduler
    kills the job); a handler installed anyway would swallow it, since nothing reads the flag."""
    before = signal.getsignal(signal.SIGTERM)
    with StopCheck(_loop(exit_signal_handler=False), 0.0, torch.device("cpu")):
        assert signal.getsignal(signal.SIGTERM) is before
    with StopCheck(_loop(exit_signal_handler=True), 0.0, torch.device("cpu")) as stops:
        assert signal.getsignal(signal.SIGTERM) == stops._on_signal
    assert signal.getsignal(signal.SIGTERM) is before
