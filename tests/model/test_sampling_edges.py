"""model.sampling at its edges, on a tiny random model (no checkpoint): the top-p boundary, a
stop id as the first token, the position limit, and padded vocabulary rows."""

import torch

from model.config import ModelConfig
from model.llama import Llama
from model.sampling import SamplingParams, filter_logits, generate

VOCAB = 50


def _model(max_pos: int = 24) -> Llama:
    cfg = ModelConfig(name="t", vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64,
                      num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      max_position_embeddings=max_pos, make_vocab_size_divisible_by=64)  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    assert model.padded_vocab == 64
    return model


def test_top_p_drops_a_token_once_those_above_it_reach_top_p_exactly():
    # probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary): 1/2 + 1/4 reaches 0.75, so the
    # third token goes (transformers' TopP keeps the smallest set with mass >= top_p)
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    kept = filter_logits(logits, SamplingParams(1.0, top_p=0.75)).isfinite()
    assert kept.tolist() == [[False, True, False, True]]


def test_a_stop_id_as_the_first_token_stops_at_once():
    model, prompt = _model(), [3, 7, 11]
    first = generate(model, [prompt], SamplingParams(max_new_tokens=1), set(), VOCAB)[0].tokens[0]
    got = generate(model, [prompt], SamplingParams(max_new_tokens=8), {first}, VOCAB)[0]
    assert got.tokens == [first] and got.stop_reason == "stop"


def test_a_long_prompt_generates_up_to_the_last_position():
    model = _model(max_pos=24)
    got = generate(model, [list(range(1, 23))], SamplingParams(max_new_tokens=8), set(), VOCAB)
    assert len(got[0].tokens) == 24 - 22 and got[0].stop_reason == "length"


class _PaddingWins(torch.nn.Module):
    """The output head with the padded vocabulary rows' logits far above every real one."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        y[..., VOCAB:] = 100.0
        return y


def test_padded_vocabulary_rows_are_never_generated():
    model = _model()
    model.output = _PaddingWins(model.output)
    prompts = [[3, 7, 11], [5]]
    for params in (SamplingParams(max_new_tokens=6), SamplingParams(1.0, max_new_tokens=6)):
        gen = torch.Generator().manual_seed(0)
        for c in generate(model, prompts, params, set(), VOCAB, generator=gen):
            assert len(c.tokens) == 6 and max(c.tokens) < VOCAB, c.tokens


def test_cached_attention_groups_query_heads_over_their_kv_head():
    """_attend (the KV-cache path) against the explicit softmax with repeated KV heads: 8 query
    heads over 2 KV heads, a prefill of 5 queries, rows whose visible keys differ (padding)."""
    from model.sampling import _attend

    gen = torch.Generator().manual_seed(3)
    b, t, s, nh, nkv, hd = 3, 5, 7, 8, 2, 16
    q = torch.randn(b, t, nh, hd, generator=gen)
    k, v = (torch.randn(b, s, nkv, hd, generator=gen) for _ in range(2))
    mask = torch.rand(b, t, s, generator=gen) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    kr, vr = (x.repeat_interleave(nh // nkv, dim=2) for x in (k, v))  # head h -> KV head h // 4
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / hd**0.5
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    want = torch.einsum("bhts,bshd->bthd", probs, vr).reshape(b, t, nh * hd)
    torch.testing.assert_close(_attend(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
