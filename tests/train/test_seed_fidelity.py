"""The seed's two argument lists against the model card and Megatron-LLM's meaning of each flag:
the resolved values, and the deliberate differences (../shared/DESIGN.md) said where a user sees
them (the notes that `--dry_run` and the start-up log print)."""

from pathlib import Path

import numpy as np
import pytest

from data.indexed import write_indexed
from train.args import build_parser, parse_args
from train.resolve import resolve

ROOT = Path(__file__).resolve().parents[2]
SEED_FILES = {s: ROOT / "configs" / "train" / f"llama2-70b-stage{s}.args" for s in (1, 2)}


def _resolve(stage: int, *extra: str, world_size: int = 32):
    """The seed's list on the card's layout: TP 8 x PP 4 on 32 ranks (data parallel 1)."""
    ns, given = parse_args([f"@{SEED_FILES[stage]}", *extra])
    return resolve(ns, given, world_size=world_size)


@pytest.mark.parametrize("stage", [1, 2])
def test_resolved_values_are_the_cards(stage):
    rc = _resolve(stage)
    assert (rc.parallel.tp, rc.parallel.pp, rc.parallel.dp) == (8, 4, 1)
    assert rc.parallel.sequence_parallel
    assert (rc.loop.global_batch_size, rc.loop.micro_batch_size) == (64, 2)
    assert rc.loop.num_microbatches == 32 and rc.data.seq_length == 4096
    assert rc.loop.bf16 and rc.loop.recompute_granularity == "selective"
    assert rc.loop.seed == rc.data.seed == 1234  # Megatron-LLM's default; the card sets none
    s = rc.schedule
    assert (s.lr, s.min_lr, s.decay_style, s.warmup_iters) == (1e-5, 1e-6, "cosine", 100)
    assert s.decay_iters == rc.loop.train_iters == (12000 if stage == 1 else 519)
    o = rc.optim
    assert (o.beta1, o.beta2, o.eps, o.weight_decay) == (0.9, 0.95, 1e-12, 1e-6)
    assert o.clip_grad == 1.0  # Megatron-LLM's default; the card sets none
    m = rc.model
    assert (m.vocab_size, m.padded_vocab_size(8)) == (32007, 32768)
    assert (m.norm_eps, m.rope_scaling_factor, m.max_position_embeddings) == (1e-5, 1.0, 4096)
    assert m.attention_dropout == 0.0
    assert (m.hidden_dropout, m.lima_dropout) == ((0.0, False) if stage == 1 else (0.25, True))
    assert (rc.eval.interval, rc.eval.iters, rc.log.log_interval) == (50, 10, 1)
    assert rc.ckpt.save_interval == (500 if stage == 1 else 346)
    assert rc.ckpt.use_checkpoint_args and rc.ckpt.finetune == (stage == 2)


def test_lima_dropout_is_megatron_llms_linspace():
    """Megatron-LLM: linspace(0, hidden_dropout, num_layers), layer by layer."""
    m = _resolve(2).model
    want = np.linspace(0.0, 0.25, m.num_layers)
    got = np.array([m.layer_dropout(i) for i in range(m.num_layers)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


def _notes(stage: int, *extra: str) -> str:
    return "\n".join(_resolve(stage, *extra).notes)


@pytest.mark.parametrize("stage", [1, 2])
def test_lr_offset_from_megatron_is_said(stage):
    """Megatron-LLM's step s ran at lr(s - 1) (its scheduler steps after the update); ours at
    lr(s). Before: only train/lr.py's docstring said so, neither the dry run nor the log."""
    assert "lr(s - 1)" in _notes(stage)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_packed_global_batch_keeps_the_seeds_samples_and_says_so(stage):
    """The card's 12000 x 64 (1 epoch) and 519 x 64 (3 epochs) count samples, one padded sample
    per row in Megatron-LLM. By default a packed step is that many samples too; packed rows
    (--global_batch_unit rows) hold several, so the same flags would train ~8x / ~25x the
    epochs, and the notes say so."""
    notes = _notes(stage)
    assert "a step is 64 samples" in notes and "one padded sample per row" in notes
    rows = _notes(stage, "--global_batch_unit", "rows")
    assert "several times as many samples and epochs" in rows
    assert "a step is 64" not in _notes(stage, "--no-packing")


def _train_split(tmp_path: Path, samples: int, length: int) -> str:
    prefix = tmp_path / "mix-train"
    seqs = [np.arange(length, dtype=np.uint16) for _ in range(samples)]
    write_indexed(f"{prefix}-text", seqs, np.uint16)
    write_indexed(f"{prefix}-role", [np.full(length, 2, np.uint16) for _ in seqs], np.uint16)
    return str(prefix)


def test_epochs_of_the_training_split_are_reported(tmp_path):
    """64 samples of 1024 tokens: 16 packed rows an epoch (at best), 64 samples."""
    prefix = _train_split(tmp_path, 64, 1024)
    rows = _notes(2, "--data_path", prefix, "--global_batch_unit", "rows")
    assert f"--train_iters 519 x 64 rows = at most {519 * 64 / 16:.2f} epochs of its 64" in rows
    for extra in ([], ["--no-packing"]):
        samples = _notes(2, "--data_path", prefix, *extra)
        assert f"519 x 64 samples = {519.0:.2f} epochs of its 64 samples" in samples


def test_validation_split_differs_from_megatrons_split_and_says_so():
    """One --data_path: Megatron-LLM carved valid/test out of it by --split (969,30,1 by default,
    the seed's); we train on all of it and validate on the pretokenizer's -val twin."""
    notes = _notes(1)
    assert "oasst_sft10-val" in notes and "969,30,1" in notes


def test_metrics_default_difference_is_in_the_help():
    """Megatron-LLM's --metrics defaults to none; ours to all four (the seed sets none)."""
    action = next(a for a in build_parser()._actions if "--metrics" in a.option_strings)
    assert len(action.default) == 4 and "Megatron-LLM's default: none" in action.help
