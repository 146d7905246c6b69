"""--keep_last_n_checkpoints: after a save, the run's older iterations beyond the newest N are
deleted, and nothing else (other runs' higher iterations, incomplete or temporary directories)."""

import json

import pytest
import torch

from tests.train.helpers import SyntheticLoader, tiny_run
from train import checkpoint as ckpt
from train.loop import Trainer
from train.run import run_training


def _fake_iteration(save, it: int, complete: bool = True):
    d = save / ckpt.iteration_dir_name(it)
    d.mkdir(parents=True)
    if complete:
        (d / "meta.json").write_text(json.dumps({"iteration": it}))
    return d


def test_prune_keeps_the_newest_and_touches_nothing_else(tmp_path):
    save = tmp_path / "ckpt"
    for it in (100, 200, 300, 400):
        _fake_iteration(save, it)
    partial = _fake_iteration(save, 150, complete=False)  # an interrupted save: not ours to judge
    higher = _fake_iteration(save, 900)  # an earlier run's, numbered above this run's
    (save / ".tmp_iter_0000500").mkdir()
    (save / ckpt.LATEST_FILE).write_text("400\n")
    gone = ckpt.prune_iterations(save, 400, keep=2)
    assert sorted(p.name for p in gone) == ["iter_0000100", "iter_0000200"]
    left = sorted(p.name for p in save.iterdir())
    assert left == [".tmp_iter_0000500", "iter_0000150", "iter_0000300", "iter_0000400",
                    "iter_0000900", ckpt.LATEST_FILE]  # fmt: skip
    assert partial.is_dir() and higher.is_dir()
    assert ckpt.prune_iterations(save, 400, keep=1) == [save / "iter_0000300"]


def test_prune_refuses_when_the_latest_file_names_another_iteration(tmp_path):
    save = tmp_path / "ckpt"
    for it in (1, 2):
        _fake_iteration(save, it)
    (save / ckpt.LATEST_FILE).write_text("1\n")
    with pytest.raises(ckpt.CheckpointError, match="not pruning"):
        ckpt.prune_iterations(save, 2, keep=1)
    with pytest.raises(ValueError, match=">= 1"):
        ckpt.prune_iterations(save, 1, keep=0)
    assert (save / "iter_0000001").is_dir() and (save / "iter_0000002").is_dir()


def test_training_keeps_the_last_two_and_resumes_from_the_newest(tmp_path):
    extra = ["--train_iters", "6", "--save_interval", "2", "--keep_last_n_checkpoints", "2"]
    rc, dims, tok = tiny_run(extra, tmp_path)
    torch.manual_seed(0)
    trainer = Trainer(rc, dims, tok)
    run_training(rc, dims, trainer, SyntheticLoader(2, 32, 2), {}, None)
    save = tmp_path / "ckpt"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert ckpt.latest_iteration(save) == 6
    rc, dims, tok = tiny_run(["--train_iters", "8", "--load", str(save)], tmp_path)
    resumed = Trainer(rc, dims, tok)
    resumed.load(rc.ckpt.load)
    assert resumed.iteration == 6


def test_the_flag_is_checked():
    from train.args import ArgsError

    with pytest.raises(ArgsError, match="--keep_last_n_checkpoints 0: must be >= 1"):
        tiny_run(["--keep_last_n_checkpoints", "0"])
