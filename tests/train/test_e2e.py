"""`python -m train` end to end on the pretokenized sample mix: stage 1 from scratch, then stage 2
with --finetune from stage 1's checkpoint, both from the tiny args files (shortened)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train.args import parse_args
from train.main import main

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "configs" / "train" / "tiny-stage1.args"
STAGE2 = ROOT / "configs" / "train" / "tiny-stage2.args"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    for mix in ("sample_stage1", "sample_stage2"):
        subprocess.run(
            [sys.executable, "-m", "data.pretokenize", "configs/data/sample.yaml", "--mix", mix,
             "--output-dir", str(out / mix), "--no-progress"],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return out


def _rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _short(run: Path, data: Path, mix: str, iters: int) -> list[str]:
    return [
        "--data_path", str(data / mix / f"{mix}-train"), "--save", str(run / "checkpoints"),
        "--run_dir", str(run), "--tensorboard_dir", str(run / "tb"), "--train_iters", str(iters),
        "--seq_length", "128", "--global_batch_size", "4", "--micro_batch_size", "2",
        "--log_interval", "2", "--eval_iters", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage1")
    argv = [f"@{STAGE1}", *_short(run, data_dir, "sample_stage1", 16), "--lr_warmup_iters", "2",
            "--save_interval", "8", "--eval_interval", "8"]  # fmt: skip
    assert main(argv) == 0
    return run


def test_stage1_trains_and_writes_everything(stage1, capsys):
    train = _rows(stage1, "train")
    assert [r["iteration"] for r in train] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert train[-1]["lm_loss"] < 0.75 * train[0]["lm_loss"], [r["lm_loss"] for r in train]
    assert train[-1]["consumed_samples"] == 64 and "timers/step_ms" in train[-1]
    evals = _rows(stage1, "eval")
    names = {r["dataset"] for r in evals}
    assert {"all", "megacode2", "chat"} <= names
    assert [r["iteration"] for r in evals if r["dataset"] == "all"] == [8, 16]
    first, last = (r for r in evals if r["dataset"] == "all")
    assert last["loss"] < first["loss"]
    for key in ("ppl", "accuracy", "instruct_accuracy", "count_loss_mask"):
        assert key in last
    assert last["ppl"] == pytest.approx(math.exp(last["loss"]))
    assert _rows(stage1, "activation_memory")
    assert list((stage1 / "tb").glob("events.out.tfevents.*"))
    ck = stage1 / "checkpoints"
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
    assert (ck / "iter_0000008").is_dir() and (ck / "iter_0000016").is_dir()


def test_stage2_finetunes_from_stage1(stage1, data_dir, tmp_path, capsys):
    argv = [f"@{STAGE2}", *_short(tmp_path, data_dir, "sample_stage2", 6),
            "--load", str(stage1 / "checkpoints"), "--eval_interval", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(--finetune): iteration 0, fresh optimizer" in out
    train = _rows(tmp_path, "train")
    assert [r["iteration"] for r in train] == [2, 4, 6] and train[0]["consumed_samples"] == 8
    meta = json.loads((tmp_path / "checkpoints" / "iter_0000006" / "meta.json").read_text())
    assert meta["model"]["hidden_dropout"] == 0.25 and meta["model"]["lima_dropout"] is True
    # started from stage 1's weights, not from scratch: the loss is far below ln(vocab) (6.9;
    # from scratch the first logged loss is 6.8). Not too close, though: the first iterations run
    # with dropout 0.25, whose CPU masks differ between torch versions (2.4: 5.6, 2.13: 4.9).
    assert train[0]["lm_loss"] < 0.85 * math.log(meta["vocab_size"])


def test_stage2_runs_three_epochs(data_dir):
    """The stage-2 args file's train_iters is 3 epochs of the sample split, rounded up, with the
    trainer's own loader (a global batch counts samples)."""
    from data.loader import SFTDataset
    from train.data import make_loader
    from train.resolve import resolve

    ns, given = parse_args([f"@{STAGE2}"])
    rc = resolve(ns, given, world_size=1)
    ds = SFTDataset(str(data_dir / "sample_stage2" / "sample_stage2-train"))
    loader = make_loader(ds, rc.data, 0, 1)
    assert loader.cfg.by_samples
    for _ in range(ns.train_iters - 1):
        loader.next_global_batch()
    assert loader.epoch == 2  # the last step starts inside the third epoch ...
    loader.next_global_batch()
    assert loader.epoch == 3  # ... and finishes it


def test_another_tokenizer_is_refused_by_the_data(data_dir, tmp_path, capsys):
    # one more extra id: another vocabulary (and fingerprint) than the data was made with
    argv = [f"@{STAGE1}", *_short(tmp_path, data_dir, "sample_stage1", 1), "--lr_warmup_iters",
            "0", "--vocab_extra_ids_list", "<|im_start|>,<|im_end|>,<x>"]  # fmt: skip
    assert main(argv) == 2
    assert "made with tokenizer" in capsys.readouterr().err


