"""Gaps found by mutation testing of train/loop.py: the step's counts at PP = 1 (tokens, causal
pairs, truncated samples, loss tokens), micro-batches and steps without loss tokens under both
loss reductions."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.train.helpers import VOCAB, make_doc, pack_micro_batch, tiny_run
from train.loop import Trainer, build_model


def _micro_batches(shapes=((6, 20, 2), (2, 60, 1), (1, 10, 4))) -> list[dict]:
    """Micro-batches of (documents, length, rows): different row counts, so that the counts of
    tokens and attention pairs tell one micro-batch from another."""
    g = torch.Generator().manual_seed(3)
    return [pack_micro_batch([make_doc(g, n) for _ in range(docs)], rows, 64)
            for docs, n, rows in shapes]  # fmt: skip


def _pairs(cu: torch.Tensor) -> int:
    lengths = (cu[1:] - cu[:-1]).tolist()
    return sum(n * (n + 1) // 2 for n in lengths)


def test_step_counts_every_micro_batch_tokens_pairs_and_truncated_samples():
    """StepResult at PP = 1, DP = 1: tokens are all rows of all micro-batches (what tokens/s and
    MFU divide), pairs the causal attention pairs of every document (the attention FLOPs),
    truncated the samples cut to --seq_length, loss_tokens the loss-mask count; each field in
    its place (a swap of tokens and pairs would mislabel the throughput figures)."""
    rc, dims, tok = tiny_run(["--clip_grad", "0"])
    trainer = Trainer(rc, dims, tok)
    mbs = _micro_batches()
    for mb, cut in zip(mbs, (1, 0, 2)):
        mb["num_truncated"] = cut
    res = trainer.train_step(mbs, lr=0.0)
    assert res.tokens == sum(mb["tokens"].numel() for mb in mbs) == 64 * 7
    assert res.pairs == sum(_pairs(mb["cu_seqlens"]) for mb in mbs)
    assert res.pairs != res.tokens
    assert res.truncated == 3
    assert res.loss_tokens == sum(int(mb["loss_mask"].sum()) for mb in mbs)
    assert not res.skipped and math.isfinite(res.grad_norm) and res.grad_norm > 0


def test_micro_batch_without_loss_tokens_counts_zero_in_the_micro_batch_mean():
    """--loss_reduction microbatch: a micro-batch without loss tokens contributes 0 to the mean
    of per-micro-batch means (Megatron's 0 / 0 would be NaN and skip the step), and still counts
    in the divisor: loss = (mean_0 + mean_2 + 0) / 3, and the gradients are those of it."""
    rc, dims, tok = tiny_run(["--loss_reduction", "microbatch", "--clip_grad", "0"])
    trainer = Trainer(rc, dims, tok)
    mbs = _micro_batches()
    mbs[1] = {**mbs[1], "loss_mask": torch.zeros_like(mbs[1]["loss_mask"])}
    ref = build_model(rc, dims, "cpu", torch.float32)
    ref.load_state_dict(trainer.model.state_dict())
    hand = 0.0
    for mb in mbs:
        logits = ref(mb["tokens"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
        ce = F.cross_entropy(logits[:, :VOCAB], mb["labels"].reshape(-1), reduction="none")
        m = mb["loss_mask"].reshape(-1)
        if m.sum() > 0:
            hand = hand + (ce * m).sum() / m.sum()
    hand = hand / len(mbs)
    hand.backward()
    res = trainer.train_step(mbs, lr=0.0)
    assert not res.skipped and math.isfinite(res.grad_norm)
    assert res.loss == pytest.approx(hand.item(), rel=1e-6)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["global", "microbatch"])
def test_step_without_any_loss_tokens_is_a_zero_loss_not_an_error(mode):
    """A global batch whose loss masks are all zero (possible with tiny batches of prompt-only
    samples): loss 0 and zero gradients, the step taken; no division by zero, no NaN that would
    be logged as a skipped step."""
    rc, dims, tok = tiny_run(["--loss_reduction", mode])
    trainer = Trainer(rc, dims, tok)
    mbs = [{**mb, "loss_mask": torch.zeros_like(mb["loss_mask"])} for mb in _micro_batches()]
    res = trainer.train_step(mbs, lr=1e-3)
    assert res.loss == 0.0 and res.loss_tokens == 0
    assert not res.skipped and res.grad_norm == 0.0
    assert trainer.optimizer.step_count == 1


def test_train_step_trains_with_dropout_whatever_mode_the_model_was_left_in():
    """train_step puts every stage in train mode itself: a model left in eval mode (by a caller,
    a debugging hook, an interrupted evaluation) still trains with its hidden dropout, the same
    step as from train mode."""
    losses = []
    for leave_in_eval in (False, True):
        rc, dims, tok = tiny_run(["--hidden_dropout", "0.3", "--clip_grad", "0"])
        trainer = Trainer(rc, dims, tok)
        if leave_in_eval:
            for s in trainer.stages:
                s.eval()
        torch.manual_seed(7)
        losses.append(trainer.train_step(_micro_batches(), lr=0.0).loss)
        assert all(m.training for s in trainer.stages for m in s.modules())
    rc, dims, tok = tiny_run(["--clip_grad", "0"])  # the same weights without dropout
    no_dropout = Trainer(rc, dims, tok).train_step(_micro_batches(), lr=0.0).loss
    assert losses[0] == losses[1] != no_dropout


@pytest.mark.parametrize("where", ["train_step", "evaluate"])
def test_token_ids_past_the_vocabulary_but_inside_the_padding_are_refused(where):
    """The trainer turns the embedding's own id check off and checks the loader's host copy
    instead. An id in [vocab_size, padded_vocab) would otherwise train silently on a padding row
    (no index error: the row exists): both the step and the evaluation must refuse it."""
    rc, dims, tok = tiny_run()
    trainer = Trainer(rc, dims, tok)
    assert trainer.padded_vocab > VOCAB
    mbs = _micro_batches()
    mbs[2] = {**mbs[2], "tokens": mbs[2]["tokens"].clone()}
    mbs[2]["tokens"][0, 3] = VOCAB
    with pytest.raises(ValueError, match=f"token id {VOCAB} .* outside the model's vocabulary"):
        if where == "train_step":
            trainer.train_step(mbs, lr=1e-3)
        else:
            trainer.evaluate(mbs)


def test_evaluate_drops_the_tokenizers_chatml_scaffolding_from_instruct_accuracy():
    """Trainer.evaluate hands the tokenizer's <|im_start|>/<|im_end|> ids to the metrics:
    instruct_accuracy is the accuracy over the loss-mask tokens minus each id's label and the
    two after it, computed here from the same logits by hand."""
    from dataclasses import replace

    from parallel.cross_entropy import argmax
    from train.evaluate import instruct_mask

    rc, dims, tok = tiny_run()
    S, E = 11, 17
    trainer = Trainer(rc, dims, replace(tok, im_start=S, im_end=E))
    mb = _micro_batches()[0]
    with torch.no_grad():
        logits = trainer.model.eval()(mb["tokens"], mb["position_ids"], mb["cu_seqlens"],
                                      mb["max_seqlen"])  # fmt: skip
    trainer.model.train()
    pred = argmax(logits, None, vocab_size=VOCAB)
    # labels the model predicts, except scaffolding ids it does not: accuracy below 1 only
    # because of the scaffolding, which instruct_accuracy leaves out
    labels = pred.reshape(mb["labels"].shape).clone()
    labels[:, 30:60:6] = S
    labels[:, 33:60:6] = E
    mask = torch.ones_like(mb["loss_mask"])
    got = trainer.evaluate([{**mb, "labels": labels, "loss_mask": mask}])
    hit = (pred == labels.reshape(-1)).double()
    im = instruct_mask(labels, mask, S, E).reshape(-1).double()
    assert 0 < im.sum() < mask.numel() and hit.sum() < mask.numel()
    assert got["accuracy"] == pytest.approx(float(hit.sum() / mask.numel()))
    assert got["instruct_accuracy"] == pytest.approx(float((hit * im).sum() / im.sum()))
    assert got["instruct_accuracy"] == 1.0 > got["accuracy"]


def test_evaluate_reports_only_the_metrics_asked_for():
    """--metrics perplexity: the loss, its token count and the perplexity, not the accuracies
    or count_loss_mask (Megatron-LLM reports only the metrics named)."""
    rc, dims, tok = tiny_run(["--metrics", "perplexity"])
    got = Trainer(rc, dims, tok).evaluate(_micro_batches())
    assert set(got) == {"loss", "loss_tokens", "ppl"}
