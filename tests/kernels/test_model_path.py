"""The model on the Triton kernels equals the model on the references (fp32, interpreter).

Each kernel family has its own tests against its reference; this one checks the wiring in
model/llama.py: the shared cos/sin table passed to rotary, packed documents through attention,
the fused [gate | up] projection through SwiGLU, the norms, and every gradient."""

import pytest
import torch

import kernels.attention
import kernels.rmsnorm
import kernels.rotary
import kernels.swiglu
from kernels._triton import INTERPRET
from model.config import PRESETS
from model.llama import Llama

CFG = PRESETS["tiny"].replace(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                              num_attention_heads=4, num_kv_heads=2, vocab_size=101)  # fmt: skip
FAMILIES = (kernels.attention, kernels.rmsnorm, kernels.rotary, kernels.swiglu)


def _run(model: Llama, tokens, positions, cu_seqlens, max_seqlen):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, cu_seqlens, max_seqlen)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the kernels on CPU")
def test_model_on_kernels_equals_model_on_references(monkeypatch):
    model = Llama(CFG)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    lens = [5, 17, 1, 9]  # packed documents, one of a single token
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (sum(lens),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lens])
    cu_seqlens = torch.tensor([0, *torch.cumsum(torch.tensor(lens), 0).tolist()], dtype=torch.int32)

    got, got_grads = _run(model, tokens, positions, cu_seqlens, max(lens))
    for family in FAMILIES:
        monkeypatch.setattr(family, "use_triton", lambda x: False)
    want, want_grads = _run(model, tokens, positions, cu_seqlens, max(lens))

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
