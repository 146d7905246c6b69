"""Edge cases of the loader found in the data-area audit: empty documents and signed id files."""

import numpy as np
import pytest

from data.errors import DataError
from data.indexed import write_indexed
from data.loader import BatchLoader, LoaderConfig, SFTDataset, iter_eval_batches

PAD = 0


def _dataset(tmp_path, texts, roles, text_dtype=np.uint16, role_dtype=np.uint8, name="ds"):
    prefix = tmp_path / name
    write_indexed(f"{prefix}-text", texts, text_dtype)
    write_indexed(f"{prefix}-role", roles, role_dtype)
    return SFTDataset(str(prefix))


def _empty_and_short(tmp_path):
    """Samples 0 and 2 are empty (Megatron's format allows them), 1 and 3 are not."""
    texts = [np.zeros(0, int), np.arange(5) + 10, np.zeros(0, int), np.arange(7) + 20]
    roles = [np.zeros(0, int), np.array([1, 1, 2, 2, 2]), np.zeros(0, int), np.full(7, 2)]
    return _dataset(tmp_path, texts, roles)


@pytest.mark.parametrize("batch_unit", ["rows", "samples"])
def test_empty_documents_add_no_zero_length_segment(tmp_path, batch_unit):
    ds = _empty_and_short(tmp_path)
    cfg = LoaderConfig(8, 2, 4, shuffle=False, batch_unit=batch_unit)
    mbs = BatchLoader(ds, cfg).next_global_batch()
    for mb in mbs:
        cu = mb["cu_seqlens"].numpy()
        B, S = mb["tokens"].shape
        # One segment per non-empty document plus the padding at a row's end, none empty.
        assert cu[0] == 0 and cu[-1] == B * S and np.all(np.diff(cu) > 0), cu.tolist()
    first = mbs[0]
    assert first["cu_seqlens"].tolist() == [0, 5, 8, 15, 16]
    # The non-empty samples are still intact, with their loss where the labels are assistant.
    assert first["tokens"][0, :5].tolist() == list(range(10, 15))
    assert first["loss_mask"][0, :5].tolist() == [0, 1, 1, 1, 0]
    assert first["tokens"][1, :7].tolist() == list(range(20, 27))


def test_eval_with_empty_documents_has_no_zero_length_segment(tmp_path):
    ds = _empty_and_short(tmp_path)
    for mb in iter_eval_batches(ds, LoaderConfig(8, 1, 1)):
        assert np.all(np.diff(mb["cu_seqlens"].numpy()) > 0)


def test_variable_seq_lengths_never_makes_a_zero_width_batch(tmp_path):
    ds = _empty_and_short(tmp_path)
    cfg = LoaderConfig(32, 1, 2, shuffle=False, packing=False, variable_seq_lengths=True)
    mb_empty, mb_five = BatchLoader(ds, cfg).next_global_batch()
    # A micro-batch holding only an empty sample is one rounded block of padding, no loss.
    assert mb_empty["tokens"].shape == (1, 16)
    assert mb_empty["cu_seqlens"].tolist() == [0, 16] and mb_empty["max_seqlen"] == 16
    assert mb_empty["loss_mask"].sum() == 0 and bool((mb_empty["tokens"] == PAD).all())
    assert mb_five["tokens"].shape == (1, 16)


def test_negative_ids_in_signed_files_are_refused(tmp_path):
    texts = [np.array([5, 6, 7]), np.array([8, -3, 9])]
    roles = [np.array([1, 2, 2]), np.array([1, 2, 2])]
    prefix = tmp_path / "neg"
    # The writer refuses negative ids, so write the .bin the way a foreign tool could.
    write_indexed(f"{prefix}-text", [np.abs(t) for t in texts], np.int32)
    (tmp_path / "neg-text.bin").write_bytes(np.concatenate(texts).astype(np.int32).tobytes())
    write_indexed(f"{prefix}-role", roles, np.uint8)
    with pytest.raises(DataError, match=r"neg-text\.bin: token id -3 .*sequence 1"):
        SFTDataset(str(prefix), vocab_size=100)

    ok = [np.array([1, 2, 2]), np.array([1, 2, 2])]
    write_indexed(f"{tmp_path / 'negr'}-text", [np.abs(t) for t in texts], np.int32)
    write_indexed(f"{tmp_path / 'negr'}-role", ok, np.int8)
    (tmp_path / "negr-role.bin").write_bytes(np.array([1, 2, 2, 1, -1, 2], np.int8).tobytes())
    with pytest.raises(DataError, match=r"negr-role\.bin: role id -1 in sequence 1"):
        SFTDataset(str(tmp_path / "negr"), vocab_size=100)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.pop("row_in_epoch"),
        lambda s: s.__setitem__("epoch", "3"),
        lambda s: s.__setitem__("consumed_samples", -8),
        lambda s: s.__setitem__("consumed_documents", None),
    ],
)
def test_a_damaged_state_is_a_data_error(tmp_path, edit):
    ds = _empty_and_short(tmp_path)
    cfg = LoaderConfig(8, 1, 2)
    loader = BatchLoader(ds, cfg)
    loader.next_global_batch()
    state = loader.state_dict()
    edit(state)
    with pytest.raises(DataError, match="cannot resume the data loader: its state lacks valid"):
        BatchLoader(ds, cfg).load_state_dict(state)
