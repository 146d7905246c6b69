"""More gaps found by mutation testing of train/evaluate.py: the data-parallel sum of
EvalStats.result (taken before dividing, on a copy of the running sums) and the perplexity of an
infinite loss.

The DP sum runs in one process here: torch.distributed's world size and all_reduce are replaced
by a stand-in that adds the sums of one other rank, as a DP all-reduce of two ranks would."""

import math

import pytest
import torch

import train.evaluate as evaluate
from train.evaluate import EvalStats

# the other DP rank's sums, in EvalStats.FIELDS order: loss_sum, tokens, correct,
# instruct_correct, instruct_tokens, rows
OTHER = [10.0, 1.0, 0.0, 0.0, 1.0, 1.0]


@pytest.fixture
def two_ranks(monkeypatch):
    calls = []

    def all_reduce(t, group=None):
        calls.append(group)
        t += torch.tensor(OTHER, dtype=t.dtype)

    monkeypatch.setattr(evaluate.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(evaluate.dist, "all_reduce", all_reduce)
    return calls


def _stats() -> EvalStats:
    """3 loss tokens, loss 1 + 2 + 3, 2 correct, in one row."""
    st = EvalStats("cpu")
    labels = torch.tensor([[1, 2, 3, 4]])
    st.add(torch.tensor([9.0, 1.0, 2.0, 3.0]), torch.tensor([1, 2, 0, 4]), labels,
           torch.tensor([[0.0, 1.0, 1.0, 1.0]]), None, None)  # fmt: skip
    return st


def test_result_sums_over_the_dp_group_before_dividing(two_ranks):
    """Token-weighted over both ranks: (6 + 10) / (3 + 1), not the mean of the two ranks'
    losses (2 and 10); the all-reduce runs on the group given."""
    group = object()
    r = _stats().result(dp_group=group)
    assert two_ranks == [group]
    assert r["loss"] == pytest.approx(16 / 4) and r["loss_tokens"] == 4
    assert r["accuracy"] == pytest.approx(2 / 4) and r["instruct_accuracy"] == pytest.approx(2 / 4)
    assert r["count_loss_mask"] == pytest.approx(4 / 2)


def test_result_reduces_a_copy_so_the_running_sums_stay_this_ranks(two_ranks):
    """A second result() (the log line, then the metrics) gives the same numbers: the
    all-reduce must not add the other ranks into this rank's running sums."""
    st = _stats()
    before = st.sums.clone()
    assert st.result(dp_group=object()) == st.result(dp_group=object())
    assert torch.equal(st.sums, before)


def test_no_reduce_without_a_group_or_on_a_group_of_one(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("all_reduce on a single rank")

    monkeypatch.setattr(evaluate.dist, "all_reduce", boom)
    monkeypatch.setattr(evaluate.dist, "get_world_size", lambda group=None: 1)
    st = _stats()
    assert st.result() == st.result(dp_group=object())


def test_an_infinite_loss_gives_an_infinite_perplexity_not_the_cap():
    """The exp(700) cap is for a finite loss past float range (test_evaluate_mutations.py); an
    infinite loss (an inf logit) stays inf in the perplexity rather than a finite number."""
    st = EvalStats("cpu")
    labels = torch.tensor([[1, 2]])
    st.add(torch.tensor([math.inf, 1.0]), labels.reshape(-1), labels, torch.ones(1, 2), None,
           None)  # fmt: skip
    r = st.result()
    assert r["loss"] == math.inf and r["ppl"] == math.inf
