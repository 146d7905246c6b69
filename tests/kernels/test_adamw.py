"""Fused AdamW and the gradient checks against torch.optim.AdamW and kernels/reference.py.

Runs the Triton kernels in the interpreter on CPU (`make test`) and on CUDA (`make test-gpu`).
"""

import pytest
import torch

from kernels import reference
from kernels.adamw import found_nonfinite, fused_adamw, grad_sq_norm_and_nonfinite
from tests.kernels.conftest import poison

# The seed's optimizer settings; lr is raised so 20 steps move the weights visibly.
LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-12
SHAPES = [(7, 13), (4097,), (1,), (33, 17, 3)]  # several parameters, odd sizes
HP = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1)  # for single steps


def _triton_version() -> tuple[int, ...]:
    try:
        import triton
    except ImportError:  # the CPU reference path
        return (99,)
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def _assert_model_copy(out: torch.Tensor, params: torch.Tensor, name: str = "model_out") -> None:
    """model_out must be params rounded to its dtype. On CUDA exactly (round to nearest even). The
    Triton interpreter truncates fp32 -> bf16 in every cast, so on CPU one ulp is allowed there."""
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values (unwritten element?)"
    if out.is_cuda or out.dtype != torch.bfloat16:
        assert torch.equal(out, params.to(out.dtype)), f"{name} is not the rounded new params"
    else:
        ulp = params.abs() * 2.0**-7
        assert ((out.float() - params).abs() <= ulp).all(), f"{name} is more than 1 ulp off params"


def _fresh_grad(n: int, step: int, gen: torch.Generator) -> torch.Tensor:
    """Random grads at mixed scales: exact zeros, tiny values whose sqrt(v) is below eps (1e-12),
    large ones; the pattern moves every step so no element keeps one regime. The first parameter
    (91 elements) always gets grads near 1e-13, where eps decides about 90% of the denominator:
    a misplaced eps changes its updates far beyond the tolerance."""
    g = torch.randn(n, generator=gen)
    scale = torch.tensor([1.0, 0.0, 1e-18, 30.0, 1e-3])[(torch.arange(n) + step) % 5]
    scale[:91] = 1e-13
    return g * scale


@pytest.mark.parametrize("weight_decay", [1e-6, 0.1])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_adamw_for_20_steps(device, weight_decay, grad_dtype):
    gen = torch.Generator().manual_seed(1234)
    inits = [torch.randn(s, generator=gen) for s in SHAPES]
    torch_params = [torch.nn.Parameter(t.clone().to(device)) for t in inits]
    opt = torch.optim.AdamW(torch_params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)

    n = sum(t.numel() for t in inits)
    params = torch.cat([t.flatten() for t in inits]).to(device)
    exp_avg = torch.zeros(n, device=device)
    exp_avg_sq = torch.zeros(n, device=device)
    model_out = torch.empty(n, dtype=torch.bfloat16, device=device)

    step = 0  # steps taken; a skipped step does not count, as in the trainer
    skip_at = 7
    prev_m = torch.zeros(n, device=device)  # torch's exp_avg before the step
    m_tol = torch.zeros(n, device=device)  # allowed |ours - torch| of exp_avg
    for it in range(20):
        g = _fresh_grad(n, it, gen).to(grad_dtype)
        # grad scale as a host float, as a 0-dim device tensor, and the default
        scale = [1.0, 0.5, torch.tensor(0.25, device=device)][it % 3]
        if it == skip_at:
            g[n // 2] = float("inf")
            g[3] = float("nan")
        g = g.to(device)
        sq, found_inf = grad_sq_norm_and_nonfinite(g)
        assert found_inf.item() == (1.0 if it == skip_at else 0.0)

        before = [t.clone() for t in (params, exp_avg, exp_avg_sq, model_out)]
        if it != skip_at:
            poison(model_out)
        fused_adamw(
            params,
            g,
            exp_avg,
            exp_avg_sq,
            lr=LR,
            beta1=BETAS[0],
            beta2=BETAS[1],
            eps=EPS,
            weight_decay=weight_decay,
            step=step + 1,
            grad_scale=scale,
            found_inf=found_inf,
            model_out=model_out,
        )
        if it == skip_at:
            after = (params, exp_avg, exp_avg_sq, model_out)
            for name, old, new in zip(
                ("params", "exp_avg", "exp_avg_sq", "model_out"), before, after
            ):
                assert torch.equal(old, new), f"skipped step changed {name}"
            continue
        step += 1

        # torch sees the same fp32 gradient: grads upcast then scaled, as the kernel does
        gs = g.float() * scale
        offset = 0
        for p in torch_params:
            p.grad = gs[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()

        ref_p = torch.cat([p.detach().flatten() for p in torch_params])
        ref_m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in torch_params])
        ref_v = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in torch_params])
        assert opt.state[torch_params[0]]["step"].item() == step
        # exp_avg = b1 * m + (1 - b1) * g can cancel (m and g of opposite signs), and torch and
        # the kernel may round differently (lerp against FMA; the Triton 3.6 interpreter does
        # not match torch bit for bit): each step's rounding is relative to the summands' size,
        # not to the possibly tiny result, and the difference carried from earlier steps decays
        # by b1. The bound tracks exactly that: 1e-6 (about 16 fp32 ulps) of each step's
        # summands, carried forward times b1.
        summands = BETAS[0] * prev_m.abs() + (1 - BETAS[0]) * gs.abs()
        m_tol = BETAS[0] * m_tol + 1e-6 * summands
        err = (exp_avg - ref_m).abs()
        allowed = torch.maximum(m_tol, 1e-6 * ref_m.abs()) + 1e-30
        worst = int((err - allowed).argmax())
        assert (err <= allowed).all(), (
            f"step {step}: exp_avg[{worst}] = {exp_avg[worst].item()!r}, torch "
            f"{ref_m[worst].item()!r}, allowed difference {allowed[worst].item()!r}"
        )
        prev_m = ref_m.clone()
        # A few fp32 ulps: torch and the kernel may contract v * beta2 + c * g * g differently.
        for name, ours, ref, atol in (
            ("exp_avg_sq", exp_avg_sq, ref_v, 1e-36),
            ("params", params, ref_p, 1e-7),
        ):
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=atol, msg=f"step {step}: {name}")
        _assert_model_copy(model_out, params, f"step {step} model_out")
    assert step == 19


