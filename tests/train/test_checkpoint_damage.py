"""A checkpoint damaged the way users meet it (a half-finished copy, a file swapped in from another
model, another tool's checkpoint) is refused naming the file, what is wrong and the directory to
load instead; nothing on disk is changed. (Damaged JSON and latest files, truncated tensor files
and failed saves: tests/train/test_bad_input.py.)"""

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import PRESETS
from model.sampling import load_model
from tests.train.helpers import SyntheticLoader, tiny_run
from train import checkpoint as ckpt
from train.loop import Trainer
from train.run import run_training


def _cfg(hidden: int = 64):
    return PRESETS["tiny"].replace(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                                   num_kv_heads=2, ffn_hidden_size=2 * hidden,
                                   vocab_size=300)  # fmt: skip


def _write(save_dir, iteration: int, hidden: int = 64):
    cfg = _cfg(hidden)
    sd = {n: torch.randn(s) for n, s in cfg.param_shapes().items()}
    return ckpt.write_full_checkpoint(save_dir, iteration, sd, {"model": cfg.to_dict()})


def _tree(root) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _model_file(iter_dir):
    return iter_dir / ckpt.shard_dir_name(0, 0) / ckpt.MODEL_FILE


# ----------------------------------------------------------------------------------------------
# "load another iteration" says which


def test_a_damaged_iteration_names_the_previous_complete_one(tmp_path):
    prev, d = _write(tmp_path, 2), _write(tmp_path, 4)
    _model_file(d).write_bytes(_model_file(d).read_bytes()[:100])  # a copy cut short
    with pytest.raises(ckpt.CheckpointError, match=rf"not a readable .* complete one: {prev}$"):
        ckpt.ShardIndex(d)
    (d / ckpt.META_FILE).write_text('{"format": "oasst-trai')
    with pytest.raises(ckpt.CheckpointError, match=rf"not valid JSON .* complete one: {prev}$"):
        ckpt.read_meta(d)
    state = d / ckpt.shard_dir_name(0, 0) / ckpt.state_file_name(0)
    state.write_text("")
    with pytest.raises(ckpt.CheckpointError, match=rf"complete one: {prev}, or this one with"):
        ckpt.read_rank_state(d, 0, 0, 0)
    # the only iteration there: nothing to fall back on, and the message says so
    only = _write(tmp_path / "other", 1)
    _model_file(only).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no other complete iteration is saved in"):
        ckpt.ShardIndex(only)


# ----------------------------------------------------------------------------------------------
# files from elsewhere


def test_an_integer_tensor_in_a_weight_file_is_refused(tmp_path):
    """An int8 embedding was cast to float by every loader without a word (the fine-tune and
    the sampling report ran on zeros)."""
    d = _write(tmp_path, 1)
    f = _model_file(d)
    tensors = load_file(str(f))
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors["embed.weight"] = tensors["embed.weight"].to(torch.int8)
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(ckpt.CheckpointError, match=rf"{f}: tensor embed.weight is I8, expected"):
        ckpt.ShardIndex(d)


def test_a_missing_shard_directory_is_named_before_any_tensor_is_read(tmp_path):
    """A copy without one rank's mp_rank_* directory was reported by training and sampling as a
    tensor its shards cover half of; meta.json's layout names the directory."""
    _write(tmp_path, 2)
    d = _write(tmp_path, 4)
    meta = (d / ckpt.META_FILE).read_text().replace('"tp": 1', '"tp": 2')
    (d / ckpt.META_FILE).write_text(meta)  # as if saved at TP 2, mp_rank_01_000 not copied
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"saved at TP 2 / PP 1 .* \['mp_rank_01_000'\] is missing: .*/iter_0000002$",
    ):
        ckpt.read_meta(d)


