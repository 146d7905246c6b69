"""Learning-rate schedule (Megatron's OptimizerParamScheduler, in iterations).

For iteration s (1-based: the s-th optimizer step uses lr(s)), W = warmup_iters,
D = decay_iters, lr_max = lr:

    s <= W                    lr_max * s / W                        (linear warm-up)
    W < s <= D, cosine        min_lr + (lr_max - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (D - W)))
    W < s <= D, linear        min_lr + (lr_max - min_lr) * (1 - (s - W) / (D - W))
    s > D                     min_lr
    constant                  lr_max after warm-up
    inverse-square-root       max(min_lr, lr_max * sqrt(max(W, 1)) / sqrt(max(s, 1))) after warm-up

Megatron evaluates the same formula at the number of steps already taken, so its first step runs
at lr 0 and step s at lr(s - 1); here step s runs at lr(s), which spends no step at lr 0 and
reaches lr_max exactly at the end of warm-up.

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
    if style == "inverse-square-root":
        return max(cfg.min_lr, cfg.lr * math.sqrt(max(w, 1)) / math.sqrt(max(step, 1)))
    if step > d:
        return cfg.min_lr
    ratio = (step - w) / (d - w) if d > w else 1.0
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"lr decay style {style!r}")
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