@pytest.mark.parametrize("n", [1, 4097, 12345])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_odd_lengths_match_reference(device, n, out_dtype):
    gen = torch.Generator().manual_seed(n)
    p, m, g = (torch.randn(n, generator=gen) for _ in range(3))
    v = torch.rand(n, generator=gen) * 1e-3
    bufs = [t.to(device) for t in (p, g, m, v)]
    refs = [t.clone() for t in bufs]
    out = poison(torch.empty(n, dtype=out_dtype, device=device))
    ref_out = torch.empty(n, dtype=out_dtype, device=device)
    hp = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1, step=5, grad_scale=0.7)
    fused_adamw(*bufs, **hp, model_out=out)
    reference.adamw(*refs, **hp, model_out=ref_out)
    for i, name in ((0, "params"), (2, "exp_avg"), (3, "exp_avg_sq")):
        torch.testing.assert_close(bufs[i], refs[i], rtol=1e-6, atol=1e-7, msg=name)
    _assert_model_copy(out, bufs[0])


def test_device_scale_tensor_of_one_element(device):
    """A (1,) scale tensor (the clip coefficient as computed on the device) equals the float."""
    gen = torch.Generator().manual_seed(0)
    n = 3000
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    bufs_a = [t.to(device) for t in (p, g, torch.zeros(n), torch.zeros(n))]
    bufs_b = [t.clone() for t in bufs_a]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, step=1)
    fused_adamw(*bufs_a, **hp, grad_scale=torch.full((1,), 0.3, device=device))
    fused_adamw(*bufs_b, **hp, grad_scale=0.3)
    for a, b in zip(bufs_a, bufs_b):
        assert torch.equal(a, b)


def test_skip_leaves_everything_when_all_grads_are_nan(device):
    n = 4097
    gen = torch.Generator().manual_seed(1)
    p, m, v = (
        torch.randn(n, generator=gen),
        torch.randn(n, generator=gen),
        torch.rand(n, generator=gen),
    )
    bufs = [t.to(device) for t in (p, torch.full((n,), float("nan")), m, v)]
    before = [t.clone() for t in bufs]
    found = found_nonfinite(bufs[1], torch.zeros(1, device=device))
    out = torch.full((n,), 7.0, dtype=torch.bfloat16, device=device)
    fused_adamw(*bufs, **HP, step=3, found_inf=found, model_out=out)
    assert found.item() == 1.0
    for a, b in zip(before, bufs):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
    assert (out == 7.0).all()


