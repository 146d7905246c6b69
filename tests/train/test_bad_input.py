"""Bad input gets a message naming the flag / file / line, what was expected and what to do; a
failed save leaves the checkpoints already written as they were."""

import errno
import json
import os

import pytest
import torch

from model.config import PRESETS
from train import checkpoint as ckpt
from train.args import ArgsError, parse_args
from train.main import main
from train.resolve import resolve


def _tiny(*extra):
    return ["--model", "tiny", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--seq_length", "128", "--train_iters", "10", "--lr", "1e-3",
            "--data_path", "nowhere-train", *extra]  # fmt: skip


def _resolve(argv, world=1):
    ns, given = parse_args(argv)
    return resolve(ns, given, world_size=world)


# ----------------------------------------------------------------------------------------------
# flags out of range: refused by name, before the loader, the schedule or the model divide by them


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--global_batch_size", "0"], "--global_batch_size 0: must be >= 1"),
        (["--seq_length", "1"], "--seq_length 1: must be >= 2"),
        (["--lr=-1e-3", "--min_lr=-1e-2"], "--lr -0.001: must be >= 0"),
        (["--weight_decay=-1"], "--weight_decay -1.0: must be >= 0"),
        (["--clip_grad=-1"], "--clip_grad -1.0: must be >= 0"),
        (["--adam_beta2", "1.0"], "--adam_beta2 1.0: must be in [0, 1)"),
        (["--adam_eps", "0"], "--adam_eps 0.0: must be > 0"),
        (["--lr_warmup_iters=-5"], "--lr_warmup_iters -5: must be >= 0"),
        (["--lr_decay_iters", "0"], "--lr_decay_iters 0: must be >= 1"),
        (["--exit_interval", "0"], "--exit_interval 0: must be >= 1"),
        (["--num_layers", "0"], "--num_layers 0: must be >= 1"),
        (["--num_attention_heads", "0"], "--num_attention_heads 0: must be >= 1"),
        (["--make_vocab_size_divisible_by", "0"], "--make_vocab_size_divisible_by 0: must be >= 1"),
        (["--rope_theta", "0"], "--rope_theta 0.0: must be > 0"),
        # inf and a negative seed were accepted: NaN losses, or a traceback in the loader.
        (["--lr", "inf"], "--lr inf: must be >= 0 and finite"),
        (["--weight_decay", "inf"], "--weight_decay inf: must be >= 0 and finite"),
        (["--adam_eps", "inf"], "--adam_eps inf: must be > 0 and finite"),
        (["--rope_theta", "inf"], "--rope_theta inf: must be > 0 and finite"),
        (["--init_method_std", "inf"], "--init_method_std inf: must be >= 0 and finite"),
        (
            ["--distributed_timeout_minutes", "inf"],
            "--distributed_timeout_minutes inf: must be > 0 and finite",
        ),
        (["--seed=-1"], "--seed -1: must be >= 0"),
    ],
)
def test_out_of_range_values_name_the_flag(extra, message):
    with pytest.raises(ArgsError) as e:
        _resolve(_tiny(*extra))
    assert message in str(e.value)


def test_contradictory_flags_name_both_and_what_to_change(tmp_path):
    rc = _resolve(_tiny("--save_interval", "5"))
    assert any("--save_interval 5 without --save: no checkpoint will be" in n for n in rc.notes)
    rc = _resolve(_tiny("--save_interval", "5", "--save", str(tmp_path)))
    assert not any("--save_interval" in n for n in rc.notes)
    with pytest.raises(ArgsError) as e:
        _resolve(_tiny("--lr_warmup_iters", "20"))
    assert "(20 iterations, --lr_warmup_iters) is longer than the decay (10, --train_iters): " \
        "lower --lr_warmup_iters or raise --train_iters" in str(e.value)  # fmt: skip
    with pytest.raises(ArgsError, match=r"decay \(5, --lr_decay_iters\): .* raise --lr_decay"):
        _resolve(_tiny("--lr_warmup_iters", "6", "--lr_decay_iters", "5"))


