"""Whole training steps on one GPU: tokens/s, model TFLOP/s, MFU and peak memory of the trainer.

    python3 -m bench.bench_train [--layers 8] [--micro-batches 4] [--steps 5] [--json PATH]

What is timed is `Trainer.train_step`, all of a real step: forward and backward of the model on
our kernels through the pipeline executor, the loss over the global batch, the fp32 gradient
buffer, the gradient norm and clipping, and the fused AdamW update that writes the bf16 weights.
Only reading data is left out: the micro-batches are built beforehand by the loader's own packing
(`pack_rows`, `build_micro_batch`) from generated samples.

Model: Llama-2-7B's width (hidden 4096, 32 heads, FFN 11008, vocabulary 32007 padded to 32128)
with `--layers` of its 32 layers, so that it fits and runs in seconds; bf16 with fp32 master
weights, as `--bf16` trains. Per-layer cost and MFU are those of the full model's layers; the
output head is a larger share of the total with fewer layers.

Data: micro-batches of one 4096-token row (the seed's stage-1 layout per GPU). Sample lengths
follow the seed's mix (`bench.bench_attention.mix_lengths`, mean 473.5 tokens), a third of each
sample prompt and the rest reply (loss-mask) tokens.

Cases (one trainer; each case sets recomputation and weight-gradient fusion, and brings its own
data):
- "ours": packed rows, selective recompute (the seed's `--recompute_granularity selective`);
- "ours[no wgrad fusion]": weight gradients written in bf16 and added to the fp32 buffer by a
  second pass (`--no_gradient_accumulation_fusion`), against the fused default;
- op "train_step_padded": one sample per row padded to 4096 (`--no-packing`, Megatron-LLM's way),
  the same number of rows; its note gives useful (sample) tokens/s against the packed case;
- "ours[no recompute]", "ours[full recompute]": the memory/speed trade of recomputation.

Then op "optimizer_step": the AdamW step alone over 2^27 bf16 parameters, on the device and
with `--optimizer_cpu_offload` (host link GB/s and seconds per billion parameters in the note).

FLOPs are model FLOPs (`train.metrics.step_flops`: 6 x matmul parameters x tokens plus causal
attention over each document's pairs; recomputation not counted), so the rows' TFLOP/s and MFU
are comparable with published MFU figures. `%ceil` is against the measured 8192^3 matmul rate;
MFU in the note is against the card's dense bf16 datasheet peak.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.bench_attention import mix_lengths
from bench.harness import Row, add_ratios, print_table, release_cached_memory, write_json
from data.chat import Role
from data.loader import LoaderConfig, build_micro_batch, pack_rows
from kernels.linear import fp32_out_addmm
from parallel.data_parallel import GradBuffer
from parallel.dims import ParallelDims
from train.args import parse_args
from train.config import OptimizerConfig
from train.data import TokenizerInfo
from train.loop import Trainer
from train.memory import activation_report, peak_estimate
from train.metrics import peak_flops_per_gpu, step_flops
from train.optimizer import ShardedAdamW
from train.resolve import resolve

VOCAB = 32007  # Llama-2's 32000 + Megatron's 5 specials + <|im_start|>, <|im_end|>
SKIPPED = "skipped: section time budget spent"


@dataclass
class Shape:
    """The benchmark's model and batch shape."""

    layers: int = 8
    seq: int = 4096
    micro_batches: int = 4  # per step, one row each
    hidden: int | None = None  # None: the preset's (overridden for the CPU plumbing check)
    ffn: int | None = None
    heads: int | None = None
    kv_heads: int | None = None

    def label(self, padded: bool) -> str:
        width = "llama2-7b" if self.hidden is None else f"h{self.hidden}"
        rows = "padded rows" if padded else "packed"
        return f"{width} x{self.layers} layers, {self.micro_batches} x 1x{self.seq} {rows}"


