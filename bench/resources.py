"""Compile the memory-bound kernels for a GPU target without a GPU and read their resources.

    python -m bench.resources [--arch 90] [--family rmsnorm_bwd] [--shape 8192]

For every tuning candidate (kernels/*.py `candidates*`) it compiles the bf16 kernel as the
launcher would specialise it (unit column strides, 16-byte-aligned pointers and row strides) for
sm_<arch> with Triton's bundled ptxas, and reads from the cubin (cuobjdump --dump-resource-usage)
the registers per thread and the stack frame, from its SASS the local-memory accesses inside
loops, and from the PTX the global-load vector widths.
A stack frame on these kernels means spilled registers (except rotary's on-the-fly cos/sin:
libdevice's argument reduction keeps a ~32-byte array there); the spills that cost are the ones
inside a loop. So it answers, at no device time, which settings are worth timing at all (the
lent-GPU method's "read what costs no device time"). The candidate lists are kept to settings
without such spills; tests/bench/test_resources.py holds them to that.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

BF16 = "*bf16"
FP32 = "*fp32"


@dataclass
class Resources:
    regs: int  # registers per thread
    stack: int  # stack frame bytes per thread (spills, or local arrays)
    loop_spills: int  # local-memory loads/stores (LDL/STL) inside a loop of the SASS
    vectors: list[str]  # global-load vector widths in the PTX ("v2", "v4")
    loads_before_first_store: int  # global loads issued before the first global store


def _tools():
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(base, "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise RuntimeError(f"bench.resources: {cuobjdump} not found (Triton built without it)")
    return cuobjdump


def available() -> bool:
    """True when Triton's NVIDIA backend and its cuobjdump are installed (no GPU needed), and its
    ASTSource takes `constexprs` (the form compile_resources builds; Triton 3.0's takes
    `constants` and an AttrsDescriptor instead)."""
    try:
        _tools()
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource

        return "constexprs" in inspect.signature(ASTSource).parameters
    except Exception:
        return False


def compile_resources(
    fn,
    pointers: dict[str, str],
    constexprs: dict[str, object],
    num_warps: int,
    unit: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    aligned: tuple[str, ...] = (),
    arch: int = 90,
    num_stages: int = 3,
) -> Resources:
    """Compile the @triton.jit `fn` for sm_<arch>: pointers by name -> type, constexprs, the
    integer args the launcher sees as 1 (specialised to constants), float scalars, and integer
    args divisible by 16 (as Triton's launcher marks them); every other arg is an i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    sig, consts = {}, dict(constexprs)
    for n in names:
        if n in pointers:
            sig[n] = pointers[n]
        elif n in constexprs or n in unit:
            sig[n] = "constexpr"
            consts.setdefault(n, 1)
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n in pointers or n in aligned
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run(
            [_tools(), "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60
        ).stdout
        sass = subprocess.run(
            [_tools(), "-sass", f.name], capture_output=True, text=True, timeout=60
        ).stdout
    finally:
        os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    if regs is None or stack is None:
        raise RuntimeError(f"bench.resources: no resource usage in cuobjdump's output: {out[:300]}")
    ptx = k.asm["ptx"]
    body = ptx[ptx.index(".entry") :]
    first_store = body.find("st.global")
    return Resources(
        int(regs.group(1)),
        int(stack.group(1)),
        loop_spills(sass),
        sorted(set(re.findall(r"ld\.global[.\w]*\.(v\d)\.", ptx))),
        len(re.findall(r"ld\.global", body if first_store < 0 else body[:first_store])),
    )


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def loop_spills(sass: str) -> int:
    """Local-memory accesses (LDL/STL: spills) that sit inside a loop of the SASS listing.

    A loop is the address range [target, branch] of a backward branch. A few bytes of stack
    written before a loop and read after it (a value kept across the loop when registers are
    capped) cost two instructions per program; a spill inside the loop costs on every step,
    which is what makes a setting slow."""
    ins = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)\s*$", text)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(
        1
        for addr, text in ins
        if re.search(r"\b(LDL|STL)\b", text) and any(lo <= addr <= hi for lo, hi in loops)
    )


def rmsnorm_fwd(hidden: int, arch: int = 90) -> list[tuple[object, Resources]]:
    from kernels import rmsnorm as m

    b = m._blocks(hidden)
    return [
        (
            cfg,
            compile_resources(
                m._rmsnorm_fwd_kernel,
                {"X": BF16, "W": BF16, "Y": BF16, "RSTD": FP32},
                {
                    "BLOCK_N": cfg.chunk or b.fwd_block,
                    "SINGLE": b.fwd_single and not cfg.chunk,
                    "ROWS": cfg.rows,
                    "W_FIRST": cfg.weight_first and not cfg.chunk,
                },
                cfg.warps,
                unit=("stride_x_col", "stride_y_col"),
                floats=("eps",),
                aligned=("stride_x_row", "stride_y_row", "n_cols"),
                arch=arch,
            ),
        )
        for cfg in m.candidates_fwd(hidden)
    ]


