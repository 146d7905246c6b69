"""The benchmarks' byte and FLOP counts, worked out by hand from the formulas in the kernels'
docstrings and checked against bench/NOTES.md's floors table, plus which rows carry which goals.

A wrong count is a wrong GB/s, TFLOP/s and % of ceiling in every reported result, so each
number here is computed by hand, not by calling the formula under test. No timing is involved.
"""

import pytest

from bench import bench_attention, bench_kernels
from kernels.cross_entropy import cross_entropy_bytes
from kernels.rmsnorm import rmsnorm_bytes
from kernels.rotary import rotary_bytes
from kernels.swiglu import swiglu_bytes


def test_notes_floor_table_bytes():
    """bench/NOTES.md's floors (bf16): RMSNorm 268.5 / 402.7 MB, SwiGLU 1409 / 1082 MB, rotary
    335.7 / 302.1 MB. E.g. RMSNorm fwd 16384x4096: 2*T*H*2 + H*2 + 4*T = 268,509,184."""
    assert rmsnorm_bytes(16384, 4096, 2) == 268_509_184
    assert rmsnorm_bytes(16384, 4096, 2, True) == 402_735_104  # 3*T*H*2 + 2*H*2 + 4*T
    assert rmsnorm_bytes(8192, 8192, 2) == 268_484_608
    assert swiglu_bytes(8192, 28672, 2) == 1_409_286_144
    assert swiglu_bytes(16384, 11008, 2) == 1_082_130_432
    assert swiglu_bytes(16384, 11008, 2, True) == 1_803_550_720  # 5*T*F*2
    assert rotary_bytes(16384, 32, 8, 128, 2) == 335_675_392  # 2*T*40*128*2 + 8*T
    assert rotary_bytes(8192, 64, 8, 128, 2, True) == 302_055_424
    assert cross_entropy_bytes(8192, 32128, 2, False) == 526_385_152
    assert cross_entropy_bytes(8192, 32128, 2, True) == 1_052_770_304


def test_attention_flops_by_hand():
    """Causal fwd = 4*B*H*D*S^2/2, bwd 2.5x, step 3.5x; documents are counted one by one
    (sum of squares, not the square of the sum). NOTES.md: B4 S4096 H32 D128 bwd = 1.37 TFLOP."""
    fwd = 4 * 4 * 32 * 128 * 4096**2 / 2
    assert fwd == 549_755_813_888
    assert bench_attention.attn_flops([4096] * 4, 32, 128, "fwd") == fwd
    assert bench_attention.attn_flops([4096] * 4, 32, 128, "bwd") == 1_374_389_534_720
    assert bench_attention.attn_flops([4096] * 4, 32, 128, "step") == 3.5 * fwd
    assert bench_attention.attn_flops([1, 3], 1, 1, "fwd") == 4 * (1 + 9) / 2


class _Recorder:
    """Stands in for bench_attention._Bench: records the rows, times nothing."""

    def __init__(self):
        self.device, self.rows = "cpu", []

    def measure(self, row, *args, **kwargs):
        self.rows.append(row)
        return None


def test_attention_rows_count_every_sequence_of_the_batch():
    """The CPU speed rows (256 tokens at seq 128: batch 2, 4/2 heads) count both sequences;
    the packed-documents row counts a whole training step (fwd + bwd) over its documents."""
    b = _Recorder()
    bench_attention.speed_rows(b, quick=True)
    by_pass = {r.pass_: r for r in b.rows}
    assert by_pass["fwd"].shape == "B2 S128 H4/2 D128"
    assert by_pass["fwd"].flops == 2 * 4 * 4 * 128 * 128**2 / 2
    assert by_pass["bwd"].flops == 2.5 * by_pass["fwd"].flops
    b = _Recorder()
    bench_attention.mix_rows(b)
    lens = bench_attention.mix_lengths(docs=4, seq=256, mean=100)
    want = 3.5 * sum(4 * 4 * 128 * n * n / 2 for n in lens)
    assert [r.flops for r in b.rows] == [want, want]


def test_kernel_cases_bytes_by_hand():
    """bench_kernels' CPU cases (bf16): rmsnorm 64x256 fwd 2*64*256*2 + 256*2 + 4*64 = 66304,
    bwd 3*64*256*2 + 2*256*2 + 4*64 = 99584; swiglu 64x512 fwd 3*64*512*2 = 196608, bwd
    5*64*512*2 = 327680; rotary 64 tokens 4/2 heads of 128, 2*64*6*128*2 + 8*64 = 197120 both
    passes; cross-entropy 64 x 512 padded columns (vocab 500) 64*512*2 = 65536, bwd twice."""
    got = {(c.op, c.pass_): c.bytes for c in bench_kernels.cases(True, "cpu")}
    assert got == {
        ("rmsnorm", "fwd"): 66304,
        ("rmsnorm", "bwd"): 99584,
        ("swiglu", "fwd"): 196608,
        ("swiglu", "bwd"): 327680,
        ("rotary", "fwd"): 197120,
        ("rotary", "bwd"): 197120,
        ("cross_entropy", "fwd"): 65536,
        ("cross_entropy", "bwd"): 131072,
    }