class MixDataset:
    """The loader's view of a dataset (`sizes`, `sample`, `pad_id`) over generated samples with
    the seed's length mix; token ids are random, the first third of each sample is the prompt."""

    pad_id = 0

    def __init__(self, lengths: list[int], vocab: int, seed: int = 0):
        self.sizes = np.asarray(lengths, dtype=np.int64)
        self.vocab = vocab
        self.seed = seed

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.sizes[i])
        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        tokens = rng.integers(1, self.vocab, n, dtype=np.int64)
        roles = np.full(n, int(Role.ASSISTANT), dtype=np.int64)
        roles[: n // 3] = int(Role.USER)
        return tokens, roles


def micro_batches(shape: Shape, packed: bool, vocab: int) -> tuple[list[dict], int]:
    """`shape.micro_batches` micro-batches of one row each, and the sample tokens they hold."""
    # Enough samples to fill the rows: the mix's mean is 473.5 tokens.
    count = max(8, int(2.5 * shape.micro_batches * max(shape.seq, 4096) / 473.5))
    # The seed's mean at 4096 tokens a row; scaled with shorter rows (the CPU plumbing check), so
    # rows still hold several samples and padding still leaves most of a row empty.
    lengths = mix_lengths(docs=count, seq=shape.seq, mean=473.5 * min(1.0, shape.seq / 4096))
    ds = MixDataset(lengths, vocab)
    order = np.arange(count)
    if packed:
        samples, offsets = pack_rows(order, ds.sizes, shape.seq)
        rows = [samples[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]
    else:
        rows = [order[k : k + 1] for k in range(count)]
    rows = rows[: shape.micro_batches]
    cfg = LoaderConfig(shape.seq, 1, shape.micro_batches, packing=packed)
    mbs = [build_micro_batch(ds, [r], cfg) for r in rows]
    useful = sum(min(int(ds.sizes[i]), shape.seq) for r in rows for i in r)
    return mbs, useful


def run_config(shape: Shape, device: str):
    """(RunConfig, dims, tokenizer info) of a one-process bf16 run at `shape`."""
    argv = ["--model", "llama2-7b", "--num_layers", str(shape.layers),
            "--seq_length", str(shape.seq), "--max_position_embeddings", str(shape.seq),
            "--micro_batch_size", "1", "--global_batch_size", str(shape.micro_batches),
            "--train_iters", "1000", "--lr", "1e-5", "--min_lr", "1e-6",
            "--lr_warmup_iters", "10", "--adam_beta2", "0.95", "--adam_eps", "1e-12",
            "--weight_decay", "1e-6", "--clip_grad", "1.0", "--hidden_dropout", "0.0",
            "--data_path", "generated-mix", "--no-activation_memory_report",
            "--recompute_granularity", "selective", "--bf16"]  # fmt: skip
    for flag, value in (("--hidden_size", shape.hidden), ("--ffn_hidden_size", shape.ffn),
                        ("--num_attention_heads", shape.heads),
                        ("--num_attention_heads_kv", shape.kv_heads)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    ns, given = parse_args(argv)
    rc = resolve(ns, given, world_size=1)
    rc.model = rc.model.replace(vocab_size=VOCAB)
    tok = TokenizerInfo(VOCAB, "generated", None, None, None, [])
    return rc, ParallelDims(tp=1, pp=1, dp=1, rank=0), tok


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def measure(trainer: Trainer, batch: list[dict], device: str, warmup: int, steps: int) -> dict:
    """`warmup` steps (compilation, autotuning, allocator), then `steps` timed ones. Returns the
    per-step times (ms), the mean time of each phase of a step, the last step's result and the
    memory."""
    cuda = device != "cpu"
    losses = [trainer.train_step(batch, 1e-5).loss for _ in range(warmup)]
    _sync(device)
    states = torch.cuda.memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, phases = [], {}
    for _ in range(steps):
        t0 = time.perf_counter()
        result = trainer.train_step(batch, 1e-5)  # returns once the loss is on the host
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(result.loss)
        for name, ms in result.phases.ms().items():
            phases[name] = phases.get(name, 0.0) + ms / steps
    if not all(np.isfinite(losses)) or result.skipped:
        raise RuntimeError(f"non-finite loss or a skipped step: losses {losses}")
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"times": times, "result": result, "states": states, "peak": peak, "phases": phases}


CASES = [  # (impl, recompute, packed, fused weight gradients): the seed's setting first
    ("ours", "selective", True, True),
    ("ours[no wgrad fusion]", "selective", True, False),
    ("ours[padded]", "selective", False, True),
    ("ours[no recompute]", "none", True, True),
    ("ours[full recompute]", "full", True, True),
]


def rows_for(
    shape: Shape,
    ceilings: dict,
    device: str,
    warmup: int,
    steps: int,
    deadline: float | None = None,
) -> list[Row]:
    """One row per case of CASES. One trainer serves every case (drawing 7B-width weights on the
    host takes seconds): cases differ only in recomputation (set on the layers), weight-gradient
    fusion (set on the gradient buffer) and their data."""
    cpu = device == "cpu"
    peak_flops = None if cpu else peak_flops_per_gpu()
    rc, dims, tok = run_config(shape, device)
    trainer = None
    rows, packed_rate, last_case_s = [], None, 0.0
    for impl, recompute, packed, fuse in CASES:
        # The padded case is its own op (and its own "ours"): its time is not comparable.
        op, impl = ("train_step", impl) if packed else ("train_step_padded", "ours")
        row = Row(op, shape.label(not packed), "fp32" if cpu else "bf16", "step", impl)
        rows.append(row)
        # A case that would run past the deadline must not start. One cut at the section's
        # limit anyway is an error row (bench.gpu_check interrupts before it kills).
        if deadline is not None and time.time() + last_case_s > deadline:
            row.error = SKIPPED
            continue
        t_case = time.time()
        try:
            if trainer is None:
                trainer = Trainer(rc, dims, tok, device=device)
                per_token = activation_report(trainer.stages, 256, device, trainer.dtype)
                t_case = time.time()  # the build is once: not a case's duration
            for stage in trainer.stages:
                stage.set_recompute(recompute)
            trainer.grads.set_fuse_weight_grads(fuse)
            predicted = peak_estimate(trainer, per_token, recompute).total
            batch, useful = micro_batches(shape, packed, VOCAB)
            # The first case compiles and autotunes; later ones need one step to settle (the
            # padded rows' longer documents autotune attention for their length there).
            m = measure(trainer, batch, device, warmup if not rows[:-1] else 1, steps)
        except Exception as e:  # a failed case is a loud row, not a lost section
            row.error = f"{type(e).__name__}: {e}"[:300]
            continue
        finally:
            gc.collect()
            release_cached_memory()
            last_case_s = time.time() - t_case
        # The next case's length: one warm-up step and `steps` timed ones at this case's rate.
        # This one's whole length counts the compiling and autotuning the first case does for
        # all of them, and would skip cases that fit.
        last_case_s = (1 + steps) * max(m["times"]) / 1e3
        q = statistics.quantiles(m["times"], n=10, method="inclusive")
        row.ms, row.ms_p20, row.ms_p80 = statistics.median(m["times"]), q[1], q[7]
        res = m["result"]
        row.flops = step_flops(rc.model, trainer.padded_vocab, res.tokens, res.pairs)
        row.fill_rates(ceilings)
        useful_rate = useful / row.ms * 1e3
        notes = [f"{res.tokens / row.ms * 1e3:.0f} tokens/s",
                 f"{useful_rate:.0f} sample tokens/s"]  # fmt: skip
        if packed and impl == "ours":
            packed_rate = useful_rate
        if not packed and packed_rate:
            notes.append(f"packed runs {packed_rate / useful_rate:.2f}x the sample tokens/s")
        if peak_flops and row.tflops is not None:
            notes.append(f"MFU {row.tflops * 1e14 / peak_flops:.1f}% of {peak_flops / 1e12:.0f}")
        if m["peak"] is not None:
            notes.append(f"peak {m['peak'] / 2**30:.1f} GiB (weights, grads and optimizer "
                         f"{m['states'] / 2**30:.1f} GiB; train.memory predicted "
                         f"{predicted / 2**30:.1f})")  # fmt: skip
        else:
            notes.append(f"train.memory predicts a peak of {predicted / 2**30:.2f} GiB")
        notes.append("phases (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in m["phases"].items()))
        if fuse and not cpu:
            how = "one cuBLAS call" if fp32_out_addmm(torch.device(device)) else "two steps"
            notes.append(f"weight grads accumulate into fp32 in {how}")
        if cpu:
            notes.append("cpu plumbing check, not a measurement")
        row.note = "; ".join(notes)
    del trainer
    add_ratios(rows)
    return rows


def optimizer_rows(numel: int, device: str, steps: int, deadline: float | None = None) -> list[Row]:
    """The optimizer step alone over `numel` bf16 parameters (one matrix, weight-decayed) at DP 1:
    on the device (the fused AdamW kernel) and offloaded (`--optimizer_cpu_offload`: gradients
    to the host in pinned chunks, torch's fused CPU AdamW, bf16 weights back). The
    host link rate in the note counts 4 B of gradient out and 2 B of weight back per parameter."""
    cpu = device == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    rows = []
    for impl, offload in (("ours", False), ("ours[cpu offload]", True)):
        row = Row("optimizer_step", f"{numel:,} params", "fp32" if cpu else "bf16",
                  "step", impl)  # fmt: skip
        rows.append(row)
        if deadline is not None and time.time() + 10 > deadline:
            row.error = SKIPPED
            continue
        try:
            w = torch.nn.Parameter(torch.zeros(numel // 1024, 1024, dtype=dtype, device=device))
            grads = GradBuffer([w], shard_over_dp=True)
            cfg = OptimizerConfig(0.9, 0.95, 1e-12, 0.1, 1.0, True, offload)
            opt = ShardedAdamW([("w", w)], cfg, grads)
            grads.buffer.normal_()
            times = []
            for i in range(steps + 1):  # the first: allocation and page faults
                _sync(device)
                t0 = time.perf_counter()
                opt.step(1e-5)
                _sync(device)
                if i:
                    times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # a failed case is a loud row, not a lost section
            row.error = f"{type(e).__name__}: {e}"[:300]
            continue
        finally:
            w = grads = opt = None  # noqa: F841 -- free the buffers before the next case
            gc.collect()
            release_cached_memory()
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [0] * 9
        row.ms, row.ms_p20, row.ms_p80 = statistics.median(times), q[1], q[7]
        per_billion = row.ms / numel * 1e9 / 1e3
        row.note = f"{per_billion:.2f} s per billion parameters"
        if offload:
            row.note += (f"; host link {6 * numel / row.ms / 1e6:.1f} GB/s; "
                         f"{torch.get_num_threads()} host threads")  # fmt: skip
        if cpu:
            row.note += "; cpu plumbing check, not a measurement"
    add_ratios(rows)
    return rows


def gpu_rows(
    ceilings: dict, quick: bool, deadline: float | None = None, device: str = "cuda"
) -> list[Row]:
    """The cases at Llama-2-7B width (8 layers; 16 with --full). device="cpu": a tiny model, a
    plumbing check of this code, never a measurement."""
    if device == "cpu":
        shape = Shape(layers=2, seq=256, micro_batches=2, hidden=64, ffn=160, heads=4, kv_heads=2)
        rows = rows_for(shape, ceilings, device, warmup=1, steps=2, deadline=deadline)
        return rows + optimizer_rows(1 << 16, device, steps=2, deadline=deadline)
    if not torch.cuda.is_available():
        raise RuntimeError("bench.bench_train.gpu_rows: no CUDA device")
    shape = Shape(layers=8 if quick else 16)
    rows = rows_for(shape, ceilings, device, warmup=2, steps=4 if quick else 10, deadline=deadline)
    # After the training steps (their trainer is gone): 2^27 parameters, 1.6 GB of host state.
    return rows + optimizer_rows(1 << 27, device, steps=5, deadline=deadline)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="of Llama-2-7B's 32")
    ap.add_argument("--micro-batches", type=int, default=4, help="rows of 4096 per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case")
    ap.add_argument("--json", help="write the rows here (harness.write_json: meta and rows)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the training step is measured on a GPU (make gpu-check); "
              "`python -m bench.gpu_check --cpu-smoke` checks this code on CPU")  # fmt: skip
        return 0
    from bench.harness import measure_ceilings

    shape = Shape(layers=args.layers, micro_batches=args.micro_batches)
    rows = rows_for(shape, measure_ceilings(), "cuda", warmup=2, steps=args.steps)
    print_table(rows)
    for r in rows:
        print(f"{r.op} {r.impl}: {r.note or r.error}")
    if args.json:
        write_json(rows, {"argv": sys.argv}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