def test_profile_ranks_outside_the_run(tmp_path):
    profile = ["--profile", "--profile_step_start", "1", "--profile_step_end", "2",
               "--run_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(ArgsError, match="--profile_ranks -1: ranks are numbered from 0"):
        _resolve(_tiny(*profile, "--profile_ranks=-1"))
    rc = _resolve(_tiny(*profile, "--profile_ranks", "5"), world=2)
    assert any("--profile_ranks 5: no such rank at world size 2" in n for n in rc.notes)
    rc = _resolve(_tiny(*profile, "--profile_ranks", "1"), world=2)
    assert not any("--profile_ranks" in n for n in rc.notes)


def test_bad_world_size_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    ns, given = parse_args(_tiny())
    with pytest.raises(ArgsError, match="WORLD_SIZE='abc': expected a process count"):
        resolve(ns, given)


def test_negative_value_without_equals_gets_a_hint():
    with pytest.raises(ArgsError, match="needs the = form: --lr=-1e-3"):
        parse_args(_tiny("--lr", "-1e-3"))


# ----------------------------------------------------------------------------------------------
# arguments files


def test_args_file_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "run.args"
    f.write_text("--model tiny\n--lr abc\n")
    with pytest.raises(ArgsError, match=rf"invalid float value: 'abc' \(at {f}:2\)"):
        parse_args([f"@{f}"])
    f.write_text("--model tiny\n\n--lrr 1e-3\n")
    with pytest.raises(ArgsError, match=rf"unknown flag --lrr \(at {f}:3\); did you mean --lr\?"):
        parse_args([f"@{f}"])


def test_args_file_that_is_a_directory_binary_or_circular(tmp_path):
    with pytest.raises(ArgsError, match="is a directory, not a file"):
        parse_args([f"@{tmp_path}"])
    with pytest.raises(ArgsError, match="names no file"):
        parse_args(["@"])
    b = tmp_path / "binary.args"
    b.write_bytes(b"\xff\xfe--model tiny\n")
    with pytest.raises(ArgsError, match=rf"{b}: unreadable as text"):
        parse_args([f"@{b}"])
    a, c = tmp_path / "a.args", tmp_path / "c.args"
    a.write_text(f"--model tiny\n@{c}\n")
    c.write_text(f"--lr 1e-3\n@{a}\n")
    with pytest.raises(ArgsError, match="includes itself"):
        parse_args([f"@{a}"])


def test_flag_twice_in_one_file_with_different_values(tmp_path):
    f = tmp_path / "run.args"
    f.write_text("--lr 1e-3\n--seq_length 64\n--lr 2e-3\n")
    with pytest.raises(ArgsError, match=rf"{f}:3: `--lr 2e-3` contradicts `--lr 1e-3` at {f}:1"):
        parse_args([f"@{f}"])
    f.write_text("--packing\n--no-packing\n")
    with pytest.raises(ArgsError, match="`--no-packing` contradicts `--packing`"):
        parse_args([f"@{f}"])
    # the same value twice is harmless; the command line after the file overrides it
    f.write_text("--lr 1e-3\n--lr 1e-3\n")
    ns, _ = parse_args([f"@{f}", "--lr", "5e-4"])
    assert ns.lr == 5e-4


# ----------------------------------------------------------------------------------------------
# --model config.json, --vocab_file


def test_bad_hf_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ArgsError, match=rf"--model {path}: not a usable Hugging Face"):
        _resolve(_tiny()[2:] + ["--model", str(path)])
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ArgsError, match="no 'num_attention_heads' key"):
        _resolve(_tiny()[2:] + ["--model", str(path)])


def test_vocab_file_that_is_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a model")
    with pytest.raises(ArgsError, match=rf"--vocab_file {bad}: .*not a SentencePiece model"):
        _resolve(_tiny("--vocab_file", str(bad)))


# ----------------------------------------------------------------------------------------------
# output directories


def test_output_path_that_is_a_file_fails_before_any_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for flag in ("--save", "--run_dir", "--tensorboard_dir"):
        with pytest.raises(ArgsError, match=rf"{flag} {f} is a file: give a directory"):
            _resolve(_tiny(flag, str(f)))
    with pytest.raises(ArgsError, match=rf"--save {f}/sub is under {f}, a file"):
        _resolve(_tiny("--save", str(f / "sub")))


