"""The tuning candidates compile for sm_90 without spilling (bench.resources; no GPU needed).

A setting that spills registers to the stack is slower on every card, so a sweep should never
spend device time on it: the candidate lists in kernels/rmsnorm.py and swiglu.py are kept to
spill-free settings, and this holds them to it."""

import pytest

from bench import resources

pytestmark = pytest.mark.skipif(
    not resources.available(), reason="needs Triton's NVIDIA backend (ptxas, cuobjdump)"
)


@pytest.mark.parametrize("hidden", [4096, 8192])
def test_rmsnorm_backward_candidates_do_not_spill(hidden):
    reports = resources.rmsnorm_bwd(hidden)
    assert len(reports) >= 4
    spilled = [(cfg, r.stack) for cfg, r in reports if r.stack]
    assert not spilled, f"hidden {hidden}: settings with a stack frame (spills): {spilled}"
    assert "v4" in reports[0][1].vectors, "the heuristic should load 16 bytes per thread"


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
    does not (kernels/attention.py, the comment above _CANDIDATES)."""
    reports = resources.attention("dkdv", 128)
    assert any(r.stack == 0 for _, r in reports), reports
