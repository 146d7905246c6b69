"""The start-up description of a run (train/describe.py): the parameter line, the predicted
state footprint and the notes on Megatron-LLM's meaning of the same flags, pinned where a hand
mutation pass found the dry-run tests blind."""

import dataclasses
import errno
from pathlib import Path

import numpy as np
import pytest

from data.indexed import write_indexed
from train.args import parse_args
from train.describe import describe, state_footprint_line
from train.footprint import footprint
from train.resolve import resolve

ROOT = Path(__file__).resolve().parents[2]
STAGE = {s: ROOT / "configs" / "train" / f"llama2-70b-stage{s}.args" for s in (1, 2)}


def _resolve(stage: int, *extra: str, world_size: int = 32):
    """The seed's list on the card's layout (TP 8 x PP 4 on 32 ranks) unless `extra` says."""
    ns, given = parse_args([f"@{STAGE[stage]}", *extra])
    return resolve(ns, given, world_size=world_size)


def _lines(rc, start: str) -> list[str]:
    return [x for x in describe(rc).splitlines() if x.startswith(start)]


def test_the_parameter_line_of_the_70b_seed():
    """The padded vocabulary is the one the model is built with (32007 -> 32768 at TP 8), and a
    (tp, pp) rank's share of 69 B parameters over 8 x 4 ranks is about 2.16 B (not 8.6 B per
    TP rank, nor 2156 M: billions from 1e9 up)."""
    (line,) = _lines(_resolve(1), "parameters:")
    assert "68,989,231,104 (68.99 B)" in line
    assert "padded to 32768 (vocab 32007, tp 8)" in line
    assert line.endswith("per (tp, pp) rank about 2.16 B")


def test_the_state_line_uses_the_padded_vocabulary():
    """The embedding and the head are built with the padded vocabulary: 761 rows more here,
    which shows in the predicted GiB."""
    rc = _resolve(1)
    padded = rc.model.padded_vocab_size(8)
    fp = footprint(rc.model, padded, 8, 4, 1, bf16=True, distributed=False)
    unpadded = footprint(rc.model, rc.model.vocab_size, 8, 4, 1, bf16=True, distributed=False)
    assert fp.line() != unpadded.line()
    line = state_footprint_line(rc)
    assert f"(bf16 weights on GPU, GiB): {fp.line()}, before activations" in line


def test_the_state_line_says_fp32_and_offloaded_state_and_no_dp1_suggestion(tmp_path):
    """fp32 weights are called so; an offloaded optimizer's state is counted in host memory;
    at data parallel size 1 the distributed optimizer shards nothing, so it is not suggested."""
    from tests.train.helpers import tiny_run

    rc, _, _ = tiny_run()
    assert not rc.loop.bf16 and rc.parallel.dp == 1 and not rc.optim.distributed
    line = state_footprint_line(rc)
    assert "(fp32 weights, GiB)" in line and "would make it" not in line
    rc = _resolve(1, "--use_distributed_optimizer", "--optimizer_cpu_offload")
    assert "GiB of host memory" in state_footprint_line(rc)


def test_items_that_cannot_run_yet_are_listed():
    """A configuration valid but not runnable in this checkout (no TP runtime importable) says
    so under its own heading."""
    rc = dataclasses.replace(_resolve(1), deferred=["--tensor_model_parallel_size 8: later"])
    text = describe(rc)
    assert "cannot run yet:\n  - --tensor_model_parallel_size 8: later" in text


def _split(tmp_path: Path, lengths: list[int]) -> str:
    prefix = tmp_path / "mix-train"
    write_indexed(f"{prefix}-text", [np.zeros(n, np.uint16) for n in lengths], np.uint16)
    write_indexed(f"{prefix}-role", [np.full(n, 2, np.uint16) for n in lengths], np.uint16)
    return str(prefix)


def test_packed_epochs_cut_long_samples_to_a_row_and_round_rows_up(tmp_path):
    """seq_length 4096: a 9000-token sample fills one row (the rest is cut), and 4196 tokens
    need 2 rows, so an epoch is at least 2 rows: 519 x 64 rows are at most 16608 epochs."""
    prefix = _split(tmp_path, [9000, 100])
    notes = "\n".join(_resolve(2, "--data_path", prefix, "--global_batch_unit", "rows").notes)
    assert f"519 x 64 rows = at most {519 * 64 / 2:.2f} epochs of its 2 samples" in notes


def test_rows_without_packing_are_samples(tmp_path):
    """Without packing a row is one sample, whatever --global_batch_unit says: neither the note
    on packed rows nor an "at most" epoch count."""
    prefix = _split(tmp_path, [9000, 100])
    rc = _resolve(2, "--data_path", prefix, "--no-packing", "--global_batch_unit", "rows")
    notes = "\n".join(rc.notes)
    assert "packed with whole samples" not in notes
    assert f"519 x 64 samples = {519 * 64 / 2:.2f} epochs of its 2 samples" in notes


@pytest.mark.parametrize("how", ["empty", "unreadable"])
def test_a_split_without_samples_or_unreadable_has_no_epoch_note(tmp_path, monkeypatch, how):
    """The epoch note is left out (the data checks report the split itself), not a division by
    zero or a read error escaping from the dry run."""
    prefix = _split(tmp_path, [] if how == "empty" else [10])
    if how == "unreadable":
        from data import indexed

        def unreadable(self, prefix):
            raise OSError(errno.EIO, "Input/output error", prefix)

        monkeypatch.setattr(indexed.IndexedDataset, "__init__", unreadable)
    notes = "\n".join(_resolve(2, "--data_path", prefix).notes)
    assert "epochs of its" not in notes and "lr(s - 1)" in notes


def test_the_packing_note_names_the_micro_batch_upper_bound():
    """Packed samples fill fewer rows than samples: the note says that [loop] num_microbatches
    (64 / (2 x DP 1) = 32 here) is the unpacked count, an upper bound, and the micro-batch size
    in rows."""
    rc = _resolve(1)
    notes = "\n".join(rc.notes)
    assert rc.loop.num_microbatches == 32
    assert (
        "the micro-batches of 2 rows those rows need, fewer than [loop] num_microbatches" in notes
    )
    assert "(the unpacked count, an upper bound)" in notes
    rc = _resolve(1, "--no-packing")
    assert "num_microbatches" not in "\n".join(rc.notes)
