"""Tensor/sequence-parallel cost inputs for the planner: the bytes TP/SP collectives move per
layer in the seed's 70B layout, and the measured single-GPU time of one 70B-width layer at the
local shapes of a TP=8 rank.

A lent machine has one GPU, so TP > 1 traffic cannot be timed there; it is modelled instead.
At TP = 1 the layers issue no collectives at all (every comm function returns its input), so
TP communication costs nothing there.

Byte model (ring algorithms, bytes each GPU sends -- and receives -- per transformer layer,
forward + backward):

    S   = tokens * hidden * bytes_per_element         one full activation, tokens = mbs * seq
    all-gather, reduce-scatter over t ranks:  (t - 1) / t * S
    all-reduce:                           2 * (t - 1) / t * S
    TP:       fwd all-reduce after wo and w2; bwd all-reduce of the wqkv and w13 input grads
              -> 4 all-reduces                          = 8 (t - 1) / t * S
    TP + SP:  fwd all-gather before wqkv and w13, reduce-scatter after wo and w2; bwd the
              adjoints (2 all-gathers, 2 reduce-scatters) plus 2 all-gathers re-gathering the
              saved token shards for the weight gradients (Megatron's memory trade)
              -> 6 all-gathers + 4 reduce-scatters      = 10 (t - 1) / t * S

Seed layout: micro batch 2 x seq 4096 = 8192 tokens, hidden 8192, bf16, t = 8: S = 128 MiB;
TP + SP moves 10 * 7/8 * 128 MiB = 1120 MiB per GPU per layer (TP alone 896 MiB), 80 layers.
Per micro-batch, outside the layers: the embedding (SP: reduce-scatter fwd, all-gather bwd;
TP: all-reduce fwd), the output head (SP: all-gather fwd, reduce-scatter + re-gather bwd; TP:
all-reduce bwd) and the vocab-parallel loss (all-reduces of 3 fp32 values per token).

Measured layer FLOPs: 2 * tokens * local parameters for the GEMMs (x3 forward + backward) plus
causal attention 2 * s^2 * head_dim * local heads per document (x3.5: the flash backward runs 5
GEMMs to the forward's 2).

    python -m bench.bench_parallel [--json PATH]     # byte model; plus the layer time on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

from bench.harness import Row, print_table, time_quantiles, write_json
from model.config import ModelConfig, get_preset
from model.llama import Block, RMSNorm

SEED_TP, SEED_MBS, SEED_SEQ = 8, 2, 4096
MODELLED = "modelled (ring), not measured"


def collectives_per_layer(
    tokens: int, hidden: int, tp: int, sequence_parallel: bool, elem_bytes: int = 2
) -> list[dict]:
    """The TP/SP collectives of one layer, forward + backward: op, count, size of the full
    tensor, and bytes each GPU sends (see the module docstring)."""
    s = tokens * hidden * elem_bytes
    share = (tp - 1) / tp
    if sequence_parallel:
        ops = [
            ("all-gather", 2, "fwd: inputs of wqkv, w13"),
            ("reduce-scatter", 2, "fwd: outputs of wo, w2"),
            ("all-gather", 2, "bwd: grads of the reduce-scatters"),
            ("reduce-scatter", 2, "bwd: input grads of wqkv, w13"),
            ("all-gather", 2, "bwd: re-gather of saved shards for weight grads"),
        ]
    else:
        ops = [
            ("all-reduce", 2, "fwd: outputs of wo, w2"),
            ("all-reduce", 2, "bwd: input grads of wqkv, w13"),
        ]
    out = []
    for op, count, why in ops:
        factor = 2 * share if op == "all-reduce" else share
        out.append(
            {
                "op": op,
                "count": count,
                "tensor_bytes": s,
                "bytes_per_gpu": int(count * factor * s),
                "where": why,
            }
        )
    return out


def bytes_per_layer(
    tokens: int, hidden: int, tp: int, sequence_parallel: bool, elem_bytes: int = 2
) -> int:
    """Bytes each GPU sends per layer (forward + backward) for TP/SP collectives."""
    return sum(
        c["bytes_per_gpu"]
        for c in collectives_per_layer(tokens, hidden, tp, sequence_parallel, elem_bytes)
    )


def seed_layout() -> tuple[ModelConfig, int, int]:
    """(70B config, tokens per micro-batch, TP size) of the seed's stage-1 run."""
    return get_preset("llama2-70b"), SEED_MBS * SEED_SEQ, SEED_TP


