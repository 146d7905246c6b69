"""Validation metrics against hand computations."""

import math

import pytest
import torch

from tests.train.helpers import SyntheticLoader, tiny_run
from train.evaluate import EvalStats, instruct_mask
from train.loop import Trainer

S, E = 90, 91  # stand-ins for <|im_start|>, <|im_end|>


def test_instruct_mask_drops_chatml_scaffolding():
    labels = torch.tensor([[S, 5, 6, 7, 8, E, 9, 4, S, 1], [1, 2, 3, 4, 5, 6, 7, 8, E, 3]])
    mask = torch.ones(2, 10)
    got = instruct_mask(labels, mask, S, E)
    want = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]).float()
    assert torch.equal(got, want)
    assert torch.equal(instruct_mask(labels, mask, None, None), mask)


def test_eval_stats_by_hand():
    st = EvalStats("cpu")
    labels = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    loss = torch.tensor([9.0, 1.0, 2.0, 3.0])
    pred = torch.tensor([1, 2, 0, 4])
    st.add(loss, pred, labels, mask, None, None)
    r = st.result()
    assert r["loss"] == pytest.approx(2.0) and r["ppl"] == pytest.approx(math.exp(2.0))
    assert r["accuracy"] == pytest.approx(2 / 3) and r["count_loss_mask"] == pytest.approx(3.0)
    assert r["instruct_accuracy"] == pytest.approx(2 / 3)


def test_trainer_evaluate_matches_loss_and_is_repeatable():
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    a = trainer.evaluate(_micro_batches(7, 2))
    b = trainer.evaluate(_micro_batches(7, 2))
    assert a == b and trainer.model.training
    assert 0.0 <= a["accuracy"] <= 1.0 and a["loss_tokens"] > 0
    # the eval loss of a batch equals the training loss definition on it (no dropout either way)
    mbs = SyntheticLoader(2, 64, 2, seed=7).next_global_batch()
    one = trainer.evaluate(mbs)
    res = trainer.train_step(mbs, lr=0.0)
    assert one["loss"] == pytest.approx(res.loss, rel=1e-6)


def _micro_batches(seed, steps):
    loader = SyntheticLoader(2, 64, 2, seed=seed)
    return [mb for _ in range(steps) for mb in loader.next_global_batch()]


def test_no_loss_tokens_is_no_result_rather_than_a_perfect_one():
    st = EvalStats("cpu")
    labels = torch.tensor([[1, 2, 3, 4]])
    st.add(torch.tensor([9.0, 1.0, 2.0, 3.0]), labels.reshape(-1), labels, torch.zeros(1, 4),
           None, None)  # fmt: skip
    r = st.result()
    assert r["loss_tokens"] == 0
    for key in ("loss", "ppl", "accuracy", "instruct_accuracy"):
        assert math.isnan(r[key]), (key, r[key])  # not loss 0 / perplexity 1 / accuracy 0
    assert r["count_loss_mask"] == 0.0  # zero loss tokens per row is a true count
