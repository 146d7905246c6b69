"""Host-side checks found missing by a mutation pass over the kernels' Python code: the tuning
table's edge cases (a table without a card field, an entry that is not a mapping, settings of
0), and argument and launch checks of the wrappers that no other test pinned. Each test names
the change to the host code it catches."""

import json
import warnings

import pytest
import torch

from kernels import tuning
from kernels._triton import INTERPRET

# ---------------------------------------------------------------- tuning table


_CUDA = torch.device("cuda", 0)  # only its type and index are read: no GPU needed


def _write(path, ops, card="NVIDIA Fake"):
    data = {"ops": ops} if card is None else {"card": card, "ops": ops}
    path.write_text(json.dumps(data))


def test_card_slug_trims_separators():
    """A name with leading or trailing punctuation or spaces gives the same file name as the
    plain one (dropping `.strip("-")` would look for '-nvidia-h200-.json')."""
    assert tuning.card_slug(" NVIDIA H200 ") == "nvidia-h200"
    assert tuning.card_slug("(NVIDIA) H200.") == "nvidia-h200"


def test_table_without_a_card_field_applies(fake_card):
    """Only a table that names another card is refused: one without a "card" field (written by
    hand) still applies on the card whose file name it has (refusing it would run the heuristic
    silently slower; a check that drops `written_for is not None` compares against 'None')."""
    from kernels.rmsnorm import FwdConfig

    _write(fake_card, {"rmsnorm_fwd": {"hidden=64": {"warps": 8}}}, card=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = tuning.tuned_config("rmsnorm_fwd", "hidden=64", _CUDA, FwdConfig(4, 1))
    assert cfg == FwdConfig(8, 1)


def test_entry_that_is_not_a_mapping_falls_back(fake_card):
    """An entry that is a number, not {param: value}, makes the whole table bad: a note naming
    the file, and the heuristic. Without the layout check on entries the lookup would hand 8 to
    `apply`, which raises TypeError at every launch (a crash, where a bad table must only cost
    speed)."""
    from kernels.rmsnorm import FwdConfig

    _write(fake_card, {"rmsnorm_fwd": {"hidden=64": 8}})
    with pytest.warns(UserWarning, match="nvidia-fake.json: expected"):
        cfg = tuning.tuned_config("rmsnorm_fwd", "hidden=64", _CUDA, FwdConfig(4, 1))
    assert cfg == FwdConfig(4, 1)


@pytest.mark.parametrize(
    "op, key, params, field",
    [
        ("rmsnorm_fwd", "hidden=64", {"warps": 0}, "warps=0"),
        ("rmsnorm_bwd", "hidden=64", {"programs_per_sm": 0}, "programs_per_sm=0"),
        ("rmsnorm_bwd", "hidden=64", {"stages": 0}, "stages=0"),
        ("rmsnorm_bwd", "hidden=64", {"rows": 3}, "rows=3"),
        ("swiglu_fwd", "ffn=64", {"block": 0}, "block=0"),
        ("cross_entropy_stats", "vocab=64", {"warps": -4}, "warps=-4"),
    ],
)
def test_zero_or_negative_setting_falls_back(fake_card, op, key, params, field):
    """0 is not a power of two (0 & -1 == 0: the `value >= 1` of the power-of-two test matters)
    and not a count: num_warps=0, a block of 0, or 0 row groups per SM (a division by zero in the
    backward's layout) is skipped with a note naming the setting, and the heuristic runs. So are
    3 rows per step (the rows of a tile come from tl.arange, which needs a power of two)."""
    from kernels import cross_entropy, rmsnorm, swiglu

    defaults = {
        "rmsnorm_fwd": rmsnorm.FwdConfig(4, 1),
        "rmsnorm_bwd": rmsnorm.BwdConfig(4, 1, 4),
        "swiglu_fwd": swiglu.Config(128, 1),
        "cross_entropy_stats": cross_entropy.StatsConfig(64, 8),
    }[op]
    _write(fake_card, {op: {key: params}})
    with pytest.warns(UserWarning, match=field):
        assert tuning.tuned_config(op, key, _CUDA, defaults) == defaults


# ---------------------------------------------------------------- rmsnorm


def test_rmsnorm_strided_weight(device):
    """A weight that is a strided view (every other element of a buffer, as a weight sliced out
    of a stacked parameter may be) gives the reference's y, dx and dweight. The kernels index the
    weight by column alone, so the forward and the backward launchers must each make it
    contiguous (the backward gets the saved weight as it was passed, not the forward's copy)."""
    from kernels import reference
    from kernels.rmsnorm import rmsnorm

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 40, generator=g).to(device)
    wbuf = (1.0 + 0.5 * torch.randn(80, generator=g)).to(device)
    dy = torch.randn(6, 40, generator=g).to(device)
    grads = []
    for fn in (rmsnorm, reference.rmsnorm):
        x = x0.clone().requires_grad_()
        wb = wbuf.clone().requires_grad_()
        w = wb[::2]
        assert w.stride() == (2,)
        y = fn(x, w, 1e-5)
        y.backward(dy)
        grads.append((y.detach(), x.grad, wb.grad[::2]))
    for got, want, name in zip(grads[0], grads[1], ("y", "dx", "dweight"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


class _Spy:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, then runs
    the real kernel, so a test sees the launch settings as well as the result."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.tensors = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            self.tensors += [a for a in args if isinstance(a, torch.Tensor)]
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_rmsnorm_chunked_forward_takes_the_chunk_and_one_row_per_program(device, monkeypatch):
    """A chunked forward setting (a tuned entry may carry rows > 1 with a chunk) runs the two-pass
    path with its own chunk width and one row per program: the chunked kernel walks a single row,
    so a grid of cdiv(rows, cfg.rows) would leave rows unwritten; ignoring `chunk` would time (and
    commit) the single-block kernel under the chunked setting's name."""
    import kernels.rmsnorm as rms_mod
    from tests.kernels.conftest import poisoned_empty

    spy = _Spy(rms_mod._rmsnorm_fwd_kernel)
    monkeypatch.setattr(rms_mod, "_rmsnorm_fwd_kernel", spy)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 40, generator=g).to(device)
    w = torch.randn(40, generator=g).to(device)
    y = poisoned_empty(5, 40, dtype=torch.float32, device=device)
    rstd = poisoned_empty(5, dtype=torch.float32, device=device)
    rms_mod._rmsnorm_fwd(x, w, 1e-5, out=y, rstd=rstd, cfg=rms_mod.FwdConfig(4, 2, chunk=16))
    ((grid, meta),) = spy.launches
    assert grid == (5,)
    assert (meta["SINGLE"], meta["BLOCK_N"], meta["ROWS"], meta["W_FIRST"]) == (False, 16, 1, False)
    from kernels import reference

    torch.testing.assert_close(y, reference.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dispatch


def _dispatch_cases(device):
    """(module, kernel attribute, call) per public entry point, on small inputs."""
    from kernels import adamw, attention, cross_entropy, rmsnorm, rotary, swiglu

    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    p = r(32)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    pos = torch.arange(4, device=device)
    labels = torch.tensor([1, 3, 0], device=device)
    return {
        "rmsnorm": (rmsnorm, "_rmsnorm_fwd_kernel", lambda: rmsnorm.rmsnorm(r(3, 16), r(16))),
        "swiglu": (swiglu, "_swiglu_fwd_kernel", lambda: swiglu.swiglu(r(3, 16))),
        "rotary": (rotary, "_rotary_kernel", lambda: rotary.rotary(r(4, 2, 8), r(4, 1, 8), pos)),
        "rotary-inplace": (
            rotary,
            "_rotary_kernel",
            lambda: rotary.rotary(r(4, 2, 8), r(4, 1, 8), pos, inplace=True),
        ),
        "adamw": (
            adamw,
            "_adamw_kernel",
            lambda: adamw.fused_adamw(p, r(32), torch.zeros_like(p), torch.zeros_like(p), **hp),
        ),
        "found_nonfinite": (
            adamw,
            "_found_nonfinite_kernel",
            lambda: adamw.found_nonfinite(r(32), torch.zeros(1, device=device)),
        ),
        "grad_sq_norm": (
            adamw,
            "_sq_norm_partial_kernel",
            lambda: adamw.grad_sq_norm_and_nonfinite(r(32)),
        ),
        "ce_stats": (
            cross_entropy,
            "_ce_stats_kernel",
            lambda: cross_entropy.ce_stats(r(3, 8), labels, 0, 8),
        ),
        "attention": (
            attention,
            "_fwd_kernel",
            lambda: attention.attention(r(8, 2, 16), r(8, 1, 16), r(8, 1, 16), cu, 8),
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "rmsnorm",
        "swiglu",
        "rotary",
        "rotary-inplace",
        "adamw",
        "found_nonfinite",
        "grad_sq_norm",
        "ce_stats",
        "attention",
    ],
)
def test_public_functions_launch_the_kernel(device, monkeypatch, name):
    """Under the interpreter (CPU tensors) and on CUDA, each public function runs its Triton
    kernel, not the reference: the kernel tests that go through the public functions compare
    against the reference, so a dispatch that took the reference for CPU tensors under
    TRITON_INTERPRET (`x.is_cuda` in place of `use_triton(x)`) would pass them all, testing
    nothing."""
    module, attr, call = _dispatch_cases(device)[name]
    spy = _Spy(getattr(module, attr))
    monkeypatch.setattr(module, attr, spy)
    call()
    assert spy.launches, f"{name} did not launch {attr}"


# ---------------------------------------------------------------- int32-offset fallbacks


def _col_strided(rows, cols, device, seed):
    """A (rows, cols) view with column stride 2 (every other column of a wider buffer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2 * cols, generator=g).to(device)[:, ::2]


@pytest.mark.parametrize("family", ["rmsnorm", "swiglu", "rotary"])
def test_wide_views_reach_the_kernel_dense(device, monkeypatch, family):
    """Where `wide_offsets` says a view's int32 offsets would overflow, every such input reaches
    the kernel as a dense copy and every such output is written through a dense buffer and
    copied back. A 4 GiB buffer makes a real overflow (test_wrapper_audit, slow, with dense
    upstream gradients); here `wide_offsets` is told that every view with a column stride other
    than 1 is wide, so each input and output of the forward and the backward is checked,
    small: an input that skips its copy (dy, dout, ...) reaches the kernel strided."""
    import kernels.rmsnorm as rms_mod
    import kernels.rotary as rot_mod
    import kernels.swiglu as swi_mod
    from kernels import reference

    module, kernels_ = {
        "rmsnorm": (rms_mod, ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")),
        "swiglu": (swi_mod, ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel")),
        "rotary": (rot_mod, ("_rotary_kernel",)),
    }[family]
    monkeypatch.setattr(module, "wide_offsets", lambda t, *a, **k: t.stride(-1) != 1)
    spies = [_Spy(getattr(module, name)) for name in kernels_]
    for name, spy in zip(kernels_, spies, strict=True):
        monkeypatch.setattr(module, name, spy)
    if family == "rmsnorm":
        x, dy, w = _col_strided(5, 24, device, 1), _col_strided(5, 24, device, 2), torch.ones(24)
        w = w.to(device)
        out = _col_strided(5, 24, device, 3)
        y, rstd = rms_mod._rmsnorm_fwd(x, w, 1e-5, out=out)
        dx = _col_strided(5, 24, device, 4)
        rms_mod._rmsnorm_bwd(dy, x, w, rstd, dx=dx)
        xr = x.detach().clone().requires_grad_()
        yr = reference.rmsnorm(xr, w, 1e-5)
        yr.backward(dy)
        got, want = (out, dx), (yr.detach(), xr.grad)
    elif family == "swiglu":
        gu, dout = _col_strided(5, 32, device, 1), _col_strided(5, 16, device, 2)
        out, dgu = _col_strided(5, 16, device, 3), _col_strided(5, 32, device, 4)
        swi_mod._swiglu_fwd(gu, out=out)
        swi_mod._swiglu_bwd(dout, gu, dgate_up=dgu)
        gr = gu.detach().clone().requires_grad_()
        outr = reference.swiglu(gr)
        outr.backward(dout)
        got, want = (out, dgu), (outr.detach(), gr.grad)
    else:  # one of q, k, q_out, k_out strided at a time: each alone must trigger the copies

        def t(heads, seed, strided):
            full = torch.randn(4, heads, 16, generator=torch.Generator().manual_seed(seed))
            return full.to(device)[..., ::2] if strided else full[..., :8].contiguous().to(device)

        pos = torch.tensor([0, 3, 5, 9], device=device)
        got, want = [], []
        for which in ("q", "k", "q_out", "k_out"):
            q, k = t(2, 1, which == "q"), t(1, 2, which == "k")
            qo, ko = t(2, 3, which == "q_out"), t(1, 4, which == "k_out")
            rot_mod._rotary_apply(q, k, pos, 10000.0, 1.0, q_out=qo, k_out=ko)
            got += [qo, ko]
            want += reference.rotary(q, k, pos)
    for spy in spies:
        assert spy.launches
        assert all(t.stride(-1) == 1 for t in spy.tensors), [t.stride() for t in spy.tensors]
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- rotary arguments


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_rotary_refuses_what_it_would_rotate_wrongly(device, monkeypatch, path):
    """On both paths: an odd head_dim (the kernel rotates head_dim // 2 pairs and would leave the
    last column as it was), floating positions (the kernel would read their bits as integers)
    and a cos/sin table that is not 2-D (a (positions, head_dim, 1) table has the right width
    but is indexed by its first and last strides) are refused with a message, not rotated."""
    import kernels.rotary as rot_mod

    if path == "reference":
        monkeypatch.setattr(rot_mod, "use_triton", lambda t: False)
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(3, 2, 8, generator=g).to(device), torch.randn(3, 1, 8, generator=g)
    k = k.to(device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="even head_dim"):
        rot_mod.rotary(q[..., :7], k[..., :7], pos)
    with pytest.raises(ValueError, match="positions must be integer"):
        rot_mod.rotary(q, k, pos.float())
    table = rot_mod.rotary_cos_sin(16, 8, 10000.0, 1.0, torch.device(device)).unsqueeze(-1)
    with pytest.raises(ValueError, match=r"cos_sin must be an fp32 \(max_positions"):
        rot_mod.rotary(q, k, pos, cos_sin=table)


def test_rotary_zero_tile_setting_is_refused(device):
    """A launch setting with a tile of 0 (0 is not a power of two, though 0 & -1 == 0) is refused
    with the settings' message, as a table entry would be, rather than launched."""
    import kernels.rotary as rot_mod

    q, k = torch.randn(3, 2, 8).to(device), torch.randn(3, 1, 8).to(device)
    base = rot_mod._heuristic(2, 1, 8)
    for field in ("block_t", "block_hq", "block_hk", "warps"):
        with pytest.raises(ValueError, match="power of two"):
            rot_mod._rotary_apply(
                q, k, torch.arange(3, device=device), 10000.0, 1.0, cfg=base._replace(**{field: 0})
            )


@pytest.mark.parametrize("live", ["q", "k"])
def test_rotary_inplace_with_one_side_requiring_grad(device, live):
    """In-place rotary on views of a fused qkv where only q's or only k's part needs a gradient
    (the other frozen, or produced under no_grad): the rotation must still be recorded for the
    one that does. Taking the no-autograd single launch because q alone does not require grad
    would rotate k in place behind autograd's back: k's gradient would come out unrotated."""
    from kernels import reference
    from kernels.rotary import rotary

    tokens, d = 5, 8
    g = torch.Generator().manual_seed(12)
    base_q = torch.randn(tokens, 2, d, generator=g).to(device)
    base_k = torch.randn(tokens, 1, d, generator=g).to(device)
    pos = torch.arange(tokens, device=device).flip(0)
    w = torch.randn(tokens, 2 if live == "q" else 1, d, generator=g).to(device)
    grads = []
    for fn in ("kernel", "reference"):
        leaf = (base_q if live == "q" else base_k).clone().requires_grad_()
        q = leaf * 1.0 if live == "q" else base_q.clone()  # a non-leaf that requires grad
        k = leaf * 1.0 if live == "k" else base_k.clone()
        if fn == "kernel":
            qo, ko = rotary(q, k, pos, inplace=True)
        else:
            qo, ko = reference.rotary(q, k, pos)
        ((qo if live == "q" else ko) * w).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- which table entry a launch reads


def test_swiglu_launchers_read_their_own_pass(device, monkeypatch):
    """The forward launch asks for the forward's settings and the backward launch for the
    backward's (test_swiglu checks `_config` itself; this checks what the launchers pass it):
    a forward launched with the backward's entry would run a setting never timed for it."""
    import kernels.swiglu as swi_mod

    asked = []

    def config(n_ffn, dev, backward):
        asked.append((n_ffn, backward))
        return swi_mod._heuristic(n_ffn)

    monkeypatch.setattr(swi_mod, "_config", config)
    gu = torch.randn(3, 24).to(device)
    out = swi_mod._swiglu_fwd(gu)
    swi_mod._swiglu_bwd(torch.ones_like(out), gu)
    assert asked == [(12, False), (12, True)]


def test_rotary_wide_check_counts_a_programs_tokens(device, monkeypatch):
    """A rotary program adds up to block_t - 1 token strides to its int32 head and dim offsets,
    so the overflow check must be given that extra: a view whose heads alone fit int32 but whose
    tokens of one program do not is copied too (without the extra the launch would wrap)."""
    import kernels.rotary as rot_mod
    from kernels._triton import wide_offsets

    seen = []

    def spy(t, dims=(1,), extra=0):
        seen.append((t.stride(0), dims, extra))
        return wide_offsets(t, dims, extra)

    monkeypatch.setattr(rot_mod, "wide_offsets", spy)
    q = torch.randn(6, 2, 8).to(device)
    k = torch.randn(6, 1, 8).to(device)
    cfg = rot_mod._heuristic(2, 1, 8)._replace(block_t=4)
    rot_mod._rotary_apply(q, k, torch.arange(6, device=device), 10000.0, 1.0, cfg=cfg)
    assert seen and all(dims == (1, 2) and extra == 3 * s0 for s0, dims, extra in seen)
    seen.clear()
    q1, k1 = q[:2], k[:2]  # fewer tokens than block_t: only those tokens count
    rot_mod._rotary_apply(q1, k1, torch.arange(2, device=device), 10000.0, 1.0, cfg=cfg)
    assert seen and all(extra == 1 * s0 for s0, _, extra in seen)


# ---------------------------------------------------------------- adamw, attention arguments


def test_adamw_step_zero_is_refused_with_a_message(device):
    """step counts from 1: step 0 is the ValueError that says so (bias correction 1 - beta^0 is
    0, which the host constants would otherwise meet as a ZeroDivisionError)."""
    from kernels.adamw import fused_adamw

    p = torch.zeros(16, device=device)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="step counts from 1"):
        fused_adamw(p, p.clone(), p.clone(), p.clone(), **hp, step=0)


@pytest.mark.parametrize("head_dim", [144, 256])
def test_attention_refuses_head_dims_past_128(device, head_dim):
    """head_dim above 128 is refused before any launch, on every path: the kernels' launch
    settings exist for head-dim classes 64 and 128 only, so a wider head would be launched with
    the 128 class's tiles."""
    from kernels.attention import attention

    q = torch.randn(8, 2, head_dim).to(device)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 16 from 16 to 128"):
        attention(q, q[:, :1], q[:, :1], cu, 8)


def test_adamw_flags_and_model_copy_are_checked(device):
    """Buffers the kernels index without a shape of their own are refused with a message: a
    grad_scale or found_inf of more than one element (the kernel would read its first element
    and ignore the rest), a model copy of the wrong dtype or length (written as bf16/fp16 over n
    elements), and a strided or integer buffer handed to found_nonfinite (read as flat floats,
    it would check the wrong elements)."""
    from kernels.adamw import found_nonfinite, fused_adamw

    p = torch.zeros(16, device=device)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)

    def step(**kw):
        fused_adamw(p, p.clone(), p.clone(), p.clone(), **hp, **kw)

    with pytest.raises(ValueError, match="grad_scale must be a 1-element float tensor"):
        step(grad_scale=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="found_inf must be a 1-element float tensor"):
        step(found_inf=torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="model_out has dtype"):
        step(model_out=torch.zeros(16, device=device))
    with pytest.raises(ValueError, match="model_out must be a contiguous flat"):
        step(model_out=torch.zeros(8, device=device, dtype=torch.bfloat16))
    flag = torch.zeros(1, device=device)
    with pytest.raises(ValueError, match="grads must be a contiguous flat"):
        found_nonfinite(torch.zeros(32, device=device)[::2], flag)
    with pytest.raises(ValueError, match="grads has dtype"):
        found_nonfinite(torch.zeros(16, device=device, dtype=torch.int32), flag)
    with pytest.raises(ValueError, match="found_inf must be a 1-element float tensor"):
        found_nonfinite(torch.zeros(16, device=device), torch.zeros(2, device=device))