def byte_rows() -> list[Row]:
    cfg, tokens, tp = seed_layout()
    rows = []
    for sp in (False, True):
        total = bytes_per_layer(tokens, cfg.hidden_size, tp, sp)
        rows.append(
            Row(
                op="tp_sp_comm" if sp else "tp_comm",
                shape=f"tokens={tokens},hidden={cfg.hidden_size},tp={tp}",
                dtype="bf16",
                pass_="fwd+bwd",
                impl="model",
                bytes=total,
                note=f"{total / 2**20:.0f} MiB/GPU/layer, {cfg.num_layers} layers: "
                f"{total * cfg.num_layers / 2**30:.1f} GiB per micro-batch; {MODELLED}",
            )
        )
    return rows


def print_byte_model() -> None:
    cfg, tokens, tp = seed_layout()
    print(
        f"TP/SP collectives per layer, 70B seed layout: tokens {tokens} (micro batch {SEED_MBS} x "
        f"seq {SEED_SEQ}), hidden {cfg.hidden_size}, bf16, tp {tp}; bytes each GPU sends, ring"
    )
    for sp in (False, True):
        print(f"\n  {'TP + SP' if sp else 'TP'}:")
        print(f"  {'op':<15}{'count':>6}{'tensor MiB':>12}{'MiB/GPU':>10}  where")
        for c in collectives_per_layer(tokens, cfg.hidden_size, tp, sp):
            print(
                f"  {c['op']:<15}{c['count']:>6}{c['tensor_bytes'] / 2**20:>12.0f}"
                f"{c['bytes_per_gpu'] / 2**20:>10.0f}  {c['where']}"
            )
        total = bytes_per_layer(tokens, cfg.hidden_size, tp, sp)
        print(
            f"  total {total / 2**20:.0f} MiB/GPU/layer; x {cfg.num_layers} layers = "
            f"{total * cfg.num_layers / 2**30:.1f} GiB per micro-batch"
        )
    print(
        f"\n  at tp 1: {bytes_per_layer(tokens, cfg.hidden_size, 1, True)} bytes (no collectives)"
    )


# ---------------------------------------------------------------------------------------------
# measured: one layer at a TP rank's local shapes


def local_layer(cfg: ModelConfig, tp: int, device, dtype) -> Block:
    """One decoder layer with the shapes a TP rank holds after `parallelize` (column-parallel
    wqkv / w13 with tp-th of each segment, row-parallel wo / w2, local head counts), as plain
    single-GPU modules -- the compute of a rank with the communication left out."""
    h, hd = cfg.hidden_size, cfg.head_dim
    nh, nkv, f = cfg.num_attention_heads // tp, cfg.num_kv_heads // tp, cfg.ffn_hidden_size // tp
    with torch.device("meta"):
        block = Block(cfg.replace(hidden_dropout=0.0), cfg.num_layers - 1)
    kw = dict(bias=False, device=device, dtype=dtype)
    block.attention.wqkv = nn.Linear(h, (nh + 2 * nkv) * hd, **kw)
    block.attention.wo = nn.Linear(nh * hd, h, **kw)
    block.attention.n_heads, block.attention.n_kv_heads = nh, nkv
    block.mlp.w13 = nn.Linear(h, 2 * f, **kw)
    block.mlp.w2 = nn.Linear(f, h, **kw)
    block.attention_norm = RMSNorm(h, cfg.norm_eps).to(device=device, dtype=dtype)
    block.mlp_norm = RMSNorm(h, cfg.norm_eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, cfg.init_std)
    return block