def test_unwritable_save_dir_fails_before_the_data_is_opened(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    real = os.access
    save = tmp_path / "ckpt"
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(save) else real(p, m))
    assert main(_tiny("--save", str(save))) == 2
    err = capsys.readouterr().err
    assert f"--save {save}: the directory is not writable" in err and "nowhere" not in err


# ----------------------------------------------------------------------------------------------
# --load of a damaged checkpoint


def _checkpoint(tmp_path, iteration=1):
    cfg = PRESETS["tiny"].replace(num_layers=1, hidden_size=64, num_attention_heads=4,
                                  num_kv_heads=2, ffn_hidden_size=128, vocab_size=300)  # fmt: skip
    sd = {n: torch.randn(s) for n, s in cfg.param_shapes().items()}
    ckpt.write_full_checkpoint(tmp_path, iteration, sd, {"model": cfg.to_dict()})
    return tmp_path / ckpt.iteration_dir_name(iteration)


def test_damaged_latest_file(tmp_path):
    _checkpoint(tmp_path)
    latest = tmp_path / ckpt.LATEST_FILE
    for content in (b"abc\n", b"-3\n", b"\xff\xfe"):
        latest.write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.LATEST_FILE}.*iter_0000001"):
            ckpt.resolve_iteration_dir(tmp_path)


def test_iteration_dir_without_meta(tmp_path):
    d = _checkpoint(tmp_path)
    (d / ckpt.META_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="shard directories but no meta.json"):
        ckpt.resolve_iteration_dir(d)
    # an interrupted re-save: the message says where the previous copy is
    os.replace(d, tmp_path / ".old_iter_0000001")
    (tmp_path / ".old_iter_0000001" / ckpt.META_FILE).write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="rename it to iter_0000001"):
        ckpt.resolve_iteration_dir(tmp_path)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("{oops", "not valid JSON"),
        ("[1]", "expected a JSON object, found list"),
        ('{"format": "oasst-trainer-checkpoint", "version": 1}', "'model'"),
        (None, "'vocab_size' must be an integer"),  # the saved meta without vocab_size
        (None, "'model' is not a usable model configuration"),  # num_layers "four"
    ],
)
def test_damaged_meta_is_refused_naming_the_key(tmp_path, meta, message):
    d = _checkpoint(tmp_path)
    path = d / ckpt.META_FILE
    if meta is None:
        m = json.loads(path.read_text())
        if "vocab_size" in message:
            del m["vocab_size"]
        else:
            m["model"]["num_layers"] = "four"
        meta = json.dumps(m)
    path.write_text(meta)
    with pytest.raises(ckpt.CheckpointError, match=rf"{path}: .*{message}"):
        ckpt.read_meta(d)
    # a --load that exists here is refused by the flag check, in a dry run too
    with pytest.raises(ArgsError, match=rf"--load {tmp_path}: .*{message}"):
        _resolve(_tiny("--load", str(tmp_path), "--dry_run"))


