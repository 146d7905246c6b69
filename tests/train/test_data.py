"""The trainer's side of the data pipeline (train/data.py)."""

import pytest

from data.errors import DataError
from tests.train.helpers import write_split
from train.config import DataConfig
from train.data import eval_splits, open_datasets


def test_eval_splits_per_dataset(tmp_path):
    ds = write_split(tmp_path, "mix-val", [4, 5, 6], {"a": [0, 2], "b": [2, 3], "c": [3, 3]})
    got = eval_splits(ds)
    assert list(got) == ["all", "a", "b"]  # an empty dataset range is not evaluated
    assert got["all"] is None and got["b"].tolist() == [2]


def test_an_empty_validation_split_is_not_evaluated(tmp_path):
    # A mix without val_split still writes a -val split, holding no samples. Evaluating it
    # would log loss 0 and perplexity 1 at every --eval_interval, a perfect model.
    ds = write_split(tmp_path, "mix-val", [], {"a": [0, 0], "b": [0, 0]})
    assert len(ds) == 0
    assert eval_splits(ds) == {}


def test_one_dataset_with_validation_samples_is_evaluated_once(tmp_path):
    # The mix has two datasets but only one with a val_split: its own entry would repeat "all"
    # at every evaluation (twice the validation time for the same numbers).
    ds = write_split(tmp_path, "mix-val", [4, 5], {"a": [0, 2], "b": [2, 2]})
    assert list(eval_splits(ds)) == ["all"]


def test_an_empty_training_split_is_refused_with_what_to_do(tmp_path):
    # Every record of the mix skipped (--skip-bad-records on a file in another format): the
    # pretokenizer still writes the split; the trainer says so before it builds the model.
    write_split(tmp_path, "mix-train", [], {"a": [0, 0]})
    cfg = DataConfig(f"{tmp_path}/mix-train", None, None, None, 64, 1, 2, True, False, 0)
    with pytest.raises(DataError, match="mix-train holds no samples") as e:
        open_datasets(cfg)
    assert "mix-train_stats.txt" in str(e.value)