def rmsnorm_bwd(hidden: int, arch: int = 90) -> list[tuple[object, Resources]]:
    """One compile per (warps, rows, prefetch): row groups per SM is a launch-time number."""
    from kernels import rmsnorm as m

    b = m._blocks(hidden)
    seen, out = set(), []
    for cfg in m.candidates_bwd(hidden):
        key = cfg._replace(programs_per_sm=0)
        if key in seen:
            continue
        seen.add(key)
        res = compile_resources(
            m._rmsnorm_bwd_kernel,
            {n: BF16 for n in ("DY", "X", "W", "DX")}
            | {n: FP32 for n in ("RSTD", "DOT", "DW_PART")},
            {
                "BLOCK_N": b.bwd_block,
                "INLINE_DOT": b.bwd_inline_dot,
                "ROWS": cfg.rows,
                "PREFETCH": cfg.prefetch,
                "STAGES": cfg.stages,
            },
            cfg.warps,
            unit=("stride_dy_col", "stride_x_col", "stride_dx_col"),
            aligned=("stride_dy_row", "stride_x_row", "stride_dx_row", "n_cols"),
            arch=arch,
        )
        out.append((key, res))
    return out


def swiglu(ffn: int, backward: bool, arch: int = 90) -> list[tuple[object, Resources]]:
    from kernels import swiglu as m

    fn = m._swiglu_bwd_kernel if backward else m._swiglu_fwd_kernel
    ptrs = {"DOUT": BF16, "GU": BF16, "DGU": BF16} if backward else {"GU": BF16, "OUT": BF16}
    names = list(fn.arg_names)
    return [
        (
            cfg,
            compile_resources(
                fn,
                ptrs,
                {
                    "BLOCK": cfg.block,
                    "LINEAR": cfg.linear and not cfg.flat,
                    "FLAT_FFN": ffn if cfg.flat else 0,
                },  # fmt: skip
                cfg.warps,
                unit=tuple(n for n in names if n.endswith("_col")),
                aligned=tuple(n for n in names if n.endswith("_row")) + ("n_ffn", "n_rows"),
                arch=arch,
            ),
        )
        for cfg in m.candidates(ffn)
    ]


def rotary(
    heads: int, kv_heads: int, head_dim: int, arch: int = 90
) -> list[tuple[object, Resources]]:
    """Every candidate, with cos/sin from the table or computed as its `cached` field says."""
    from kernels import rotary as m

    names = list(m._rotary_kernel.arg_names)
    unit = tuple(n for n in names if n.endswith("_dim") and n.startswith("stride")) + (
        "stride_pos",
    )
    aligned = tuple(n for n in names if n.startswith("stride") and n not in unit) + ("half",)
    out = []
    for cfg in m.candidates(heads, kv_heads, head_dim):
        res = compile_resources(
            m._rotary_kernel,
            {
                "Q": BF16,
                "K": BF16,
                "QO": BF16,
                "KO": BF16,
                "POS": "*i64",
                "INV_FREQ": FP32,
                "CS": FP32,
            },
            {
                "BLOCK_T": cfg.block_t,
                "BLOCK_HQ": cfg.block_hq,
                "BLOCK_HK": cfg.block_hk,
                "BLOCK_D": cfg.block_d,
                "CACHED": cfg.cached,
                "BACKWARD": False,
            },
            cfg.warps,
            unit=unit,
            floats=("scaling_factor",),
            aligned=aligned,
            arch=arch,
        )
        out.append((cfg, res))
    return out


