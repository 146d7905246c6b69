"""Gaps found by mutation testing of train/evaluate.py: instruct accuracy through EvalStats with
the ChatML ids known (its own numerator and denominator), one of the two ids unknown, and the
edges of the ratios (no batches at all, an overflowing perplexity)."""

import math

import pytest
import torch

from train.evaluate import EvalStats, instruct_mask

S, E = 90, 91  # stand-ins for <|im_start|>, <|im_end|>


def test_instruct_mask_with_only_one_chatml_id_known():
    """A tokenizer that knows <|im_end|> but not <|im_start|> (or the reverse) still drops the
    known id's scaffolding: an unknown id is skipped, not the end of the loop."""
    labels = torch.tensor([[5, E, 6, 7, 8, S, 9, 4]])
    mask = torch.ones(1, 8)
    only_end = torch.tensor([[1, 0, 0, 0, 1, 1, 1, 1]]).float()
    only_start = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]]).float()
    assert torch.equal(instruct_mask(labels, mask, None, E), only_end)
    assert torch.equal(instruct_mask(labels, mask, S, None), only_start)


def test_instruct_accuracy_counts_only_reply_tokens_of_the_loss_mask():
    """instruct_accuracy = correct reply tokens / reply tokens, where the reply tokens are the
    loss-mask tokens minus the ChatML scaffolding; accuracy keeps every loss-mask token. Here one
    scaffolding label (after <|im_end|>) is predicted right and one reply label wrong, so the
    two metrics differ in both numerator and denominator."""
    st = EvalStats("cpu")
    labels = torch.tensor([[1, 2, 3, E, 4, 5, 6, 7]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1, 1, 1]])
    pred = torch.tensor([1, 2, 3, 0, 4, 0, 6, 0])
    st.add(torch.zeros(8), pred, labels, mask, S, E)
    r = st.result()
    # loss-mask tokens: positions 1..7 (7), correct at 1, 2, 4, 6 -> 4 / 7
    assert r["accuracy"] == pytest.approx(4 / 7)
    # reply tokens: 1, 2, 6, 7 (3..5 are scaffolding) -> correct 1, 2, 6 -> 3 / 4
    assert r["instruct_accuracy"] == pytest.approx(3 / 4)


def test_an_evaluation_without_batches_gives_nan_not_an_error():
    """A validation split with nothing in it (or a rank that saw no batch, before the DP sum):
    NaN ratios and a zero count, no ZeroDivisionError."""
    r = EvalStats("cpu").result()
    assert r["loss_tokens"] == 0 and r["count_loss_mask"] == 0.0
    assert all(math.isnan(r[k]) for k in ("loss", "ppl", "accuracy", "instruct_accuracy"))


def test_a_huge_loss_gives_a_finite_perplexity_instead_of_overflowing():
    """exp(loss) overflows a float past loss 709 (a diverged run): the perplexity is capped at
    exp(700) rather than raising OverflowError and losing the evaluation's log line."""
    st = EvalStats("cpu")
    labels = torch.tensor([[1, 2]])
    st.add(torch.tensor([800.0, 800.0]), labels.reshape(-1), labels, torch.ones(1, 2), None, None)
    r = st.result()
    assert r["loss"] == 800.0 and r["ppl"] == math.exp(700.0)