@pytest.mark.parametrize("n", [1, 4097, 100003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_sq_norm_and_nonfinite(device, n, dtype):
    gen = torch.Generator().manual_seed(n)
    g = (torch.randn(n, generator=gen) * 3).to(dtype).to(device)
    sq, found = grad_sq_norm_and_nonfinite(g)
    exact = g.double().square().sum().item()
    assert sq.shape == (1,) and sq.dtype == torch.float32 and found.item() == 0.0
    assert abs(sq.item() - exact) <= 1e-5 * exact
    sq2, _ = grad_sq_norm_and_nonfinite(g)
    assert torch.equal(sq, sq2), "two-stage reduction is not deterministic"

    for pos, bad in ((n - 1, float("inf")), (0, float("nan")), (n // 2, float("-inf"))):
        h = g.clone()
        h[pos] = bad
        _, found = grad_sq_norm_and_nonfinite(h)
        assert found.item() == 1.0, f"missed {bad} at {pos} of {n}"
    h = g.clone()
    h[[0, n // 2, n - 1]] = float("nan")  # in three partials at n = 100003
    _, found = grad_sq_norm_and_nonfinite(h)
    assert found.item() == 1.0, "the flag is 1.0 however many partials saw a non-finite value"


def test_found_nonfinite_sets_and_never_clears(device):
    if device == "cpu" and _triton_version() < (3, 6):
        # Its store tests `if not mask`, which the interpreter evaluates on the value, so a
        # false scalar mask stores anyway (seen on 3.0 and 3.1; 3.6 tests `mask is None`).
        # Compiled code is not affected: the gpu run of this test covers the kernel.
        pytest.skip("Triton < 3.6's interpreter stores through a false scalar mask")
    g = torch.randn(12345, device=device)
    flag = torch.zeros(1, device=device)
    assert found_nonfinite(g, flag).item() == 0.0
    g[12344] = float("nan")
    assert found_nonfinite(g, flag).item() == 1.0
    assert found_nonfinite(torch.randn(100, device=device), flag).item() == 1.0
    h = torch.randn(100, dtype=torch.bfloat16, device=device)
    h[0] = float("-inf")
    assert found_nonfinite(h, torch.zeros(1, device=device)).item() == 1.0


def test_checks_read_nothing_past_the_buffer(device):
    """The gradient checks on the front of a longer buffer whose rest is NaN (a slice of a
    bigger flat buffer): an element past the end must not raise the flag."""
    if device == "cpu" and _triton_version() < (3, 6):
        pytest.skip("Triton < 3.6's interpreter stores through a false scalar mask")
    buf = torch.full((6000,), float("nan"), device=device)
    g = buf[:4097]
    g.copy_(torch.randn(4097))
    assert found_nonfinite(g, torch.zeros(1, device=device)).item() == 0.0
    sq, found = grad_sq_norm_and_nonfinite(g)
    assert found.item() == 0.0
    assert abs(sq.item() - g.double().square().sum().item()) <= 1e-5 * sq.item()


def test_bad_buffers_are_refused_with_a_message(device):
    if device == "cpu":
        pytest.importorskip("triton")
    p = torch.zeros(10, device=device)
    with pytest.raises(ValueError, match="exp_avg_sq has dtype"):
        fused_adamw(p, p.clone(), p.clone(), p.clone().half(), **HP, step=1)
    with pytest.raises(ValueError, match="grads must be a contiguous flat"):
        fused_adamw(p, torch.zeros(20, device=device)[::2], p.clone(), p.clone(), **HP, step=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offsets_past_2_pow_31_on_gpu():
    """int64 offsets: the elements after index 2^31 are updated and checked (about 35 GB)."""
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB free GPU memory, has {free / 2**30:.0f}")
    dev = "cuda"
    p, m = torch.randn(n, device=dev), torch.randn(n, device=dev)
    v = torch.rand(n, device=dev)
    g = torch.randn(n, device=dev, dtype=torch.bfloat16)
    tail = slice(2**31 - 5, n)
    refs = [t[tail].clone() for t in (p, g, m, v)]
    out = poison(torch.empty(n, dtype=torch.bfloat16, device=dev))
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.1, step=2)
    fused_adamw(p, g, m, v, **hp, model_out=out)
    reference.adamw(*refs, **hp)
    torch.testing.assert_close(p[tail], refs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v[tail], refs[3], rtol=1e-6, atol=1e-30)
    _assert_model_copy(out[tail], p[tail])
    g[n - 1] = float("inf")
    _, found = grad_sq_norm_and_nonfinite(g)
    assert found.item() == 1.0 and found_nonfinite(g, torch.zeros(1, device=dev)).item() == 1.0


def test_reference_flags_and_norm_against_their_definitions():
    """The CPU fallbacks of found_nonfinite, grad_sq_norm_and_nonfinite and the found_inf skip
    (what `fused_adamw` and friends run on CPU tensors outside the interpreter), checked here
    without a kernel: the tests above run the Triton path only. The flag is sticky (one flag
    collects several buffers), the norm is a sum of squares, and a set flag leaves every buffer
    untouched."""
    flag = torch.zeros(1)
    reference.found_nonfinite(torch.tensor([1.0, float("inf")]), flag)
    assert flag.item() == 1.0
    reference.found_nonfinite(torch.tensor([1.0, 2.0]), flag)
    assert flag.item() == 1.0, "a finite buffer cleared the flag"

    sq, found = reference.grad_sq_norm_and_nonfinite(torch.tensor([3.0, -4.0, 0.5]))
    assert sq.tolist() == [25.25] and found.tolist() == [0.0]

    p, m, v = torch.randn(5), torch.randn(5), torch.rand(5)
    bufs = [p, torch.randn(5), m, v]
    before = [t.clone() for t in bufs]
    out = torch.full((5,), 7.0, dtype=torch.bfloat16)
    reference.adamw(*bufs, **HP, step=3, found_inf=torch.ones(1), model_out=out)
    for a, b in zip(before, bufs):
        assert torch.equal(a, b)
    assert (out == 7.0).all()
