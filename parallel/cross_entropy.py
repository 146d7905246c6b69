"""Cross-entropy (and argmax) over vocab-sharded logits, never gathering the full logits.

Rank r of the TP group holds logits columns [r V_l, (r + 1) V_l) of the padded vocabulary.
Columns >= vocab_size are padding: they are left out of the softmax, so the loss
and its gradient do not depend on how far the vocabulary was padded -- at TP=1 too, where this
is the same code with a group of size 1.

Per token t: loss_t = log Σ_v exp(z_tv - m_t) - (z_t,label - m_t), with m_t the global max.
Each rank's (max, sum of exp) over its columns comes from one read of its logits
(kernels/cross_entropy.py); communication per call: one all-reduce(max) of (T,) and one
all-reduce(sum) of (2, T) (the rescaled denominators and the label's logit travel together).
"""

import torch
import torch.distributed as dist

from kernels.cross_entropy import ce_grad, ce_stats
from parallel.comm import all_gather_dim0, group_rank, group_size


def _valid_columns(local_vocab: int, rank: int, vocab_size: int) -> int:
    return max(0, min(local_vocab, vocab_size - rank * local_vocab))


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Raise unless every label lies in [0, vocab_size). One host read of the labels' range: on
    a device tensor a synchronisation, so callers that hold the labels on the host check there
    (and pass `labels_checked=True` to cross_entropy)."""
    if labels.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) (masked positions too: the loss mask is applied "
            f"by multiplying), found {lo}..{hi}; an ignore index such as -100 is not supported"
        )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The statistics and the gradient come from kernels/cross_entropy.py (Triton on CUDA, the
    reference elsewhere); this class adds the communication and saves the logits themselves
    (in their dtype) for the backward, not an fp32 softmax."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_size):
        local_vocab = logits.shape[1]
        size, rank = group_size(group), group_rank(group)
        start = rank * local_vocab
        valid = _valid_columns(local_vocab, rank, vocab_size)
        m, s, picked = ce_stats(logits, labels, start, valid)  # (T,) each; m = -inf: no column
        if size > 1:
            m_all = m.clone()
            dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
            # this rank's sum rescaled to the global max; a rank of padding only adds 0
            s = torch.where(m > float("-inf"), s * torch.exp(m - m_all), 0.0)
            stats = torch.stack([s, picked])  # (2, T): the denominator and the label's logit
            dist.all_reduce(stats, group=group)
            m, (s, picked) = m_all, stats
        ctx.save_for_backward(logits, labels, m, s)
        ctx.start, ctx.valid = start, valid
        return s.log() + m - picked

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, m, s = ctx.saved_tensors
        # d loss_t / d z_tv = softmax_tv - [v == label_t]; padded columns get 0.
        grad = ce_grad(logits, labels, ctx.start, ctx.valid, m, s, dloss)
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    vocab_size: int | None = None,
    labels_checked: bool = False,
) -> torch.Tensor:
    """Per-token loss in fp32.   logits: (tokens, padded_vocab / tp) this rank's shard,
    labels: (tokens,) global ids in [0, vocab_size) -> (tokens,).

    vocab_size: the real vocabulary; logits of padding columns (>= vocab_size) are excluded.
    None means every column is real. The loss mask is the caller's: multiply the result.
    labels_checked: the caller ran `check_labels` already (on the host copy): skip the check
    here, which on a device tensor waits for the device.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy wants logits (tokens, vocab_local) and labels (tokens,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    padded = logits.shape[1] * group_size(group)
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size {vocab_size} must be in (0, {padded}] (the padded vocabulary)"
        )
    if not labels_checked:
        check_labels(labels, vocab_size)
    return _VocabParallelCrossEntropy.apply(logits, labels, group, vocab_size)


@torch.no_grad()
def argmax(logits: torch.Tensor, group=None, vocab_size: int | None = None) -> torch.Tensor:
    """Global argmax over vocab-sharded logits, padding columns excluded; ties go to the lowest
    id, as torch.argmax.   logits: (tokens, vocab_local) -> (tokens,) int64 (for accuracy)."""
    tokens, local_vocab = logits.shape
    size, rank = group_size(group), group_rank(group)
    vocab_size = local_vocab * size if vocab_size is None else vocab_size
    valid = _valid_columns(local_vocab, rank, vocab_size)
    if valid > 0:
        best, idx = logits[:, :valid].float().max(dim=-1)
    else:
        best = logits.new_full((tokens,), float("-inf"), dtype=torch.float32)
        idx = torch.zeros(tokens, dtype=torch.long, device=logits.device)
    idx = idx + rank * local_vocab
    if size == 1:
        return idx
    every_best = all_gather_dim0(best.unsqueeze(0), group)  # (size, T)
    every_idx = all_gather_dim0(idx.unsqueeze(0), group)  # (size, T)
    winner = every_best.argmax(dim=0, keepdim=True)  # first max: the lowest rank, lowest id
    return every_idx.gather(0, winner).squeeze(0)
