"""The model: packing, GQA, LIMA dropout, recompute, config helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import PRESETS, ModelConfig, param_count
from model.llama import Llama

CFG = PRESETS["tiny"].replace(num_layers=3, hidden_size=96, ffn_hidden_size=200,
                              num_attention_heads=6, num_kv_heads=2, vocab_size=101)  # fmt: skip


def _model(cfg=CFG, seed=0):
    m = Llama(cfg)
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.eval()


def test_packed_batch_equals_each_document_alone():
    model = _model()
    g = torch.Generator().manual_seed(1)
    lengths = [7, 19, 1, 13]
    docs = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.cat(docs)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(tokens, positions, cu, max(lengths))
        for i, d in enumerate(docs):
            alone = model(
                d, torch.arange(len(d)), torch.tensor([0, len(d)], dtype=torch.int32), len(d)
            )
            torch.testing.assert_close(packed[cu[i] : cu[i + 1]], alone, rtol=1e-5, atol=1e-5)
    # (batch, seq) input with two rows, flattened by the model, is the same computation
    with torch.no_grad():
        rows = tokens[:40].view(2, 20)
        pos = torch.cat([torch.arange(20), torch.arange(20)]).view(2, 20)
        out = model(rows, pos, torch.tensor([0, 20, 40], dtype=torch.int32), 20)
        first = model(rows[0], torch.arange(20), torch.tensor([0, 20], dtype=torch.int32), 20)
    torch.testing.assert_close(out[:20], first, rtol=1e-5, atol=1e-5)


def test_gqa_attention_equals_mha_with_repeated_kv_heads():
    model = _model()
    att = model.layers["0"].attention
    hd, nh, nkv = CFG.head_dim, CFG.num_attention_heads, CFG.num_kv_heads
    T = 23
    torch.manual_seed(0)
    x = torch.randn(T, CFG.hidden_size)
    pos = torch.arange(T)
    cu = torch.tensor([0, T], dtype=torch.int32)
    with torch.no_grad():
        ours = att(x, pos, cu, T)
        qkv = att.wqkv(x)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd)
        # rotary by hand (half-split layout), then plain causal MHA with each KV head repeated
        inv = 1.0 / (CFG.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        ang = pos[:, None].float() * inv[None]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]

        def rot(t):
            a, b = t.chunk(2, dim=-1)
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

        q, k = rot(q), rot(k)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)  # query head h uses KV head h // rep
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, nh * hd)
        want = att.wo(out)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_rope_scaling_divides_positions():
    cfg = CFG.replace(rope_scaling_factor=4.0)
    a, b = _model(cfg), _model(CFG)
    t = torch.randint(0, CFG.vocab_size, (12,))
    cu = torch.tensor([0, 12], dtype=torch.int32)
    with torch.no_grad():
        scaled = a(t, torch.arange(12) * 4, cu, 12)
        plain = b(t, torch.arange(12), cu, 12)
    torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-4)


def test_layers_share_one_rope_table():
    """Every layer passes the same cos/sin table, one row per position up to
    max_position_embeddings (the trainer and the generator never go past it)."""
    m = _model()
    tables = {id(b.attention.rope_table(torch.device("cpu"))) for b in m.layers.values()}
    assert len(tables) == 1
    table = next(iter(m.layers.values())).attention.rope_table(torch.device("cpu"))
    assert table.shape == (CFG.max_position_embeddings, CFG.head_dim)


def test_positions_reach_the_last_table_row_and_no_further():
    """A sequence of max_position_embeddings tokens uses the table's last row; one position more
    is refused on the CPU as the kernel would read past the table. (Rotary is relative: a
    constant shift of every position leaves the output unchanged, so only the table's end shows
    an off-by-one.)"""
    cfg = CFG.replace(max_position_embeddings=24)
    m = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 24], dtype=torch.int32)
    with torch.no_grad():
        assert torch.isfinite(m(tokens, torch.arange(24), cu, 24)).all()
        with pytest.raises(ValueError, match=r"index 24 is out of bounds .* table has 24 rows"):
            m(tokens, torch.arange(24) + 1, cu, 24)


def test_lima_dropout_probabilities():
    cfg = CFG.replace(num_layers=5, hidden_dropout=0.25, lima_dropout=True)
    assert [cfg.layer_dropout(i) for i in range(5)] == [0.0, 0.0625, 0.125, 0.1875, 0.25]
    model = Llama(cfg)
    assert [model.layers[str(i)].dropout.p for i in range(5)] == [0.0, 0.0625, 0.125, 0.1875, 0.25]
    flat = CFG.replace(num_layers=5, hidden_dropout=0.25)
    assert [flat.layer_dropout(i) for i in range(5)] == [0.25] * 5
    # one layer: Megatron-LLM's torch.linspace(0, p, 1) is [0.0] (the bottom layer's rate)
    assert CFG.replace(num_layers=1, hidden_dropout=0.3, lima_dropout=True).layer_dropout(0) == 0.0


@pytest.mark.parametrize("lima", [True, False])
def test_embedding_output_gets_the_hidden_dropout(lima):
    """Megatron-LLM's embedding layer takes --hidden_dropout whatever --lima_dropout says (the
    seed's stage 2 dropped embeddings at 0.25); before, the embedding had no dropout."""
    cfg = CFG.replace(hidden_dropout=0.5, lima_dropout=lima)
    model = _model(cfg).train()
    seen = {}
    model.embed_dropout.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    t = torch.randint(0, cfg.vocab_size, (1, 64))
    model(t, torch.arange(64)[None], torch.tensor([0, 64], dtype=torch.int32), 64)
    dropped = seen["out"] == 0
    assert 0.4 < dropped.float().mean() < 0.6  # p = 0.5 of the (64, hidden) values
    torch.testing.assert_close(seen["out"][~dropped], 2 * seen["inp"][~dropped])
    model.eval()
    out = model.embed_dropout(seen["inp"])
    assert torch.equal(out, seen["inp"])
    assert isinstance(_model(CFG).embed_dropout, torch.nn.Identity)  # no dropout: no RNG draw


