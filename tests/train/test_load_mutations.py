"""Trainer.load, pinned where a mutation pass found it unchecked: what a resume restores (the
skipped-step count, the data position and RNG stream of a rank whose own state file is missing),
what --no_load_rng and a checkpoint without optimizer state change, the refusals of another
vocabulary or architecture, and the fields checkpoint_meta records.

Single process: the other-layout paths of `_restore_rank_state` are driven by hand-written state
files and the dims of a rank of that layout (the method reads only the dims' ranks and sizes)."""

import json
import shutil

import pytest
import torch

from parallel.dims import ParallelDims
from tests.train.helpers import VOCAB, SyntheticLoader, tiny_run
from train import checkpoint as ckpt
from train.data import TokenizerInfo
from train.loop import Trainer
from train.lr import lr_at

RUN = ["--hidden_dropout", "0.1", "--train_iters", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two steps of the tiny model, saved at iteration 2 (the run's last) with one step counted
    as skipped; returns the iteration directory."""
    tmp = tmp_path_factory.mktemp("load")
    rc, dims, tok = tiny_run(RUN, tmp)
    torch.manual_seed(3)
    trainer = Trainer(rc, dims, tok)
    loader = SyntheticLoader(2, 64, 2)
    for _ in range(2):
        trainer.train_step(loader.next_global_batch(), lr=1e-3)
    trainer.iteration, trainer.consumed_samples, trainer.skipped_total = 2, 8, 1
    trainer.save(loader.state_dict())
    return tmp / "ckpt" / "iter_0000002"


def _copy(saved, tmp_path, edit=None):
    """A copy of the saved iteration whose meta.json `edit(meta)` changed."""
    root = tmp_path / "copy"
    shutil.copytree(saved.parent, root)
    if edit is not None:
        path = root / saved.name / ckpt.META_FILE
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    return root / saved.name


def _trainer(extra, tmp_path, tok=None):
    rc, dims, tok0 = tiny_run([*RUN, *extra], tmp_path)
    return Trainer(rc, dims, tok or tok0), rc


def test_checkpoint_meta_records_the_skipped_count_padding_layout_and_last_lr(saved):
    """meta.json's informational fields: the vocabulary padding of the saved rows, the whole
    layout (with --sequence_parallel), and the lr the last step ran at."""
    meta = json.loads((saved / ckpt.META_FILE).read_text())
    rc, _, _ = tiny_run(RUN)
    assert meta["optimizer"] == {"step": 2, "skipped": 1}
    assert meta["padded_vocab_size"] == 112 and meta["vocab_size"] == VOCAB
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1, "sequence_parallel": False}
    assert meta["scheduler"]["last_lr"] == lr_at(rc.schedule, 2)


def test_resume_restores_the_skipped_count(saved, tmp_path):
    """The skipped-step count goes on from the checkpoint's (the log's running total), not 0."""
    trainer, _ = _trainer([], tmp_path)
    assert trainer.load(str(saved)) == {"step": 2}
    assert (trainer.iteration, trainer.consumed_samples, trainer.skipped_total) == (2, 8, 1)
    assert trainer.optimizer.step_count == 2


def test_a_checkpoint_without_optimizer_state_resumes_with_fresh_moments(tmp_path, capsys):
    """--no_save_optim: meta.json says there is no optimizer file, so a resume (even with
    --load_optim, the default) takes fresh moments instead of failing on the missing file."""
    rc, dims, tok = tiny_run([*RUN, "--no_save_optim"], tmp_path / "a")
    trainer = Trainer(rc, dims, tok)
    trainer.train_step(SyntheticLoader(2, 64, 2).next_global_batch(), lr=1e-3)
    trainer.iteration, trainer.consumed_samples = 1, 4
    trainer.save({"step": 1})
    t2, _ = _trainer([], tmp_path / "b")
    capsys.readouterr()
    assert t2.load(str(tmp_path / "a" / "ckpt")) == {"step": 1}
    assert "optimizer state not loaded" in capsys.readouterr().out
    assert t2.iteration == 1 and t2.optimizer.step_count == 0
    assert all(not g.exp_avg.any() for g in t2.optimizer.groups)


def test_a_meta_without_has_trainer_state_is_a_weights_only_checkpoint(saved, tmp_path):
    """Trainer state is read only where meta.json claims it: without the flag, iteration 0."""
    it = _copy(saved, tmp_path, lambda m: m.pop("has_trainer_state"))
    trainer, _ = _trainer([], tmp_path)
    assert trainer.load(str(it)) is None
    assert (trainer.iteration, trainer.consumed_samples, trainer.skipped_total) == (0, 0, 0)


def test_a_checkpoint_without_schedule_fields_resumes_without_a_schedule_warning(saved, tmp_path,
                                                                              capsys):  # fmt: skip
    """Only the schedule fields the checkpoint recorded are compared: one that records none
    (written by a tool, or before the field existed) is not "another schedule"."""
    it = _copy(saved, tmp_path, lambda m: m.pop("scheduler"))
    trainer, _ = _trainer([], tmp_path)
    capsys.readouterr()
    assert trainer.load(str(it)) == {"step": 2}
    assert "schedule" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flag", "value", "diff"),
    [
        ("--lr", "2e-3", "lr 0.003 -> 0.002"),
        ("--min_lr", "1e-4", "min_lr 0.0003 -> 0.0001"),
        ("--lr_decay_style", "linear", "decay_style cosine -> linear"),
        ("--lr_warmup_iters", "1", "warmup_iters 2 -> 1"),
    ],
)
def test_each_schedule_field_is_compared_on_resume(saved, tmp_path, capsys, flag, value, diff):
    """Not only decay_iters (tests/train/test_loop_audit.py): every saved schedule field that
    differs from this run's flags is named in the warning."""
    trainer, _ = _trainer([flag, value], tmp_path)
    capsys.readouterr()
    trainer.load(str(saved))
    out = capsys.readouterr().out
    assert "under another learning-rate schedule" in out and f"({diff})" in out, out


@pytest.mark.parametrize(("planned", "note"), [(2, False), (3, True)])
def test_finetune_notes_a_run_that_stopped_before_its_train_iters(saved, tmp_path, capsys,
                                                                   planned, note):  # fmt: skip
    """The "did not finish" note is for iteration < train_iters only: a run that reached its
    last iteration finished."""
    it = _copy(saved, tmp_path, lambda m: m["args"]["loop"].update(train_iters=planned))
    trainer, _ = _trainer(["--finetune", "--load", str(it)], tmp_path)
    capsys.readouterr()
    assert trainer.load(str(it)) is None
    out = capsys.readouterr().out
    assert ("did not finish" in out) == note, out
    if note:
        assert f"is iteration 2 of the {planned} its run was set to train" in out


def test_finetune_refreshes_offloaded_master_weights_from_the_loaded_ones(saved, tmp_path):
    """With --optimizer_cpu_offload the fp32 masters are a separate buffer even on CPU: after a
    weights-only load they must hold the loaded weights, or the first step would write the
    initial weights (plus one update) back into the model."""
    trainer, _ = _trainer(["--finetune", "--load", str(saved), "--use_distributed_optimizer",
                           "--optimizer_cpu_offload"], tmp_path)  # fmt: skip
    opt = trainer.optimizer
    assert opt.master.data_ptr() != opt.model_flat.data_ptr()
    trainer.load(str(saved))
    assert torch.equal(opt.master, opt.model_flat)


def test_a_resume_at_another_dp_size_names_the_resharding(saved, tmp_path, capsys):
    """Saved at DP 2, resumed at DP 1: the log names both layouts and the restored stream; a
    resume at the saved layout says neither."""
    trainer, _ = _trainer([], tmp_path)
    capsys.readouterr()
    trainer.load(str(saved))
    out = capsys.readouterr().out
    assert "resharded" not in out and "saved stream restored" not in out, out
    it = _copy(saved, tmp_path, lambda m: m["layout"].update(dp=2))
    trainer, _ = _trainer([], tmp_path)
    capsys.readouterr()
    trainer.load(str(it))
    out = capsys.readouterr().out
    assert "(saved at tp 1 pp 1 dp 2, resharded to tp 1 pp 1 dp 1)" in out, out
    assert "RNG: pipeline stage 0's saved stream restored" in out


def test_no_load_rng_leaves_the_generators_as_seeded(saved, tmp_path):
    trainer, _ = _trainer(["--no_load_rng"], tmp_path)
    torch.manual_seed(77)
    before = torch.get_rng_state()
    assert trainer.load(str(saved)) == {"step": 2}  # the data position is still restored
    assert torch.equal(torch.get_rng_state(), before)


def test_a_checkpoint_without_rng_state_says_so_and_leaves_the_generators(tmp_path, capsys):
    rc, dims, tok = tiny_run([*RUN, "--no_save_rng"], tmp_path / "a")
    trainer = Trainer(rc, dims, tok)
    trainer.iteration = 1
    trainer.save({"step": 1})
    t2, _ = _trainer([], tmp_path / "b")
    torch.manual_seed(78)
    before = torch.get_rng_state()
    capsys.readouterr()
    t2.load(str(tmp_path / "a" / "ckpt"))
    assert "holds no RNG state" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------
# _restore_rank_state at other layouts, from hand-written state files


def _stream(seed: int) -> list[int]:
    return torch.manual_seed(seed).get_state().tolist()


def _write_states(iter_dir, tp: int, pp: int, dp: int) -> None:
    """State files of a (tp, pp, dp) save: loader step 7 everywhere, stage s's stream seeded
    with 500 + s on every TP/DP rank of the stage."""
    for t in range(tp):
        for p in range(pp):
            d = iter_dir / ckpt.shard_dir_name(t, p)
            d.mkdir(parents=True, exist_ok=True)
            for r in range(dp):
                state = {"loader": {"step": 7}, "rng": {"cpu": _stream(500 + p)}}
                (d / ckpt.state_file_name(r)).write_text(json.dumps(state))


@pytest.fixture
def rank_trainer(tmp_path):
    trainer, rc = _trainer([], tmp_path)
    trainer.iteration = 5
    return trainer, rc


def test_same_pipeline_split_restores_the_stages_stream_from_another_ranks_file(
    rank_trainer, tmp_path, capsys
):
    """Saved at TP 2 / PP 2 / DP 1, this rank is (tp 0, pp 1, dp 1) of TP 1 / PP 2 / DP 2: no
    file of its own, so stage 1's stream comes from a file of stage 1 (not stage 0's first)."""
    trainer, _ = rank_trainer
    it = tmp_path / "it"
    _write_states(it, tp=2, pp=2, dp=1)
    trainer.dims = ParallelDims(tp=1, pp=2, dp=2, rank=3)
    assert (trainer.dims.pp_rank, trainer.dims.dp_rank) == (1, 1)
    capsys.readouterr()
    loader = trainer._restore_rank_state(it, {"tp": 2, "pp": 2, "dp": 1}, same_layout=False)
    assert loader == {"step": 7}
    assert torch.equal(torch.get_rng_state(), torch.tensor(_stream(501), dtype=torch.uint8))
    assert "pipeline stage 1's saved stream restored" in capsys.readouterr().out


@pytest.mark.parametrize("own_file", [True, False])
def test_another_pipeline_split_reseeds_by_stage_and_iteration(rank_trainer, tmp_path, capsys,
                                                               own_file):  # fmt: skip
    """Saved at PP 1 (TP 2): a rank of stage 1 under PP 2 has no saved stream that maps; it
    reseeds with seed + 100 x stage + 1000003 x iteration, and takes the data position from any
    file (its own (tp, pp, dp) file is there or not)."""
    trainer, rc = rank_trainer
    it = tmp_path / "it"
    _write_states(it, tp=2, pp=1, dp=1)
    if own_file:  # this rank's (tp 0, pp 1, dp 0) file, written by a save at PP 2
        _write_states(it, tp=1, pp=2, dp=1)
    trainer.dims = ParallelDims(tp=1, pp=2, dp=1, rank=1)
    torch.manual_seed(99)
    capsys.readouterr()
    loader = trainer._restore_rank_state(it, {"tp": 2, "pp": 1, "dp": 1}, same_layout=False)
    assert loader == {"step": 7}
    seed = rc.loop.seed + 100 * 1 + 1_000_003 * 5
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(seed).get_state())
    assert f"reseeded with {seed}" in capsys.readouterr().out


