"""Loader behaviour pinned after a mutation-testing pass: each test kills a mutant of
data/loader.py that the other loader tests let through (a boundary moved, a condition dropped,
a counter not kept), so a change of that behaviour now fails a test."""

import json

import numpy as np
import pytest

from data.errors import DataError
from data.indexed import write_indexed
from data.loader import (
    BatchLoader,
    LoaderConfig,
    SFTDataset,
    build_micro_batch,
    iter_eval_batches,
    pack_rows,
)
from tests.data.test_loader import PAD, check_micro_batch, make_dataset


def _rows(samples: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [samples[offsets[k] : offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]


def _step(loader: BatchLoader, texts, roles) -> list[int]:
    """The samples of this rank's next global batch, in row order (invariants checked)."""
    return [
        i
        for mb in loader.next_global_batch()
        for i in check_micro_batch(mb, texts, roles, loader.cfg)
    ]


def _samples_cfg(**kw) -> LoaderConfig:
    base = dict(seq_length=64, micro_batch_size=2, global_batch_size=8, batch_unit="samples")
    return LoaderConfig(**{**base, **kw})


# -- configuration --------------------------------------------------------------------------


def test_config_lower_bounds_are_exact():
    """seq_length 2 is the least that has a label (1 is refused), and a global batch of 0 is
    refused in both units: 0 passes every divisibility check, and a step of no samples would
    never advance the stream."""
    LoaderConfig(seq_length=2, micro_batch_size=1, global_batch_size=1).validate()
    with pytest.raises(ValueError, match="seq_length=1 must be at least 2"):
        LoaderConfig(seq_length=1, micro_batch_size=1, global_batch_size=1).validate()
    for unit in ("rows", "samples"):
        with pytest.raises(ValueError, match="global_batch_size must be positive"):
            LoaderConfig(64, 1, 0, batch_unit=unit).validate()


# -- packing --------------------------------------------------------------------------------


def test_pack_rows_emits_a_longer_than_row_sample_at_its_place():
    """A sample longer than a row counts as seq_length tokens: its row is full and leaves at
    once, in sample order. Uncapped, its room would go negative, the row would stay open (taking
    one of the 8 slots) and be emitted after the rows of later samples."""
    samples, offsets = pack_rows(np.arange(3), np.array([100, 64, 10]), 64)
    assert _rows(samples, offsets) == [[0], [1], [2]]


def test_padding_mode_marks_a_row_boundary_after_a_full_row(tmp_path):
    """Without packing every row is one segment, a row its sample fills to the last token (or
    a truncated one) included: cu_seqlens must still end a segment there, or flash attention
    would attend across the two rows."""
    prefix, _, _ = make_dataset(tmp_path, [64, 100, 5])
    cfg = LoaderConfig(64, 3, 3, packing=False, shuffle=False)
    [mb] = BatchLoader(SFTDataset(prefix), cfg).next_global_batch()
    assert mb["cu_seqlens"].tolist() == [0, 64, 128, 192] and mb["max_seqlen"] == 64
    assert mb["num_truncated"] == 1


def test_micro_batches_count_the_samples_of_packed_rows(tmp_path):
    """num_samples (the evaluation's per-sample metrics) counts samples, not rows: eight short
    samples packed into two rows are eight samples."""
    prefix, texts, roles = make_dataset(tmp_path, [10] * 8)
    ds = SFTDataset(prefix)
    [mb] = BatchLoader(ds, _samples_cfg(shuffle=False)).next_global_batch()
    assert mb["num_rows"] == 2 and mb["num_samples"] == 8
    cfg = LoaderConfig(64, 2, 2)
    assert sum(mb["num_samples"] for mb in iter_eval_batches(ds, cfg)) == 8


def test_empty_rows_given_to_build_micro_batch_are_padding_rows(tmp_path):
    """build_micro_batch takes empty rows as all-padding rows: no loss, and num_rows (what
    per-row metrics count) leaves them out."""
    prefix, _, _ = make_dataset(tmp_path, [5, 6])
    cfg = LoaderConfig(8, 2, 2, packing=False)
    mb = build_micro_batch(SFTDataset(prefix), [np.array([1]), np.array([], np.int64)], cfg)
    assert mb["tokens"].shape == (2, 8) and mb["num_rows"] == 1 and mb["num_samples"] == 1
    assert mb["loss_mask"][1].sum() == 0 and mb["tokens"][1].tolist() == [PAD] * 8


def test_pad_id_of_the_config_overrides_the_datasets(tmp_path):
    """LoaderConfig.pad_id, when given, is the padding token of inputs and labels (the dataset's
    pad id, 4999 here, otherwise)."""
    prefix, _, _ = make_dataset(tmp_path, [5])
    ds = SFTDataset(prefix)
    cfg = LoaderConfig(8, 1, 1, packing=False, pad_id=7)
    [mb] = BatchLoader(ds, cfg).next_global_batch()
    assert mb["tokens"][0, 5:].tolist() == [7, 7, 7] and mb["labels"][0, 4:].tolist() == [7] * 4


def test_a_samples_step_packs_its_samples_in_stream_order(tmp_path):
    """A step of samples packs them in the epoch's (shuffled) order, not e.g. sorted by index:
    which samples share a row follows the seeded order, as in rows mode."""
    lengths = np.random.default_rng(7).integers(3, 60, size=24).tolist()
    prefix, texts, roles = make_dataset(tmp_path, lengths)
    ds = SFTDataset(prefix)
    ld = BatchLoader(ds, _samples_cfg(seed=11))
    want, _ = pack_rows(ld._order(0)[:8], ds.sizes, 64)
    assert _step(ld, texts, roles) == want.tolist()


# -- the stream, drop_last, counters -------------------------------------------------------------


def test_indices_past_the_dataset_are_refused(tmp_path):
    """indices must lie in [0, len(dataset)): len(dataset) itself is refused when the loader is
    made, not met as an IndexError in the middle of training."""
    prefix, _, _ = make_dataset(tmp_path, [5, 6, 7])
    ds = SFTDataset(prefix)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 3\)"):
        BatchLoader(ds, LoaderConfig(8, 1, 1), indices=np.array([0, 3]))


def test_an_epoch_of_samples_is_the_given_indices(tmp_path):
    """With batch_unit samples an epoch is the samples the loader was given (a dataset's range),
    not the whole file."""
    prefix, _, _ = make_dataset(tmp_path, [5] * 12)
    ld = BatchLoader(SFTDataset(prefix), _samples_cfg(), indices=np.arange(2, 7))
    assert ld.rows_per_epoch == 5


def test_drop_last_with_samples_at_and_past_an_exact_fit(tmp_path):
    """drop_last in samples mode skips only an epoch's tail *shorter* than a global batch:
    an epoch of exactly G samples is one step (not refused), an epoch of 2G is two steps in that
    epoch; with 10 samples and G = 4 the third step is the first 4 of epoch 1 (the 2 left over
    are dropped, not joined with the next epoch's)."""
    prefix, texts, roles = make_dataset(tmp_path, [10] * 10)
    ds = SFTDataset(prefix)
    two = BatchLoader(ds, _samples_cfg(global_batch_size=5, drop_last=True))
    steps = [_step(two, texts, roles) for _ in range(2)]
    assert sorted(steps[0] + steps[1]) == list(range(10)) and two.epoch == 0

    ld = BatchLoader(ds, _samples_cfg(global_batch_size=4, drop_last=True))
    for _ in range(2):
        _step(ld, texts, roles)
    third = _step(ld, texts, roles)
    assert sorted(third) == sorted(ld._order(1)[:4].tolist())
    state = ld.state_dict()
    assert (state["epoch"], state["row_in_epoch"], state["consumed_samples"]) == (1, 4, 12)

    # Last: were an exact fit dropped, this one would skip every epoch and never return.
    exact = BatchLoader(ds, _samples_cfg(global_batch_size=10, drop_last=True))
    assert sorted(_step(exact, texts, roles)) == list(range(10))


def test_drop_last_with_rows_takes_an_epoch_of_exactly_one_global_batch(tmp_path):
    """An epoch of exactly G rows fills a global batch: drop_last refuses only fewer rows."""
    prefix, _, _ = make_dataset(tmp_path, [10] * 4)
    cfg = LoaderConfig(10, 1, 4, packing=False, shuffle=False, drop_last=True)
    ld = BatchLoader(SFTDataset(prefix), cfg)
    for _epoch in range(2):
        docs = [int(mb["tokens"][0, 0]) - 10 for mb in ld.next_global_batch()]
        assert docs == [0, 1, 2, 3]


def test_consumed_documents_counts_samples_in_both_units(tmp_path):
    """The state's consumed_documents counts samples: those of the packed rows taken (rows
    mode), the global batch's samples (samples mode); not rows."""
    prefix, _, _ = make_dataset(tmp_path, [10] * 12)
    ds = SFTDataset(prefix)
    rows = BatchLoader(ds, LoaderConfig(64, 1, 2, shuffle=False))
    mbs = rows.next_global_batch()
    state = rows.state_dict()
    assert state["consumed_samples"] == 2  # rows
    assert state["consumed_documents"] == sum(mb["num_samples"] for mb in mbs) == 12
    samples = BatchLoader(ds, _samples_cfg(global_batch_size=4))
    samples.next_global_batch()
    assert samples.state_dict()["consumed_documents"] == 4


@pytest.mark.parametrize(
    "change",
    [
        {"indices": np.arange(5)},  # num_samples
        {"drop_last": True},
        {"packing": False},
        {"shuffle": False},
    ],
)
def test_resume_refuses_a_state_of_another_stream(tmp_path, change):
    """Every field that defines the row stream is checked on resume: the number of samples, the
    seed, seq_length, packing, shuffle, drop_last and the batch unit; another value would
    silently continue with other batches."""
    prefix, _, _ = make_dataset(tmp_path, [10] * 10)
    ds = SFTDataset(prefix)
    base = dict(seq_length=10, micro_batch_size=1, global_batch_size=2)
    state = json.loads(json.dumps(BatchLoader(ds, LoaderConfig(**base)).state_dict()))
    change = dict(change)
    indices = change.pop("indices", None)
    other = BatchLoader(ds, LoaderConfig(**{**base, **change}), indices=indices)
    key = "num_samples" if indices is not None else next(iter(change))
    with pytest.raises(DataError, match=f"cannot resume the data loader: {key} was"):
        other.load_state_dict(state)


def test_a_state_without_a_version_is_refused(tmp_path):
    """A state must say its version: one without (not a loader state, or damaged) is refused
    rather than read as the current layout."""
    prefix, _, _ = make_dataset(tmp_path, [10] * 4)
    ds = SFTDataset(prefix)
    state = BatchLoader(ds, LoaderConfig(10, 1, 2)).state_dict()
    del state["version"]
    with pytest.raises(DataError, match="data loader state version None; expected 1"):
        BatchLoader(ds, LoaderConfig(10, 1, 2)).load_state_dict(state)


# -- evaluation -----------------------------------------------------------------------------


def test_eval_micro_batches_go_round_robin_over_ranks(tmp_path):
    """Micro-batch j goes to rank j % dp_size, so the first k micro-batches of every rank are
    the first k x dp_size of the pass: train.data.eval_batches takes a prefix of each rank's
    stream and must see the same samples at any DP size."""
    lengths = np.random.default_rng(8).integers(3, 60, size=30).tolist()
    prefix, _, _ = make_dataset(tmp_path, lengths)
    ds = SFTDataset(prefix)
    single = list(iter_eval_batches(ds, LoaderConfig(64, 1, 1)))
    for rank in range(3):
        cfg = LoaderConfig(64, 1, 3, dp_size=3, dp_rank=rank)
        for k, mb in enumerate(iter_eval_batches(ds, cfg)):
            j = k * 3 + rank
            if j < len(single):
                assert mb["tokens"].equal(single[j]["tokens"]), (rank, k)


# -- dataset checks -------------------------------------------------------------------------


def test_role_and_token_bounds_are_exact(tmp_path):
    """Role ids above 3 (CONTEXT) are refused, 4 included; a token id equal to the vocabulary
    size is refused (ids are 0..vocab-1), one below it is accepted."""
    bad, _, _ = make_dataset(
        tmp_path, [4, 4], name="r4", roles_fn=lambda i, n: np.full(n, 4 if i else 3)
    )
    with pytest.raises(DataError, match=r"role id 4 in sequence 1"):
        SFTDataset(bad)
    prefix, texts, _ = make_dataset(tmp_path, [5, 6])
    hi = int(max(t.max() for t in texts))
    SFTDataset(prefix, vocab_size=hi + 1)
    with pytest.raises(DataError, match=rf"token id {hi} >= vocab size {hi}"):
        SFTDataset(prefix, vocab_size=hi)


def test_meta_pad_id_must_be_a_non_negative_integer(tmp_path):
    """The meta file's pad_id is checked like its vocab_size: a string or a negative id is a
    DataError naming the file, not a padding token of the wrong type later; 0 is a valid id."""
    prefix, _, _ = make_dataset(tmp_path, [4, 5])
    (tmp_path / "ds-meta.json").write_text('{"tokenizer": {"pad_id": 0}}')
    assert SFTDataset(prefix).pad_id == 0
    for bad in ('"x"', "-1"):
        (tmp_path / "ds-meta.json").write_text(f'{{"tokenizer": {{"pad_id": {bad}}}}}')
        with pytest.raises(DataError, match="tokenizer.pad_id must be a non-negative integer"):
            SFTDataset(prefix)


def test_a_role_file_with_extra_sequences_names_where_they_start(tmp_path):
    """Text and role files that agree on their common sequences but not on the count: the first
    difference is the first sequence only one of them has."""
    prefix, _, _ = make_dataset(tmp_path, [5, 6, 7])
    write_indexed(f"{prefix}-role", [np.ones(n) for n in (5, 6, 7, 8)], np.uint16)
    with pytest.raises(DataError, match=r"\(4 vs 3 sequences; first difference at sequence 3\)"):
        SFTDataset(prefix)


def test_tokenizer_fingerprints_are_compared_whole(tmp_path):
    """The message shows 12 characters of each fingerprint, the check compares all of them."""
    prefix, _, _ = make_dataset(tmp_path, [5])
    ds = SFTDataset(prefix)
    with pytest.raises(DataError, match="made with tokenizer"):
        ds.check_tokenizer("f" * 12 + "0" * 52)