@pytest.mark.parametrize("granularity,method", [("selective", "uniform"), ("full", "uniform"),
                                                ("full", "block")])  # fmt: skip
def test_recompute_gives_the_same_gradients(granularity, method):
    cfg = CFG.replace(hidden_dropout=0.2, lima_dropout=True)
    t = torch.randint(0, cfg.vocab_size, (2, 16))
    pos = torch.arange(16).repeat(2, 1)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    grads = []
    for mode in ("none", granularity):
        m = _model(cfg).train()
        m.set_recompute(mode, method, num_layers=2)
        torch.manual_seed(5)
        F.cross_entropy(m(t, pos, cu, 16), t.reshape(-1)).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_activation_report_orders_the_modes():
    from train.memory import activation_report

    cfg = CFG.replace(hidden_dropout=0.3)
    model = _model(cfg).train()
    before = torch.get_rng_state()
    rep = activation_report(model, 64, "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is left as it was
    assert rep["full"] < rep["selective"] < rep["none"]
    # full recompute keeps only the block input: hidden fp32 values per token
    assert rep["full"] == pytest.approx(CFG.hidden_size * 4, rel=0.05)


def test_param_shapes_and_count_match_the_module():
    for name in ("tiny", "llama2-7b"):
        cfg = PRESETS[name]
        if name == "tiny":
            m = Llama(cfg)
            assert {n: tuple(p.shape) for n, p in m.named_parameters()} == cfg.param_shapes()
            assert param_count(cfg) == sum(p.numel() for p in m.parameters())
    # Llama-2-7B with the 32000-piece vocabulary: 6,738,415,616 parameters (Meta's count)
    assert param_count(PRESETS["llama2-7b"].replace(vocab_size=32000)) == 6_738_415_616


def test_from_hf_config():
    d = {"model_type": "llama", "vocab_size": 32128, "hidden_size": 8192,
         "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
         "num_key_value_heads": 8, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
         "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02}  # fmt: skip
    cfg = ModelConfig.from_hf_config(d)
    seventy = PRESETS["llama2-70b"]
    for f in (
        "hidden_size",
        "ffn_hidden_size",
        "num_layers",
        "num_attention_heads",
        "num_kv_heads",
    ):
        assert getattr(cfg, f) == getattr(seventy, f)
    assert cfg.rope_scaling_factor == 2.0 and cfg.vocab_size == 32128
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ModelConfig.from_hf_config(dict(d, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        ModelConfig.from_hf_config(dict(d, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="model_type='mistral'"):
        ModelConfig.from_hf_config(dict(d, model_type="mistral"))


def test_norm_eps_from_the_config_reaches_every_norm():
    """`norm_eps` (the seed's --layernorm_epsilon, HF's rms_norm_eps) is what the norms use, not
    the kernel's default 1e-5: a 70B import with 1e-6 must not silently train at 1e-5. A large
    eps on the final norm makes the difference plain against the formula computed here."""
    cfg = CFG.replace(norm_eps=0.25)
    m = _model(cfg)
    assert {mod.eps for n, mod in m.named_modules() if n.endswith("norm")} == {0.25}
    x = torch.randn(5, CFG.hidden_size) * 0.3
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.25) * m.norm.weight
        torch.testing.assert_close(m.norm(x), want)
