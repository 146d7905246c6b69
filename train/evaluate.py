"""Validation metrics over the loss-mask tokens of the validation split.

For every evaluated micro-batch, with per-token cross-entropy l_t, loss mask m_t in {0, 1},
prediction p_t = argmax of the logits over the real (unpadded) vocabulary and label y_t:

- loss:              sum_t m_t l_t / sum_t m_t, over all evaluated batches (token-weighted mean)
- perplexity:        exp(loss)
- accuracy:          sum_t m_t [p_t == y_t] / sum_t m_t   (p_t: parallel.cross_entropy.argmax)
- instruct_accuracy: the same over the instruct mask i_t = m_t * k_t, where k_t = 0 at the label
                     positions that are ChatML scaffolding rather than reply text: each label equal
                     to <|im_start|> and the two labels after it in its row (role name, newline),
                     and each label equal to <|im_end|> and the two after it (as Megatron-LLM's
                     metric); k_t = 1 elsewhere. With no ChatML ids known it equals accuracy.
- count_loss_mask:   sum_t m_t / number of samples evaluated (DP padding rows hold none): loss
                     tokens per sample, Megatron-LLM's loss tokens per sequence (there a row was
                     one sample); the same with or without --packing, whatever seq_length

Sums are taken over data-parallel ranks before dividing, so the numbers do not depend on the
layout. A ratio with nothing to divide by (no loss-mask tokens) is NaN.
"""

import math

import torch
import torch.distributed as dist


def instruct_mask(labels: torch.Tensor, loss_mask: torch.Tensor, im_start: int | None,
                  im_end: int | None) -> torch.Tensor:  # fmt: skip
    """labels, loss_mask: (rows, seq) -> loss_mask with the ChatML scaffolding labels removed."""
    keep = torch.ones_like(loss_mask)
    for tok in (im_start, im_end):
        if tok is None:
            continue
        hit = labels == tok
        for shift in range(3):
            # masked_fill_, not boolean-mask assignment: that finds the mask's positions with
            # nonzero, a host read (on a GPU a synchronisation) per call
            keep[:, shift:].masked_fill_(hit[:, : hit.shape[1] - shift], 0)
    return loss_mask * keep


class EvalStats:
    """Running sums of one evaluation."""

    FIELDS = ("loss_sum", "tokens", "correct", "instruct_correct", "instruct_tokens", "rows")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def add(self, per_token_loss, pred, labels, loss_mask, im_start, im_end, rows=None) -> None:
        """per_token_loss, pred: (tokens,); labels, loss_mask: (rows, seq); rows: how many
        samples the batch holds, the divisor of count_loss_mask (default: one per row)."""
        rows = labels.shape[0] if rows is None else rows
        m = loss_mask.reshape(-1).double()
        hit = (pred == labels.reshape(-1)).double()
        im = instruct_mask(labels, loss_mask, im_start, im_end).reshape(-1).double()
        # rows by torch.full, a fill on the device: torch.tensor would copy from the host and
        # wait for the device's queue
        self.sums += torch.stack([
            (per_token_loss.double() * m).sum(), m.sum(), (hit * m).sum(), (hit * im).sum(),
            im.sum(), torch.full((), float(rows), dtype=torch.float64, device=m.device),
        ])  # fmt: skip

    def result(self, dp_group=None, metrics=None) -> dict:
        sums = self.sums.clone()
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(sums, group=dp_group)
        s = dict(zip(self.FIELDS, sums.tolist()))

        def ratio(num: float, den: float) -> float:
            # No tokens to average over: NaN, not the 0 of 0 / 1 (loss 0 and perplexity 1
            # would read as a perfect model).
            return num / den if den > 0 else math.nan

        loss = ratio(s["loss_sum"], s["tokens"])
        out = {"loss": loss, "loss_tokens": int(s["tokens"])}
        all_metrics = {
            "perplexity": ("ppl", math.exp(min(loss, 700.0)) if math.isfinite(loss) else loss),
            "accuracy": ("accuracy", ratio(s["correct"], s["tokens"])),
            "instruct_accuracy": (
                "instruct_accuracy",
                ratio(s["instruct_correct"], s["instruct_tokens"]),
            ),
            "count_loss_mask": ("count_loss_mask", s["tokens"] / max(s["rows"], 1.0)),
        }
        for name, (key, value) in all_metrics.items():
            if metrics is None or name in metrics:
                out[key] = value
        return out
