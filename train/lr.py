"""Learning-rate schedule (Megatron's OptimizerParamScheduler, in iterations).

For iteration s (1-based: the s-th optimizer step uses lr(s)), W = warmup_iters,
D = decay_iters, lr_max = lr:

    s <= W                    lr_max * s / W                        (linear warm-up)
    constant                  lr_max after warm-up (D plays no part)
    s > D                     min_lr                                (every other style)
    W < s <= D, inv-sqrt      max(min_lr, lr_max * sqrt(max(W, 1)) / sqrt(max(s, 1)))
    W < s <= D, linear        min_lr + (lr_max - min_lr) * (1 - (s - W) / (D - W))
    W < s <= D, cosine        min_lr + (lr_max - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (D - W)))

These are the cases of Megatron-LLM's OptimizerParamScheduler.get_lr, in its order, with its
sample counts divided by the global batch size (--lr_decay_iters defaults to --train_iters;
--lr_warmup_fraction is a fraction of D, rounded down to whole iterations here). Megatron
evaluates the formula at the number of steps already taken, so its first step runs at lr(0) (0
under warm-up) and step s at lr(s - 1); here step s runs at lr(s), which spends no warm-up step
at lr 0 and reaches lr_max exactly at the end of warm-up. The shift moves the other end: with
D = --train_iters (the default) the last step runs at exactly min_lr, where Megatron's ran at
lr(D - 1); with --min_lr 0 (the default) that last step leaves the weights as they were.

s counts iterations, skipped ones included: an update skipped for non-finite gradients (bf16 has
no loss scaler to back off) still moves the schedule, so a resumed run's lr follows its iteration
alone. Megatron's fp16 scaler instead holds the schedule back on an overflow step; in bf16 it
never skips.
"""

import math

from train.config import ScheduleConfig


def lr_at(cfg: ScheduleConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based)."""
    w, d = cfg.warmup_iters, cfg.decay_iters
    if w > 0 and step <= w:
        return cfg.lr * step / w
    style = cfg.decay_style
    if style == "constant":
        return cfg.lr
    if step > d:  # every decaying style, inverse-square-root included (as Megatron)
        return cfg.min_lr
    if style == "inverse-square-root":
        return max(cfg.min_lr, cfg.lr * math.sqrt(max(w, 1)) / math.sqrt(max(step, 1)))
    ratio = (step - w) / (d - w) if d > w else 1.0
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"lr decay style {style!r}")
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