def test_a_single_stage_resume_of_a_two_stage_save_reseeds_rather_than_restore_stage_0(
    rank_trainer, tmp_path
):
    """Saved at PP 2, resumed at PP 1: the rank's own (tp 0, pp 0, dp 0) file exists, but its
    stream is stage 0's of the other split (half the layers): reseeded, not restored."""
    trainer, rc = rank_trainer
    it = tmp_path / "it"
    _write_states(it, tp=1, pp=2, dp=1)
    trainer._restore_rank_state(it, {"tp": 1, "pp": 2, "dp": 1}, same_layout=False)
    seed = rc.loop.seed + 1_000_003 * 5
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(seed).get_state())


def test_no_state_file_at_all_is_refused(rank_trainer, tmp_path):
    trainer, _ = rank_trainer
    (tmp_path / "it" / ckpt.shard_dir_name(0, 0)).mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match=r"has no state_dp\*\.json file at all"):
        trainer._restore_rank_state(tmp_path / "it", {"tp": 1, "pp": 1, "dp": 1}, True)


# ----------------------------------------------------------------------------------------------
# refusals


def test_another_vocabulary_size_is_refused_even_with_no_fingerprint_to_compare(saved, tmp_path):
    """Vocab 100 against the saved 97: both pad to 112 rows, so nothing else would notice."""
    rc, dims, _ = tiny_run([*RUN, "--load", str(saved)], tmp_path)
    rc.model = rc.model.replace(vocab_size=VOCAB + 3)
    tok = TokenizerInfo(VOCAB + 3, None, None, None, None, [])
    with pytest.raises(ckpt.CheckpointError, match=r"another tokenizer/vocabulary \(vocab 97,"):
        Trainer(rc, dims, tok).load(str(saved))


