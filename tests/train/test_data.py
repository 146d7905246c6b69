"""The trainer's side of the data pipeline (train/data.py)."""

import json

import numpy as np

from data.indexed import write_indexed
from data.loader import SFTDataset
from train.data import eval_splits


def _split(tmp_path, name: str, lengths: list[int], ranges: dict) -> SFTDataset:
    texts = [np.arange(n, dtype=np.uint16) + 5 for n in lengths]
    roles = [np.full(n, 2, dtype=np.uint16) for n in lengths]
    write_indexed(f"{tmp_path}/{name}-text", texts, np.uint16)
    write_indexed(f"{tmp_path}/{name}-role", roles, np.uint16)
    meta = {"tokenizer": {"vocab_size": 100, "pad_id": 0}, "dataset_ranges": ranges}
    (tmp_path / f"{name}-meta.json").write_text(json.dumps(meta))
    return SFTDataset(f"{tmp_path}/{name}")


def test_eval_splits_per_dataset(tmp_path):
    ds = _split(tmp_path, "mix-val", [4, 5, 6], {"a": [0, 2], "b": [2, 3], "c": [3, 3]})
    got = eval_splits(ds)
    assert list(got) == ["all", "a", "b"]  # an empty dataset range is not evaluated
    assert got["all"] is None and got["b"].tolist() == [2]


def test_an_empty_validation_split_is_not_evaluated(tmp_path):
    # A mix without val_split still writes a -val split, holding no samples. Evaluating it
    # would log loss 0 and perplexity 1 at every --eval_interval, a perfect model.
    ds = _split(tmp_path, "mix-val", [], {"a": [0, 0], "b": [0, 0]})
    assert len(ds) == 0
    assert eval_splits(ds) == {}


def test_one_dataset_with_validation_samples_is_evaluated_once(tmp_path):
    # The mix has two datasets but only one with a val_split: its own entry would repeat "all"
    # at every evaluation (twice the validation time for the same numbers).
    ds = _split(tmp_path, "mix-val", [4, 5], {"a": [0, 2], "b": [2, 2]})
    assert list(eval_splits(ds)) == ["all"]