def test_a_weight_file_of_another_model_size_is_named_by_the_sampler(tmp_path):
    """It was a RuntimeError from Tensor.copy_ in the middle of loading."""
    d = _write(tmp_path / "a", 1)
    other = _write(tmp_path / "b", 1, hidden=32)
    shutil.copy(_model_file(other), _model_file(d))
    with pytest.raises(ckpt.CheckpointError, match=rf"{_model_file(d)}: .* another model"):
        load_model(d, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("latest", ["4", "release"])
def test_a_megatron_lm_checkpoint_is_named_with_the_way_to_convert_it(tmp_path, latest):
    name = "release" if latest == "release" else ckpt.iteration_dir_name(4)
    shard = tmp_path / name / "mp_rank_00"
    shard.mkdir(parents=True)
    (shard / "model_optim_rng.pt").write_bytes(b"PK\x03\x04")
    (tmp_path / ckpt.LATEST_FILE).write_text(latest)
    for path in (tmp_path, tmp_path / name):
        with pytest.raises(ckpt.CheckpointError, match="a Megatron-LM checkpoint .*megatron_to_hf"):
            ckpt.resolve_iteration_dir(path)


# ----------------------------------------------------------------------------------------------
# through the trainer's --load


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Two steps of the tiny run, checkpoints (with optimizer state) at 1 and 2."""
    tmp = tmp_path_factory.mktemp("run")
    args = ["--train_iters", "2", "--save_interval", "1"]
    rc, dims, tok = tiny_run(args, tmp)
    run_training(rc, dims, Trainer(rc, dims, tok), SyntheticLoader(2, 64, 2), {}, None)
    return tmp / "ckpt", args


def _damaged_copy(saved_run, tmp_path):
    src, args = saved_run
    save = tmp_path / "ckpt"
    shutil.copytree(src, save)
    return save, save / ckpt.iteration_dir_name(2), args


def test_resume_without_the_optimizer_file_names_it(saved_run, tmp_path):
    """It was "no master tensor named embed.weight"."""
    save, d, args = _damaged_copy(saved_run, tmp_path)
    gone = d / ckpt.shard_dir_name(0, 0) / ckpt.optim_file_name(0)
    gone.unlink()
    before = _tree(save)
    rc, dims, tok = tiny_run([*args, "--load", str(save)], tmp_path)
    with pytest.raises(
        ckpt.CheckpointError, match=rf"{gone} is missing, .*--no_load_optim.*iter_0000001$"
    ):
        Trainer(rc, dims, tok).load(rc.ckpt.load)
    assert _tree(save) == before
    rc, dims, tok = tiny_run([*args, "--load", str(save), "--no_load_optim"], tmp_path)
    Trainer(rc, dims, tok).load(rc.ckpt.load)  # what the message offers works


def test_resume_with_a_weight_file_of_another_model_size_names_the_file(saved_run, tmp_path):
    """meta.json matched the run, so the old hint (--use_checkpoint_args) could not help."""
    save, d, args = _damaged_copy(saved_run, tmp_path)
    rc, dims, tok = tiny_run(args)
    cfg = rc.model.replace(hidden_size=32, num_attention_heads=4, num_kv_heads=2)
    other = ckpt.write_full_checkpoint(
        tmp_path / "other", 1, {n: torch.randn(s) for n, s in cfg.param_shapes().items()},
        {"model": cfg.to_dict()},
    )  # fmt: skip
    shutil.copy(_model_file(other), _model_file(d))
    rc, dims, tok = tiny_run([*args, "--load", str(save), "--finetune"], tmp_path)
    with pytest.raises(
        ckpt.CheckpointError, match=rf"{_model_file(d)}: .* another model; .*iter_0000001$"
    ):
        Trainer(rc, dims, tok).load(rc.ckpt.load)


def test_a_corrupt_optimizer_file_stops_only_the_resume_that_reads_it(saved_run, tmp_path):
    """Every loader indexed the optimizer files too, so --finetune, --no_load_optim (the way out
    the resume message offers) and the sampler failed on a file they never read."""
    save, d, args = _damaged_copy(saved_run, tmp_path)
    bad = d / ckpt.shard_dir_name(0, 0) / ckpt.optim_file_name(0)
    bad.write_bytes(bad.read_bytes()[:200])  # a copy cut short
    before = _tree(save)
    rc, dims, tok = tiny_run([*args, "--load", str(save)], tmp_path)
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"{bad}: not a readable .* --no_load_optim \(these weights, fresh Adam moments\), "
        r"or load another iteration .*iter_0000001$",
    ):
        Trainer(rc, dims, tok).load(rc.ckpt.load)
    for flag in ("--no_load_optim", "--finetune"):
        rc, dims, tok = tiny_run([*args, "--load", str(save), flag], tmp_path)
        trainer = Trainer(rc, dims, tok)
        trainer.load(rc.ckpt.load)
        assert trainer.iteration == (2 if flag == "--no_load_optim" else 0)
    model, _, _ = load_model(save, torch.device("cpu"), torch.float32)
    weights, _ = ckpt.read_full_state_dict(save)
    assert torch.equal(model.norm.weight, weights["norm.weight"])
    assert _tree(save) == before