def test_fewer_extra_ids_than_the_data_is_refused_as_another_tokenizer(data_dir, tmp_path, capsys):
    # the data holds ids past this vocabulary: the tokenizer mismatch is what to report, not the
    # out-of-range token id it causes
    argv = [f"@{STAGE1}", *_short(tmp_path, data_dir, "sample_stage1", 1), "--lr_warmup_iters",
            "0", "--vocab_extra_ids_list", "<|im_start|>"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "made with tokenizer" in err and "extra ids differ" in err


def test_data_path_naming_a_directory_suggests_the_prefix(data_dir, tmp_path, capsys):
    argv = [f"@{STAGE1}", *_short(tmp_path, data_dir, "sample_stage1", 1), "--lr_warmup_iters",
            "0", "--data_path", str(data_dir / "sample_stage1")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is a directory; it takes a file prefix" in err
    assert str(data_dir / "sample_stage1" / "sample_stage1-train") in err


def test_a_failed_save_mid_run_is_reported_and_keeps_the_checkpoints(
    stage1, data_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    from train import checkpoint as ckpt

    save = tmp_path / "checkpoints"
    shutil.copytree(stage1 / "checkpoints", save)
    before = {str(p): p.read_bytes() for p in sorted(save.rglob("*")) if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_safetensors", disk_full)
    argv = [f"@{STAGE1}", *_short(tmp_path, data_dir, "sample_stage1", 17), "--load", str(save),
            "--save", str(save), "--eval_iters", "0", "--no-activation_memory_report"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: saving iteration 17" in err and "No space left on device" in err
    assert "still names iteration 16, which is intact" in err and "Traceback" not in err
    after = {str(p): p.read_bytes() for p in sorted(save.rglob("*")) if p.is_file()}
    assert after == before


def test_samples_cut_to_seq_length_are_noted_and_counted(data_dir, tmp_path, capsys):
    """Samples longer than --seq_length lose their tail: the start-up log says how many the
    split holds, and each log row counts those its steps consumed (what the loader cut)."""
    from train.data import make_loader, open_datasets
    from train.resolve import resolve

    argv = [f"@{STAGE1}", *_short(tmp_path, data_dir, "sample_stage1", 4), "--seq_length", "64",
            "--log_interval", "1", "--eval_interval", "100", "--lr_warmup_iters", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rc = resolve(*parse_args(argv))
    train_ds, _, _ = open_datasets(rc.data)
    long = int((train_ds.sizes > 64).sum())
    assert long > 0 and f"note: {long:,} of {len(train_ds):,} training samples" in out
    loader = make_loader(train_ds, rc.data, 0, 1)
    want = [sum(mb["num_truncated"] for mb in loader.next_global_batch()) for _ in range(4)]
    assert sum(want) > 0
    assert [r["truncated"] for r in _rows(tmp_path, "train")] == want
    assert "samples cut to seq_length" in out


def _tree_digest(root: Path) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_self_resuming_run_a_refused_rerun_and_ctrl_c(data_dir, tmp_path, capsys, monkeypatch):
    """--load = --save (tiny-stage1.args): the first launch starts from scratch, the next
    resumes, a finished one has nothing to do; a run that would replace that run's
    checkpoints is refused and writes nothing; Ctrl-C says what is intact and how to resume."""
    import train.run

    save = tmp_path / "checkpoints"
    base = [f"@{STAGE1}", *_short(tmp_path, data_dir, "sample_stage1", 4), "--load", str(save),
            "--lr_warmup_iters", "1", "--eval_interval", "100", "--save_interval", "2"]  # fmt: skip
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "holds no checkpoint yet: starting from scratch" in out
    assert [r["iteration"] for r in _rows(tmp_path, "train")] == [2, 4]
    assert main([*base, "--train_iters", "6"]) == 0
    assert "at iteration 4" in capsys.readouterr().out
    assert [r["iteration"] for r in _rows(tmp_path, "train")] == [2, 4, 6]
    assert main([*base, "--train_iters", "6"]) == 0
    assert "nothing to train" in capsys.readouterr().out

    before = _tree_digest(save)
    at = base.index("--load")
    fresh = base[:at] + base[at + 2 :]  # a new run into the same --save
    assert main(fresh) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run (its latest iteration is 6)" in err
    assert f"pass --load {save};" in err and "--overwrite_save" in err
    assert _tree_digest(save) == before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.run, "run_training", interrupted)
    assert main([*base, "--train_iters", "8"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: {save} holds complete checkpoints up to iteration 6" in err
    assert f"resume with --load {save}" in err and "Traceback" not in err
    # metrics.jsonl is appended to by every launch that started: each begins with a marker
    starts = _rows(tmp_path, "run_start")
    assert [r["iteration"] for r in starts] == [0, 4, 6, 6]  # not the refused launch
    assert starts[1]["load"] == str(save) and "--train_iters" in starts[1]["argv"]
