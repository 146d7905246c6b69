"""Decoding: sampling parameters, a KV cache and the cached forward, batched generation, and
loading a checkpoint as one model to decode with. `model.generate` builds its report on these.

The cached decode reuses the model's own modules (embedding, linear layers, norms' weights) and
the kernels' public functions (rmsnorm, rotary, swiglu); only attention is written out here,
against the cache: keys and values of position p of row b sit in slot p of row b, and a query at
position p sees the slots 0..p of its row. A prompt shorter than its batch's longest leaves
garbage in the slots past its end during prefill; each of those slots is overwritten by the
token generated at that position before any query can see it.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.rmsnorm import rmsnorm
from kernels.rotary import rotary
from kernels.swiglu import swiglu
from model.config import ModelConfig
from model.llama import Llama
from train import checkpoint as ckpt


@dataclass(frozen=True)
class SamplingParams:
    """One sampling configuration. temperature 0 means greedy (top_p / top_k unused)."""

    temperature: float = 0.0
    top_p: float = 1.0  # nucleus: smallest set of tokens with probability mass >= top_p
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 256

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        # Name only the values that are wrong: listing every field made a bad top_p read as
        # "temperature 1.0 must be >= 0".
        problems = []
        if not 0 <= self.temperature < float("inf"):  # inf: every token equally likely
            problems.append(f"temperature {self.temperature} must be >= 0 and finite (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k {self.top_k} must be >= 0 (0 = no top-k cut)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens {self.max_new_tokens} must be >= 1")
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))


# Named configurations of Open-Assistant's sampling reports (without repetition penalty).
SAMPLING_PRESETS = {
    "greedy": {"temperature": 0.0},
    "nucleus9": {"temperature": 0.8, "top_p": 0.9},
    "k50": {"temperature": 1.0, "top_k": 50, "top_p": 0.95},
}


@dataclass
class Completion:
    tokens: list[int]
    stop_reason: str  # "stop" (a stop id was generated, kept as the last token) or "length"


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(
    path: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[Llama, dict, Path]:
    """A checkpoint (save dir or iteration dir, any TP/PP layout) as one full `Llama` on
    `device`, tensor by tensor (the model is never materialised in fp32 first)."""
    iter_dir = ckpt.resolve_iteration_dir(path)
    meta = ckpt.read_meta(iter_dir)
    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    index = ckpt.ShardIndex(iter_dir, optimizer=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = ckpt.read_param(index, name, meta, model.padded_vocab, dtype=dtype)
            if t.shape != p.shape:  # a tensor file swapped in from another model
                files = sorted({str(e.file) for e in index.entries[("model", name)]})
                raise ckpt.CheckpointError(
                    f"{', '.join(files[:2])}: {name} has shape {tuple(t.shape)} here, where "
                    f"{iter_dir / ckpt.META_FILE}'s model config gives {tuple(p.shape)}: the "
                    f"file is from another model; restore it, or {ckpt.another_iteration(iter_dir)}"
                )
            p.copy_(t)
    return model.eval(), meta, iter_dir


# ----------------------------------------------------------------------------------------------
# Cached forward


class KVCache:
    """Per-layer keys and values, (batch, max_len, kv_heads, head_dim) each."""

    def __init__(self, model: Llama, batch: int, max_len: int, dtype: torch.dtype, device):
        cfg = model.cfg
        shape = (len(model.layers), batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: (B, T, heads, hd); k, v: (B, S, kv_heads, hd); mask: (B, T, S) True where visible.
    Returns (B, T, heads * hd). fp32 scores and softmax, as the reference attention; query head h
    reads KV head h // (heads / kv_heads). Through torch's SDPA, whose memory-efficient backend
    (fp32 and an arbitrary mask on CUDA) need not hold the (B, heads, T, S) scores that a prefill
    of long prompts would otherwise materialise (64 heads x 4k^2 x 4 B = 4 GiB per prompt and
    layer). GQA without repeating the KV heads (nor `enable_gqa`, which not every backend
    takes): a KV head's group of query heads is one longer query sequence over its keys, so the
    cache is read once per step, not heads / kv_heads times."""
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    rep = nh // nkv
    # (B, T, kv, rep, hd) -> (B, kv, rep * T, hd): query rows ordered (group member, position)
    qg = q.float().view(b, t, nkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(b, nkv, rep * t, hd)
    visible = mask[:, None, None].expand(b, 1, rep, t, mask.shape[-1])
    out = F.scaled_dot_product_attention(
        qg,
        k.float().transpose(1, 2),  # (B, kv, S, hd)
        v.float().transpose(1, 2),
        attn_mask=visible.reshape(b, 1, rep * t, mask.shape[-1]),
    )  # (B, kv, rep * T, hd)
    out = out.view(b, nkv, rep, t, hd).permute(0, 3, 1, 2, 4)  # (B, T, kv, rep, hd)
    return out.reshape(b, t, nh * hd).to(q.dtype)


def forward_cached(
    model: Llama,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """tokens, positions: (B, T). Writes the new keys/values at their positions and returns
    logits (B, padded_vocab) at column `last` of each row (B,), or (B, T, padded_vocab)."""
    b, t = tokens.shape
    cfg = model.cfg
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    seen = int(positions.max()) + 1  # slots any query of this call can see
    mask = torch.arange(seen, device=tokens.device)[None, None, :] <= positions[:, :, None]
    rows = torch.arange(b, device=tokens.device)[:, None].expand(b, t)
    flat_pos = positions.reshape(-1)
    h = model.embed(tokens)  # (B, T, hidden)
    for li, block in enumerate(model.layers.values()):
        attn = block.attention
        x = rmsnorm(h, block.attention_norm.weight, block.attention_norm.eps)
        q, k, v = attn.wqkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k = rotary(
            q.reshape(b * t, nh, hd),
            k.reshape(b * t, nkv, hd),
            flat_pos,
            attn.rope_theta,
            attn.rope_scaling_factor,
            cos_sin=attn.rope_table(flat_pos.device),
        )
        cache.k[li][rows, positions] = k.view(b, t, nkv, hd)
        cache.v[li][rows, positions] = v.reshape(b, t, nkv, hd)
        out = _attend(q.view(b, t, nh, hd), cache.k[li][:, :seen], cache.v[li][:, :seen], mask)
        h = h + attn.wo(out)
        x = rmsnorm(h, block.mlp_norm.weight, block.mlp_norm.eps)
        h = h + block.mlp.w2(swiglu(block.mlp.w13(x)))
    if last is not None:
        h = h[torch.arange(b, device=h.device), last]  # (B, hidden)
    return model.output(rmsnorm(h, model.norm.weight, model.norm.eps))


# ----------------------------------------------------------------------------------------------
# Sampling


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: (B, vocab) -> fp32 logits to sample from: temperature, then top-k, then top-p
    (nucleus), with -inf on the tokens cut; the order and definitions of transformers'
    Temperature/TopK/TopPLogitsWarper. Not for greedy params."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits: (B, vocab) -> next ids (B,)."""
    if params.greedy:
        return logits.float().argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_prompt_lengths(
    prompts: list[list[int]], max_pos: int, names: list[str] | None = None
) -> None:
    """Every prompt must leave room for one new token within max_position_embeddings (the
    rotary table and the cache end there). `names` say where each prompt came from."""
    for i, p in enumerate(prompts):
        if not 0 < len(p) < max_pos:
            name = names[i] if names is not None else f"prompt {i}"
            raise ValueError(
                f"{name} has {len(p)} tokens; a prompt must have between 1 and "
                f"max_position_embeddings - 1 = {max_pos - 1} (shorten it or leave it out)"
            )


@torch.no_grad()
def generate_batch(
    model: Llama,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: set[int],
    vocab_size: int,
    generators: list[torch.Generator] | None = None,
) -> list[Completion]:
    """One batch: prefill all prompts (padded to the longest), then one decode step per token.
    A row stops at a stop id (kept) or after max_new_tokens / at max_position_embeddings.
    generators: one per row, for sampled params (None: torch's default generator)."""
    device = model.embed.weight.device
    max_pos = model.cfg.max_position_embeddings
    check_prompt_lengths(prompts, max_pos)
    lens = [len(p) for p in prompts]
    limits = [min(params.max_new_tokens, max_pos - n) for n in lens]
    b, longest = len(prompts), max(lens)
    cache = KVCache(
        model, b, max(n + m for n, m in zip(lens, limits)), model.embed.weight.dtype, device
    )
    tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    positions = torch.arange(longest, device=device).expand(b, longest)
    lens_t = torch.tensor(lens, device=device)
    logits = forward_cached(model, tokens, positions, cache, last=lens_t - 1)
    outs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * b
    for step in range(max(limits)):
        # Padded vocabulary rows are not tokens: sample among the real ones only.
        if params.greedy or generators is None:
            nxt = sample_next(logits[:, :vocab_size], params)
        else:
            probs = filter_logits(logits[:, :vocab_size], params).softmax(dim=-1)
            nxt = torch.cat(
                [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
            )
        for i, tok in enumerate(nxt.tolist()):
            if reasons[i] is not None:
                continue
            outs[i].append(tok)
            if tok in stop_ids:
                reasons[i] = "stop"
            elif len(outs[i]) >= limits[i]:
                reasons[i] = "length"
        if all(r is not None for r in reasons):
            break
        # Finished rows keep decoding (their output is ignored) at a clamped, in-range slot.
        pos = (lens_t + step).clamp(max=cache.max_len - 1)[:, None]
        logits = forward_cached(model, nxt[:, None], pos, cache, last=torch.zeros_like(lens_t))
    return [Completion(o, r) for o, r in zip(outs, reasons)]


def generate(
    model: Llama,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: set[int],
    vocab_size: int,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
) -> list[Completion]:
    """Completions of all prompts, in their order; batches group prompts of similar length.
    Sampled completions depend on `generator`'s state and each prompt's place in `prompts`,
    not on `batch_size` or on which prompts share a batch."""
    params.validate()
    # Checked here, over the caller's indices: inside a batch (sorted by length) the index of
    # an overlong prompt is its place in that batch, which named the wrong prompt.
    check_prompt_lengths(prompts, model.cfg.max_position_embeddings)
    gens = None
    if not params.greedy:
        # One generator per prompt, seeded in the caller's order. One multinomial over the
        # batch drew every row from a shared stream, so --batch_size (a speed setting) and the
        # other prompts of a batch changed a prompt's samples.
        device = model.embed.weight.device
        seeds = torch.randint(
            2**62,
            (len(prompts),),
            generator=generator,
            device=generator.device if generator is not None else "cpu",
        ).tolist()
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = generate_batch(
            model,
            [prompts[i] for i in idx],
            params,
            stop_ids,
            vocab_size,
            [gens[i] for i in idx] if gens is not None else None,
        )
        for i, c in zip(idx, batch):
            results[i] = c
    return results