def test_attention_refuses_mixed_dtypes(device):
    """q, k and v of different dtypes are refused, not launched (the kernels load k and v into
    dot products typed by q)."""
    from kernels.attention import attention

    q = torch.randn(8, 2, 16).to(device)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, q[:, :1].half(), q[:, :1], cu, 8)


# ---------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_cross_entropy_valid_outside_the_shard_is_refused(device, monkeypatch, path):
    """`valid` is how many of the shard's columns are real: more than its width would make the
    kernels read and write past each row, fewer than 0 is meaningless; both are refused with a
    message on both paths."""
    import kernels.cross_entropy as ce_mod

    if path == "reference":
        monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    logits = torch.randn(3, 8).to(device)
    labels = torch.tensor([1, 2, 3], device=device)
    for valid in (9, -1):
        with pytest.raises(ValueError, match=rf"valid columns {valid} outside \[0, 8\]"):
            ce_mod.ce_stats(logits, labels, 0, valid)


def test_cross_entropy_column_strided_logits(device):
    """Logits with a column stride other than 1 (every other column of a wider buffer) give the
    reference's statistics and gradient: the kernels index columns with unit stride, so the
    launchers must hand them a copy, and a row-strided view's gradient is written densely with
    its own row stride."""
    from kernels import reference
    from kernels.cross_entropy import ce_grad, ce_stats

    g = torch.Generator().manual_seed(9)
    tokens, local = 4, 24
    labels = torch.tensor([0, 5, 23, 11], device=device)
    dloss = torch.rand(tokens, generator=g).to(device) + 0.5
    base = torch.randn(tokens, 3 * local, generator=g).to(device)
    for logits in (base[:, ::3], base[:, 5 : 5 + local]):  # column stride 3; row stride 72
        m, s, picked = ce_stats(logits, labels, 0, local)
        rm, rs, rp = reference.ce_stats(logits, labels, 0, local)
        torch.testing.assert_close((m, s, picked), (rm, rs, rp), rtol=1e-5, atol=1e-6)
        got = ce_grad(logits, labels, 0, local, rm, rs, dloss)
        want = reference.ce_grad(logits, labels, 0, local, rm, rs, dloss)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_ce_grad_refuses_s_of_another_length(device, monkeypatch, path):
    """m and s are each checked: an s of another length than the tokens (m right) is refused,
    not read past its end by a kernel that indexes it by row."""
    import kernels.cross_entropy as ce_mod

    if path == "reference":
        monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    logits = torch.randn(5, 12).to(device)
    labels = torch.tensor([1, 0, 11, 3, 7], device=device)
    m, s = torch.zeros(5, device=device), torch.ones(5, device=device)
    with pytest.raises(ValueError, match="m and s"):
        ce_mod.ce_grad(logits, labels, 0, 12, m, s[:1], torch.ones(5, device=device))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_attention_refuses_tokens_without_a_document(device, monkeypatch, path):
    """Tokens with cu_seqlens = [0] (no document) are refused: the kernels would search an empty
    boundary list for each token's document."""
    import kernels.attention as att_mod

    if path == "reference":
        monkeypatch.setattr(att_mod, "use_triton", lambda t: False)
    q = torch.randn(8, 2, 16).to(device)
    cu = torch.tensor([0], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        att_mod.attention(q, q[:, :1], q[:, :1], cu, 8)


# ---------------------------------------------------------------- table keys and heuristics


def test_launchers_look_up_the_exact_shape(device, monkeypatch):
    """Each launcher looks its settings up under the key of the exact shape it runs: the hidden
    size (not its power-of-two block: 5120 and 8192 share a block but not a setting), the ffn
    width, the head shape, and for cross-entropy the shard's width (not `valid`), in each pass's
    own op."""
    import kernels.cross_entropy as ce_mod
    import kernels.rmsnorm as rms_mod
    import kernels.rotary as rot_mod
    import kernels.swiglu as swi_mod

    asked = []
    monkeypatch.setattr(tuning, "lookup", lambda op, key, dev: asked.append((op, key)))
    x = torch.randn(3, 40).to(device)
    w = torch.ones(40).to(device)
    y = rms_mod.rmsnorm(x.requires_grad_(), w)
    y.backward(torch.ones_like(y))
    out = swi_mod._swiglu_fwd(torch.randn(2, 24).to(device))
    swi_mod._swiglu_bwd(torch.ones_like(out), torch.randn(2, 24).to(device))
    rot_mod.rotary(torch.randn(3, 4, 8).to(device), torch.randn(3, 2, 8).to(device),
                   torch.arange(3, device=device))  # fmt: skip
    logits, labels = torch.randn(3, 16).to(device), torch.tensor([0, 3, 9], device=device)
    m, s, _ = ce_mod.ce_stats(logits, labels, 0, 12)
    ce_mod.ce_grad(logits, labels, 0, 12, m, s, torch.ones(3, device=device))
    assert asked == [
        ("rmsnorm_fwd", "hidden=40"),
        ("rmsnorm_bwd", "hidden=40"),
        ("swiglu_fwd", "ffn=12"),
        ("swiglu_bwd", "ffn=12"),
        ("rotary", "heads=4,kv_heads=2,head_dim=8"),
        ("cross_entropy_stats", "vocab=16"),
        ("cross_entropy_grad", "vocab=16"),
    ]


@pytest.mark.parametrize("n", [40, 123, 4096, 5120, 8192, 8200, 20000])
def test_sweeps_start_from_the_heuristic_the_launchers_run(n):
    """The first candidate a tuning sweep times is the setting a launch runs without a table
    (bench.tune keeps the heuristic unless a candidate clearly beats it): the same function of
    the shape in both places, for every family, at one-block, chunked and wide widths."""
    import kernels.cross_entropy as ce_mod
    import kernels.rmsnorm as rms_mod
    import kernels.rotary as rot_mod
    import kernels.swiglu as swi_mod

    cpu = torch.device("cpu")
    assert rms_mod.candidates_fwd(n)[0] == rms_mod._fwd_config(n, cpu)
    assert rms_mod.candidates_bwd(n)[0] == rms_mod._bwd_config(n, cpu)
    assert swi_mod.candidates(n)[0] == swi_mod._config(n, cpu, False)
    assert swi_mod.candidates(n)[0] == swi_mod._config(n, cpu, True)
    assert ce_mod.candidates_stats(n)[0] == ce_mod._stats_config(n, cpu)
    assert ce_mod.candidates_grad(n)[0] == ce_mod._grad_config(n, cpu)
    heads = max(1, n // 1000)
    assert rot_mod.candidates(heads, 1, 128)[0] == rot_mod._config(heads, 1, 128, cpu)


def test_attention_strided_int32_cu_seqlens(device):
    """An int32 cu_seqlens that is a strided view (every other element of a buffer) gives the
    same result as the dense one: the kernels read the boundaries with unit stride, so the
    launcher must copy a strided one even when its dtype is already right."""
    from kernels import reference
    from kernels.attention import attention

    g = torch.Generator().manual_seed(10)
    q = torch.randn(8, 2, 16, generator=g).to(device)
    k, v = torch.randn(8, 1, 16, generator=g).to(device), torch.randn(8, 1, 16, generator=g)
    v = v.to(device)
    cu = torch.tensor([0, 9, 3, 9, 8, 9], dtype=torch.int32, device=device)[::2]  # [0, 3, 8]
    assert cu.stride() == (2,)
    got = attention(q, k, v, cu, 5)
    want = reference.attention(q, k, v, cu.contiguous(), 5, 16**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- linear


def test_weight_grad_not_fused_returns_it_and_leaves_the_accumulator():
    """`fuse=False` (decided at the forward: no accumulator then, or grad mode off) returns dW for
    autograd even if the weight carries an accumulator by the time of the backward; sending it to
    the accumulator as well would return None and count that gradient in the wrong place."""
    from kernels.linear import weight_grad

    w = torch.nn.Parameter(torch.randn(3, 4))
    calls = []
    w.accumulate_weight_grad = lambda dy, x: calls.append((dy, x))
    dy, x = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    got = weight_grad(w, dy, x, fuse=False)
    torch.testing.assert_close(got, dy.reshape(-1, 3).t() @ x.reshape(-1, 4))
    assert calls == []
    assert weight_grad(w, dy, x) is None and len(calls) == 1


def test_each_device_reads_its_own_cards_table(tmp_path, monkeypatch):
    """On a machine with two different cards, a tensor on cuda:1 gets cuda:1's card's table, and
    a device without an index the current device's: the table is chosen per device index, not
    once for the machine."""
    names = {0: "NVIDIA Fake", 1: "NVIDIA Other"}
    monkeypatch.setattr(tuning, "_card_name", lambda index: names[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for index, warps in ((0, 8), (1, 16)):
        ops = {"rmsnorm_fwd": {"hidden=64": {"warps": warps}}}
        tuning.table_path(names[index], tmp_path).write_text(
            json.dumps({"card": names[index], "ops": ops})
        )
    tuning._card_table_path.cache_clear()
    tuning.load_table.cache_clear()
    try:
        got = [
            tuning.lookup("rmsnorm_fwd", "hidden=64", torch.device(d), tmp_path)
            for d in ("cuda:0", "cuda:1", "cuda")
        ]
    finally:
        tuning._card_table_path.cache_clear()
        tuning.load_table.cache_clear()
    assert got == [{"warps": 8}, {"warps": 16}, {"warps": 16}]


# ---------------------------------------------------------------- swiglu grid limits


def test_swiglu_grid_limits_at_their_boundaries():
    """The flat layout needs every element offset below 2^31 (an offset of exactly 2^31 wraps in
    int32), column strides counted; the 1-D grid takes at most 2^31 - 1 programs. At each
    boundary the launch takes the 2-D grid. Meta tensors: only shapes and strides are read."""
    from kernels.swiglu import Config, _launch

    def t(shape, strides):
        return torch.empty_strided(shape, strides, device="meta")

    flat, linear = Config(1024, 4, flat=True), Config(1024, 4, linear=True)
    small = (t((2, 100), (100, 1)),)
    assert _launch(2, 100, flat, small)[1]["FLAT_FFN"] == 100
    # the last element of the view sits exactly at 2^31: (2 - 1) * (2^31 - 99) + 99
    at_2_31 = (t((2, 100), (2**31 - 99, 1)),)
    assert _launch(2, 100, flat, at_2_31)[0] == (2, 1)
    # columns 2^25 apart: the last row starts at 1, its last column at 1 + 99 * 2^25 > 2^31
    col_strided = (t((2, 100), (1, 2**25)),)
    assert _launch(2, 100, flat, col_strided)[0] == (2, 1)
    # 2^31 programs on the 1-D grid is one too many
    assert _launch(2**30, 2048, linear, small)[0] == (2**30, 2)
    assert _launch(2**30 - 1, 2048, linear, small)[0] == (2**31 - 2,)


# ---------------------------------------------------------------- attention grids


@pytest.mark.skipif(not INTERPRET, reason="sets the interpreter's fixed launch settings")
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_attention_grids_follow_their_own_block(monkeypatch, kind):
    """Each kernel's grid counts the blocks its programs walk: queries (BLOCK_M) for the forward
    and dq, keys (BLOCK_N) for dK/dV. Every setting in use has BLOCK_M <= BLOCK_N for dK/dV and
    >= for dq, where a grid counted in the other block only adds idle programs; with the tiles
    the other way round (set here for the interpreter) a grid counted in the wrong block is
    short, and the last tokens get no output or gradient."""
    import kernels.attention as att_mod
    from kernels import reference

    block_m, block_n = (64, 32) if kind == "dkdv" else (32, 64)
    monkeypatch.setitem(att_mod._INTERPRET_CONFIG, kind, (block_m, block_n, 4, 1))
    g = torch.Generator().manual_seed(11)
    q = torch.randn(70, 2, 16, generator=g).requires_grad_()
    k = torch.randn(70, 1, 16, generator=g).requires_grad_()
    v = torch.randn(70, 1, 16, generator=g).requires_grad_()
    cu = torch.tensor([0, 70], dtype=torch.int32)
    do = torch.randn(70, 2, 16, generator=g)
    grads = []
    for fn in (att_mod.attention, reference.attention):
        out = fn(q, k, v, cu, 70, 0.25)
        grads.append((out.detach(), *torch.autograd.grad(out, (q, k, v), do)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_attention_sequence_buckets_and_fixed_settings(monkeypatch):
    """The longest document picks the launch settings through its power-of-two bucket (64 up to
    16384): buckets below 2048 take each kind's first candidate for its head-dim class, longer
    ones autotune (None), per bucket. A constant bucket would keep every length on the short
    settings and autotune once for all lengths."""
    import kernels.attention as att_mod

    assert [att_mod._bucket(n) for n in (0, 1, 64, 65, 2000, 2048, 5000, 10**6)] == [
        64, 64, 64, 128, 2048, 2048, 8192, 16384,
    ]  # fmt: skip
    monkeypatch.setattr(att_mod, "INTERPRET", False)
    for kind in ("fwd", "dq", "dkdv"):
        for dclass in (64, 128):
            assert att_mod._fixed_spec(kind, dclass, 1024) == att_mod._CANDIDATES[kind][dclass][0]
            assert att_mod._fixed_spec(kind, dclass, 2048) is None