@pytest.mark.parametrize("side", ["checkpoint", "run"])
def test_a_missing_fingerprint_on_either_side_is_not_a_mismatch(saved, tmp_path, side):
    """Fingerprints are compared only when both sides have one (a checkpoint imported without a
    tokenizer, a run without a vocab file); the vocabulary size is still checked."""
    it = saved
    tok = None
    if side == "checkpoint":
        it = _copy(saved, tmp_path, lambda m: m["tokenizer"].update(fingerprint=None))
    else:
        tok = TokenizerInfo(VOCAB, None, None, None, None, [])
    trainer, _ = _trainer([], tmp_path, tok)
    assert trainer.load(str(it)) == {"step": 2}


@pytest.mark.parametrize(
    ("flag", "key", "value"),
    [
        ("--hidden_size", "hidden_size", 128),
        ("--ffn_hidden_size", "ffn_hidden_size", 128),
        ("--num_layers", "num_layers", 3),
        ("--num_attention_heads", "num_attention_heads", 8),
        ("--num_attention_heads_kv", "num_kv_heads", 4),
    ],
)
def test_each_architecture_size_is_compared_and_named(saved, tmp_path, flag, key, value):
    """Every size the refusal lists is checked by name (a shape mismatch further on would blame
    the tensor file instead of the flags)."""
    rc, _ = tiny_run([*RUN], None)[:2]
    trainer, _ = _trainer([flag, str(value)], tmp_path)
    want = f"{key}: checkpoint {getattr(rc.model, key)}, run {value}"
    with pytest.raises(ckpt.CheckpointError, match=f"another architecture \\({want}\\)"):
        trainer.load(str(saved))
