"""Training telemetry: the console line (Megatron's shape), TensorBoard scalars, metrics.jsonl and
optional wandb; FLOP accounting for TFLOP/s and MFU.

FLOPs of one training step (model FLOPs: recomputation is not counted, as in MFU's definition):

    6 * N_matmul * tokens  +  12 * layers * hidden * sum_docs L_d (L_d + 1) / 2

N_matmul is every parameter that multiplies activations (all matrices, the output head included;
not the embedding, a lookup, nor the norm weights). The second term is causal attention: per
layer, Q K^T and P V cost 2 * hidden multiply-adds per (query, key) pair forward, and the
backward twice the forward; only the L (L + 1) / 2 causal pairs of each packed document are
computed, so only those count. MFU = achieved FLOP/s / (GPUs * dense bf16 peak of the GPU).

Against the published conventions: PaLM (Chowdhery et al. 2022, appendix B) counts 6N + 12 L H T
FLOPs per token, i.e. attention over all T x T pairs of a T-token sequence, causal mask ignored;
Megatron's formula (Narayanan et al. 2021) likewise counts the full s^2 and adds the recomputed
forward (hardware FLOPs). Here attention counts the L (L + 1) / 2 pairs of each packed document,
the work the varlen causal kernel does, so the attention term is at most about half of PaLM's for
a one-document row and far less for rows packed with short documents: our MFU is the lower,
stricter figure. Padding (the tail segment of a packed row, all-padding rows, and every row's
padding without --packing, where a row is one segment as in Megatron-LLM) is computed and counted,
as Megatron counts its padded sequences; interleaved 1F1B's filler micro-batches are not
(train.loop.Trainer.train_step). tokens/s counts the same tokens, over all ranks.
"""

import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from model.config import ModelConfig

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets, no sparsity). The PCIe and
# NVL cards run at lower clocks and power than the SXM card whose name they extend, so the
# longest key found in the device name wins.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "A10G": 70e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200 NVL": 835e12}  # fmt: skip


def matmul_params(cfg: ModelConfig, padded_vocab: int) -> int:
    """Parameters that multiply activations (see the module docstring)."""
    shapes = cfg.param_shapes(padded_vocab)
    return sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and n != "embed.weight")


def causal_pairs(cu_seqlens: torch.Tensor) -> int:
    """sum over documents of L (L + 1) / 2. cu_seqlens: (docs + 1,)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return int((lengths * (lengths + 1) // 2).sum())


def step_flops(cfg: ModelConfig, padded_vocab: int, tokens: int, pairs: int) -> float:
    return (
        6.0 * matmul_params(cfg, padded_vocab) * tokens
        + 12.0 * cfg.num_layers * cfg.hidden_size * pairs
    )


def peak_flops_per_gpu() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    found = [key for key in PEAK_BF16 if key in name]
    return PEAK_BF16[max(found, key=len)] if found else None


def memory_gib() -> tuple[float, str]:
    """(GiB, what): peak allocated CUDA memory on GPU, else peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 2**20, "max RSS"


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Telemetry:
    """Writes metrics everywhere they are wanted; only the rank that logs creates one."""

    def __init__(self, run_dir: str | None, tensorboard_dir: str | None, wandb_cfg: dict | None,
                 config_dict: dict):  # fmt: skip
        self.jsonl = None
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    f"--tensorboard_dir {tensorboard_dir}: tensorboard is not installed, no "
                    "TensorBoard logs (metrics.jsonl has the same numbers)",
                    stacklevel=2,
                )
            else:
                self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        self.wandb = None
        if wandb_cfg is not None:
            try:
                import wandb
            except ImportError:
                warnings.warn(
                    "--wandb_logger given but wandb is not installed: logging to TensorBoard and "
                    "metrics.jsonl only (pip install wandb to enable it)",
                    stacklevel=2,
                )
            else:
                self.wandb = wandb.init(config=config_dict, resume="allow", **wandb_cfg)

    def run_start(self, iteration: int, info: dict) -> None:
        """A {"type": "run_start"} line in metrics.jsonl (only there): the file is appended to
        by every launch of a run (a resume, a rerun), so readers can tell the launches apart."""
        if self.jsonl is not None:
            row = {"type": "run_start", "iteration": iteration, "time": time.time(), **info}
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def record(self, kind: str, iteration: int, values: dict, tb_prefix: str) -> None:
        """One JSON line {"type": kind, "iteration": ..., **values}; scalars to TB and wandb."""
        row = {"type": kind, "iteration": iteration, "time": time.time(), **values}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        scalars = {
            k: v for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{tb_prefix}/{k}", v, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{tb_prefix}/{k}": v for k, v in scalars.items()}, step=iteration)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def train_line(it: int, total: int, v: dict) -> str:
    """Megatron's log line, plus throughput, memory and ETA."""
    parts = [
        f" iteration {it:8d}/{total:8d}",
        f"consumed samples: {v['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {v['iter_ms']:.1f}",
        f"learning rate: {v['lr']:.6E}",
        f"global batch size: {v['global_batch_size']:5d}",
        f"lm loss: {v['lm_loss']:.6E}",
        f"grad norm: {v['grad_norm']:.3f}",
        f"number of skipped iterations: {v['skipped']:3d}",
        f"tokens/s: {v['tokens_per_s']:.0f}",
    ]
    if v.get("truncated"):
        parts.append(f"samples cut to seq_length: {v['truncated']}")
    if v.get("tflops") is not None:
        parts.append(f"TFLOP/s: {v['tflops']:.1f}")
    if v.get("mfu") is not None:
        parts.append(f"MFU: {100 * v['mfu']:.1f}%")
    parts.append(f"mem ({v['mem_what']}): {v['mem_gib']:.2f} GiB")
    parts.append(f"ETA: {format_eta(v['eta_s'])}")
    return " | ".join(parts) + " |"


def eval_line(it: int, name: str, v: dict) -> str:
    keys = [
        k for k in ("loss", "ppl", "accuracy", "instruct_accuracy", "count_loss_mask") if k in v
    ]
    body = " | ".join(
        f"{k}: {v[k]:.6E}" if k in ("loss", "ppl") else f"{k}: {v[k]:.4f}" for k in keys
    )
    return f" validation ({name}) at iteration {it} | {body} |"


def log(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)


def is_logging_rank() -> bool:
    """The last rank logs (it holds the loss when pipelined, as Megatron's print_rank_last)."""
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