def test_truncated_or_missing_safetensors_names_the_file(tmp_path):
    d = _checkpoint(tmp_path)
    f = d / ckpt.shard_dir_name(0, 0) / ckpt.MODEL_FILE
    data = f.read_bytes()
    for cut in (100, len(data) // 2):
        f.write_bytes(data[:cut])
        with pytest.raises(ckpt.CheckpointError, match=rf"{f}: not a readable safetensors file"):
            ckpt.ShardIndex(d)
    f.unlink()
    with pytest.raises(
        ckpt.CheckpointError, match=rf"{f} is missing: the checkpoint is incomplete"
    ):
        ckpt.ShardIndex(d)


def test_damaged_rank_state_names_the_file(tmp_path):
    d = _checkpoint(tmp_path)
    path = d / ckpt.shard_dir_name(0, 0) / ckpt.state_file_name(0)
    path.write_text("[1, 2")
    with pytest.raises(ckpt.CheckpointError, match=rf"{path}: not valid JSON.*--finetune"):
        ckpt.read_rank_state(d, 0, 0, 0)
    with pytest.raises(ckpt.CheckpointError, match=rf"{path}: not valid JSON"):
        ckpt.find_rank_state(d)


# ----------------------------------------------------------------------------------------------
# a failed save never touches what is already there


def _tree(root) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _checkpoint(tmp_path, 1)
    before = _tree(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_safetensors", disk_full)
    with pytest.raises(ckpt.CheckpointError) as e:
        _checkpoint(tmp_path, 2)
    msg = str(e.value)
    assert "saving iteration 2" in msg and "No space left on device" in msg
    assert "still names iteration 1, which is intact" in msg
    assert msg.endswith(f"resume from it with --load {tmp_path}")  # the directory, not just a flag
    assert _tree(tmp_path) == before  # no partial iteration, no temp dir, latest unchanged


def test_failed_resave_of_the_same_iteration_restores_it(tmp_path, monkeypatch):
    d = _checkpoint(tmp_path, 1)
    before = _tree(tmp_path)
    real = os.replace

    def fail_into_place(src, dst):
        if str(src).endswith(".tmp_iter_0000001"):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_into_place)
    with pytest.raises(ckpt.CheckpointError, match="which is intact"):
        _checkpoint(tmp_path, 1)
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert _tree(tmp_path) == before
    assert ckpt.resolve_iteration_dir(tmp_path) == d


def test_a_new_run_into_an_earlier_runs_save_directory_is_refused_unless_asked(tmp_path):
    """A run that would replace an earlier run's iterations in its --save is refused (nothing
    already written is lost without being asked for); --overwrite_save turns that into a
    warning; a run that resumes the earlier one is neither. --finetune from the run's own --save
    restarts it at iteration 0, which is refused too, naming --no_finetune."""
    import dataclasses

    from tests.train.helpers import tiny_run
    from train.main import _earlier_run

    save = tmp_path / "ckpt"
    rc, _, _ = tiny_run()

    def check(load=None, finetune=False, overwrite=False):
        rc.ckpt = dataclasses.replace(rc.ckpt, save=str(save), load=load, finetune=finetune,
                                      overwrite_save=overwrite)  # fmt: skip
        return _earlier_run(rc)

    assert check() == (None, None)  # nothing saved there yet
    (save / "iter_0000005").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("5")
    err, warn = check()
    assert warn is None and "iteration is 5" in err and f"pass --load {save};" in err
    assert "--overwrite_save" in err
    err, warn = check(overwrite=True)
    assert err is None and "WARNING" in warn and "iteration is 5" in warn
    assert check(load=str(save)) == (None, None)  # resuming it
    assert check(load=str(save / "iter_0000005")) == (None, None)
    err, _ = check(load=str(tmp_path / "elsewhere"), finetune=True)  # stage 2 run again
    assert f"--load {save} --no_finetune" in err
    err, _ = check(load=str(save), finetune=True)  # --finetune from its own save
    assert "starts this run at iteration 0" in err and "add --no_finetune" in err


def test_first_launch_of_a_self_resuming_run_starts_from_scratch(tmp_path):
    """--load equal to --save with nothing saved yet is Megatron's self-resuming job: the first
    launch starts fresh. Not with --finetune, not for another directory, and not when the
    directory holds an iteration without the latest file (an interrupted save is an error)."""
    import dataclasses

    from tests.train.helpers import tiny_run
    from train.main import _first_launch

    save = tmp_path / "ckpt"
    rc, _, _ = tiny_run()

    def first(load, finetune=False):
        rc.ckpt = dataclasses.replace(rc.ckpt, save=str(save), load=str(load), finetune=finetune)
        return _first_launch(rc)

    assert first(save)  # does not exist yet
    save.mkdir()
    (save / "notes.txt").write_text("x")
    assert first(save)  # exists, holds no checkpoint
    assert not first(save, finetune=True)
    assert not first(tmp_path / "other")
    (save / "iter_0000003").mkdir()
    assert not first(save)