def test_goals_are_issue_4s_and_only_on_ours():
    """The goals table the verdicts are judged on, and only `ours` rows carry goals (a
    baseline's row must not report MISSED)."""
    assert bench_kernels.GOALS == {
        ("rmsnorm", "fwd"): {"pct_of_ceiling": 90, "torch_compile": 1.0},
        ("rmsnorm", "bwd"): {"pct_of_ceiling": 80, "torch_compile": 1.0},
        ("swiglu", "fwd"): {"pct_of_ceiling": 90, "torch_compile": 1.0},
        ("swiglu", "bwd"): {"pct_of_ceiling": 80, "torch_compile": 1.0},
        ("rotary", "fwd"): {"pct_of_ceiling": 80, "torch_compile": 1.0},
        ("rotary", "bwd"): {"pct_of_ceiling": 80, "torch_compile": 1.0},
        ("adamw", "step"): {"pct_of_ceiling": 85, "torch_fused": 1.05},
        ("cross_entropy", "fwd"): {"torch_compile": 1.0},
        ("cross_entropy", "bwd"): {"torch_compile": 1.0},
    }
    (case,) = [c for c in bench_kernels.cases(True, "cpu") if (c.op, c.pass_) == ("swiglu", "fwd")]
    assert bench_kernels._row(case, "torch_eager").goals == {}
    assert bench_kernels._row(case, "ours").goals == bench_kernels.GOALS[("swiglu", "fwd")]


def test_adamw_fp32_row_is_judged_against_torch_fused():
    """The fp32-grads `ours` row keeps the torch_fused goal; only the trainer's case (with the
    bf16 copy) is judged against torch_fused+copy."""
    rows = bench_kernels.adamw_rows({}, 1 << 10, "cpu", variants=False)
    goals = {r.dtype: r.goals for r in rows if r.impl == "ours"}
    assert goals["fp32 grads"] == {"pct_of_ceiling": 85, "torch_fused": 1.05}


def test_a_missing_bytes_function_gives_none():
    """A kernel module without the named bytes function leaves the case without GB/s (and a
    note) instead of failing the whole section."""
    assert bench_kernels._bytes_formula("kernels.rmsnorm", "no_such_bytes") is None
    assert bench_kernels._bytes_formula("no_such_module_xyz", "f") is None


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_rotary_bytes_same_both_passes(dtype_bytes):
    """Rotary's backward is the same rotation: the same bytes either way."""
    a = rotary_bytes(3, 2, 1, 8, dtype_bytes, False)
    assert a == rotary_bytes(3, 2, 1, 8, dtype_bytes, True) == 2 * 3 * 3 * 8 * dtype_bytes + 24


class _Caller(_Recorder):
    """A _Recorder that also runs the measured call once (no timing)."""

    def measure(self, row, fn, pass_, refs, inputs, dout=None):
        self.rows.append(row)
        self.ran = [*getattr(self, "ran", []), (row.pass_, fn(*inputs))]
        return [fn(*inputs)]


def test_attention_kernel_rows_count_each_kernels_matmuls(monkeypatch):
    """The backward's kernels timed apart: dQ runs QK^T, dO V^T and dS K (1.5x the forward's
    FLOPs), dK/dV runs QK^T, dO V^T, P^T dO and dS^T Q (2x); each row runs its own launch
    over the flattened batch with one document per sequence. A failure to set them up is
    reported on both rows, not raised into the other attention rows."""
    import torch

    import kernels._triton
    import kernels.attention

    calls = []

    def fake_launches(q, k, v, cu, max_seqlen, do):
        calls.append((q.shape, k.shape, cu.tolist(), max_seqlen, do.shape))
        return (lambda: "dq"), (lambda: "dkdv")

    monkeypatch.setattr(kernels._triton, "use_triton", lambda x: True)
    monkeypatch.setattr(kernels.attention, "backward_launches", fake_launches)
    q = torch.zeros(2, 8, 4, 16)
    k = torch.zeros(2, 8, 2, 16)
    b = _Caller()
    bench_attention.kernel_rows(b, q, k, k, "B2 S8", "bf16", 1000.0)
    assert calls == [((16, 4, 16), (16, 2, 16), [0, 8, 16], 8, (16, 4, 16))]
    assert [(r.op, r.pass_, r.impl, r.flops) for r in b.rows] == [
        ("attn_kernels", "dq", "ours", 1500.0),
        ("attn_kernels", "dkdv", "ours", 2000.0),
    ]
    assert b.ran == [("dq", "dq"), ("dkdv", "dkdv")]  # each row times its own launch

    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(kernels.attention, "backward_launches", broken)
    b = _Caller()
    bench_attention.kernel_rows(b, q, k, k, "B2 S8", "bf16", 1000.0)
    assert [r.error for r in b.rows] == ["RuntimeError: no kernel"] * 2
    monkeypatch.setattr(kernels._triton, "use_triton", lambda x: False)
    b = _Caller()
    bench_attention.kernel_rows(b, q, k, k, "B2 S8", "bf16", 1000.0)
    assert b.rows == []