def layer_flops(cfg: ModelConfig, tp: int, tokens: int, seq: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one local layer; see the module docstring."""
    h, hd = cfg.hidden_size, cfg.head_dim
    nh, nkv, f = cfg.num_attention_heads // tp, cfg.num_kv_heads // tp, cfg.ffn_hidden_size // tp
    params = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * f
    gemm = 2.0 * tokens * params
    attn = (tokens // seq) * 2.0 * seq * seq * hd * nh
    return gemm + attn, 3 * gemm + 3.5 * attn


def gpu_rows(
    ceilings: dict, quick: bool, deadline: float | None = None, device: str = "cuda"
) -> list[Row]:
    """The modelled byte rows plus the measured fwd and fwd+bwd time of one 70B layer at TP=8
    local shapes (8 q heads + 1 KV head, FFN 28672 / 8), 2 x 4096 packed tokens, bf16.
    device="cpu": a tiny layer, a plumbing check of this code, never a measurement."""
    rows = byte_rows()
    cpu = device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("bench.bench_parallel.gpu_rows: no CUDA device")
    cfg, tokens, tp = seed_layout()
    seq = SEED_SEQ
    dtype = torch.bfloat16
    if cpu:
        cfg = cfg.replace(hidden_size=256, ffn_hidden_size=512, num_attention_heads=16)
        tokens, seq, dtype = 128, 64, torch.float32
    layer = local_layer(cfg, tp, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    x.requires_grad_(True)
    dy = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    positions = torch.arange(tokens, device=device) % seq
    cu = torch.arange(0, tokens + 1, seq, device=device, dtype=torch.int32)

    def fwd():
        return layer(x, positions, cu, seq)

    def fwd_bwd():
        fwd().backward(dy)

    fl_fwd, fl_step = layer_flops(cfg, tp, tokens, seq)
    nh, nkv = cfg.num_attention_heads // tp, cfg.num_kv_heads // tp
    shape = (
        f"tokens={tokens},hidden={cfg.hidden_size},heads={nh}+{nkv}kv,"
        f"ffn={cfg.ffn_hidden_size // tp}"
    )
    note = "cpu plumbing check, not a measurement" if cpu else "one TP=8 rank's compute, no comm"
    rep = 50 if quick else 200
    measured = {}
    for pass_, fn, flops in (("fwd", fwd, fl_fwd), ("fwd+bwd", fwd_bwd, fl_step)):
        row = Row("layer70b_tp8", shape, "fp32" if cpu else "bf16", pass_, "ours")
        row.flops, row.note = flops, note
        if deadline is not None and time.time() > deadline:
            row.error = "skipped: section time budget spent"
        else:
            try:
                t = time_quantiles(fn, warmup=10 if cpu else 25, rep=rep, cuda=not cpu)
                row.ms, row.ms_p20, row.ms_p80 = t.ms, t.p20, t.p80
                row.fill_rates(ceilings)
                measured[pass_] = t.ms
            except Exception as e:  # a failed measurement is a loud row, not a lost section
                row.error = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    if "fwd+bwd" in measured and not cpu:
        add_link_notes(rows[:2], measured["fwd+bwd"])
    return rows


def add_link_notes(byte_rows: list[Row], layer_ms: float) -> None:
    """On each communication row: the link speed at which that layer's communication would take
    as long as its measured compute (bytes per ms / 1e6 = GB/s)."""
    for r in byte_rows:
        need = r.bytes / layer_ms / 1e6
        r.note += f"; {need:.0f} GB/s per GPU equals the measured layer time"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here (harness.write_json: meta and rows)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print_byte_model()
    rows = byte_rows()
    if torch.cuda.is_available():
        from bench.harness import measure_ceilings

        rows = gpu_rows(measure_ceilings(), args.quick)
        print()
        print_table(rows)
    else:
        print("\nno CUDA device: the per-layer time is measured on a GPU (make gpu-check)")
    if args.json:
        write_json(rows, {"argv": sys.argv}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
