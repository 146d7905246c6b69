"""The tuning candidates compile for sm_90 without spilling (bench.resources; no GPU needed).

A setting that spills registers inside its loops is slower on every card, so a sweep should
never spend device time on it: the candidate lists in kernels/rmsnorm.py and swiglu.py are kept
to spill-free settings, and this holds them to it."""

import pytest

from bench import resources

pytestmark = pytest.mark.skipif(
    not resources.available(),
    reason="needs Triton's NVIDIA backend (ptxas, cuobjdump) and ASTSource(constexprs=)",
)


@pytest.mark.parametrize("hidden", [4096, 8192])
def test_rmsnorm_backward_candidates_do_not_spill(hidden):
    """No spill inside the row loop. At 32 warps (64 registers a thread) the pipelined settings
    keep two values in 8 bytes of stack across the loop: written before it, read after it."""
    reports = resources.rmsnorm_bwd(hidden)
    assert len(reports) >= 4
    spilled = [(cfg, r.loop_spills) for cfg, r in reports if r.loop_spills]
    assert not spilled, f"hidden {hidden}: settings that spill inside a loop: {spilled}"
    assert all(r.stack <= 16 for _, r in reports), reports
    assert "v4" in reports[0][1].vectors, "the heuristic should load 16 bytes per thread"
    staged = [cfg for cfg, _ in reports if cfg.stages > 1]
    assert staged, "pipelined (cp.async) settings are candidates"


def test_loop_spills_are_found():
    """Local-memory accesses count only between a backward branch and its target; the attention
    dK/dV setting known to spill (64x128: 344 B of stack under Triton 3.9, 976 B under 3.6) has
    them in its loops."""
    sass = """
        /*0010*/                   STL [R1+0x4], R0 ;
        /*0020*/                   FADD R2, R2, R3 ;
        /*0030*/                   LDL R5, [R1+0x8] ;
        /*0040*/               @P1 BRA 0x20 ;
        /*0050*/                   LDL.LU R12, [R1+0x4] ;
        /*0060*/              @!P5 BRA !P6, 0x70 ;
        /*0070*/                   BRA 0x70;
    """
    assert resources.loop_spills(sass) == 1  # 0x30 is in [0x20, 0x40]; 0x10 and 0x50 are not
    reports = dict(resources.attention("dkdv", 128))
    assert reports[(64, 128, 8, 3)].loop_spills > 0


def test_rmsnorm_forward_candidates_do_not_spill():
    spilled = [(cfg, r.stack) for cfg, r in resources.rmsnorm_fwd(8192) if r.stack]
    assert not spilled


def test_swiglu_forward_candidates_do_not_spill():
    reports = resources.swiglu(28672, backward=False)
    assert not [(cfg, r.stack) for cfg, r in reports if r.stack]
    assert all(r.regs <= 64 for _, r in reports)


def test_rotary_loads_before_stores():
    """The restructured rotary issues its q and k loads before the first store (one DRAM round
    trip per program, not one per tensor)."""
    cfg, r = resources.rotary(8, 1, 128)[0]  # the heuristic for 70B at tensor-parallel 8
    assert r.loads_before_first_store >= 4, (cfg, r)


def test_attention_dkdv_has_a_spill_free_candidate():
    """At d=128 the dK/dV kernel spills at 64-query steps; the autotune list keeps a setting that
    does not (kernels/attention.py, the comment above _CANDIDATES). Triton 3.6 (the GPU image's)
    compiles the best of them, 16x128 w8 s2, to 8 bytes of stack with 2 spill instructions
    inside a loop (bench/NOTES.md); 3.9 to none."""
    import triton

    reports = resources.attention("dkdv", 128)
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9):
        assert any(r.stack == 0 for _, r in reports), reports
    else:
        assert any(r.stack <= 8 and r.loop_spills <= 2 for _, r in reports), reports


@pytest.mark.parametrize("kind", ["stats", "grad"])
def test_cross_entropy_candidates_load_vectors_without_spills(kind):
    """No stack; loads masked by the row's (aligned) end, not the real vocabulary's, so 16-byte
    vectors (pipelined settings copy through shared memory with cp.async instead)."""
    reports = resources.cross_entropy(kind)
    assert len(reports) >= 5
    staged = lambda cfg: getattr(cfg, "stages", 1) > 1
    bad = [(c, r) for c, r in reports if r.stack or not (staged(c) or "v4" in r.vectors)]
    assert not bad, bad