def attention(kind: str, head_dim: int, arch: int = 90) -> list[tuple[object, Resources]]:
    """The flash-attention kernels ("fwd", "dq", "dkdv") at every autotune candidate of the
    head-dim class (kernels/attention.py `_CANDIDATES`), bf16."""
    from kernels import attention as m

    fn = {"fwd": m._fwd_kernel, "dq": m._dq_kernel, "dkdv": m._dkdv_kernel}[kind]
    names = list(fn.arg_names)
    tensors = {"fwd": ("Q", "K", "V", "O"), "dq": ("Q", "K", "V", "O", "DO", "DQ")}.get(
        kind, ("Q", "K", "V", "DO", "DK", "DV")
    )
    ptrs = {n: BF16 for n in tensors} | {"LSE": FP32, "ROW_START": "*i32", "cu_seqlens": "*i32"}
    if "DELTA" in names:
        ptrs["DELTA"] = FP32
    unit = tuple(n for n in names if n.startswith("stride") and n.endswith("d"))
    dclass = 64 if head_dim <= 64 else 128
    out = []
    for spec in m._CANDIDATES[kind][dclass]:
        block_m, block_n, warps, stages = spec
        consts = {
            "HEAD_DIM": head_dim,
            "BLOCK_D": m._block_d(head_dim),
            "PRECISION": "tf32",
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
        }
        res = compile_resources(
            fn,
            ptrs,
            consts,
            warps,
            unit=unit,
            floats=tuple(n for n in ("qk_scale", "sm_scale") if n in names),
            aligned=tuple(n for n in names if n.startswith("stride") and n not in unit),
            arch=arch,
            num_stages=stages,
        )
        out.append((spec, res))
    return out


def cross_entropy(kind: str, local: int = 32128, arch: int = 90) -> list[tuple[object, Resources]]:
    """Every candidate of the statistics or gradient kernel at a shard width."""
    from kernels import cross_entropy as m

    if kind == "stats":
        fn, cands, ptrs = m._ce_stats_kernel, m.candidates_stats(local), {
            "LOGITS": BF16, "LABELS": "*i64", "M": FP32, "S": FP32, "PICKED": FP32}  # fmt: skip
    else:
        fn, cands, ptrs = m._ce_grad_kernel, m.candidates_grad(local), {
            "LOGITS": BF16, "LABELS": "*i64", "M": FP32, "S": FP32, "DLOSS": FP32,
            "GRAD": BF16}  # fmt: skip
    names = list(fn.arg_names)
    aligned = tuple(n for n in names if n.startswith("stride")) + ("local",)  # padded: x 128
    out = []
    for cfg in cands:
        consts = {"BLOCK": cfg.block} | ({"STAGES": cfg.stages} if kind == "stats" else {})
        res = compile_resources(fn, ptrs, consts, cfg.warps, arch=arch, aligned=aligned)
        out.append((cfg, res))
    return out


FAMILIES = {
    "rmsnorm_fwd": lambda s, a: rmsnorm_fwd(s[0], a),
    "rmsnorm_bwd": lambda s, a: rmsnorm_bwd(s[0], a),
    "swiglu_fwd": lambda s, a: swiglu(s[0], False, a),
    "swiglu_bwd": lambda s, a: swiglu(s[0], True, a),
    "rotary": lambda s, a: rotary(*s, arch=a),
    "attention_fwd": lambda s, a: attention("fwd", s[0], a),
    "attention_dq": lambda s, a: attention("dq", s[0], a),
    "attention_dkdv": lambda s, a: attention("dkdv", s[0], a),
    "cross_entropy_stats": lambda s, a: cross_entropy("stats", s[0], a),
    "cross_entropy_grad": lambda s, a: cross_entropy("grad", s[0], a),
}
DEFAULT_SHAPES = {
    "rmsnorm_fwd": [(4096,), (8192,)],
    "rmsnorm_bwd": [(4096,), (8192,)],
    "swiglu_fwd": [(28672,)],
    "swiglu_bwd": [(28672,)],
    "rotary": [(32, 8, 128), (64, 8, 128), (8, 1, 128)],
    "attention_fwd": [(128,)],
    "attention_dq": [(128,)],
    "attention_dkdv": [(128,)],
    "cross_entropy_stats": [(32128,), (4016,)],
    "cross_entropy_grad": [(32128,)],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.resources", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--arch", type=int, default=90, help="sm_<arch> (90: H100/H200)")
    ap.add_argument("--family", choices=sorted(FAMILIES), action="append")
    ap.add_argument("--shape", help="comma-separated, e.g. 8192 or 32,8,128 (with one --family)")
    args = ap.parse_args(argv)
    if not available():
        print(
            "bench.resources: needs Triton's NVIDIA backend (ptxas, cuobjdump) and a Triton whose "
            "ASTSource takes `constexprs`"
        )
        return 1
    families = args.family or sorted(FAMILIES)
    for fam in families:
        shapes = (
            [tuple(int(x) for x in args.shape.split(","))] if args.shape else DEFAULT_SHAPES[fam]
        )
        for shape in shapes:
            for cfg, r in FAMILIES[fam](shape, args.arch):
                print(
                    f"{fam:12s} {','.join(map(str, shape)):10s} {cfg}  regs={r.regs} "
                    f"stack={r.stack} loop_spills={r.loop_spills} loads={'/'.join(r.vectors)} "
                    f"loads_before_store={r.loads_before_first_store}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
