"""Sampling report: continuations of a prompt file, batched, with a KV cache.

    python -m model.generate --load CKPT --prompts FILE --out REPORT.json
        [--sampling greedy nucleus9 k50 custom] [--temperature T --top_p P --top_k K]
        [--max_new_tokens N] [--num_samples N] [--system TEXT | --system_preset llama2]

Prompts are rendered with ChatML (`data.chat.render_prompt`, ending in `<|im_start|>assistant\\n`)
and generation stops at `<|im_end|>` (or EOS). The report has the shape of Open-Assistant's sampling
reports (model_name, date, args, prompts[].results[].outputs), which their viewer reads, plus the
checkpoint, tokenizer and per-output token counts and stop reasons.

The cached decode reuses the model's own modules (embedding, linear layers, norms' weights) and
the kernels' public functions (rmsnorm, rotary, swiglu); only attention is written out here,
against the cache: keys and values of position p of row b sit in slot p of row b, and a query at
position p sees the slots 0..p of its row. A prompt shorter than its batch's longest leaves
garbage in the slots past its end during prefill; each of those slots is overwritten by the
token generated at that position before any query can see it.
"""

import argparse
import codecs
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from data.chat import Conversation, render_prompt
from data.tokenizer import Tokenizer
from kernels.rmsnorm import rmsnorm
from kernels.rotary import rotary
from kernels.swiglu import swiglu
from model.config import ModelConfig
from model.hf_tokenizer import checkpoint_tokenizer
from model.llama import Llama
from train import checkpoint as ckpt

# The system message the model card recommends (Llama-2's official one), verbatim with its
# trailing newline before <|im_end|>.
LLAMA2_SYSTEM_MESSAGE = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information.\n"
)
SYSTEM_PRESETS = {"none": None, "llama2": LLAMA2_SYSTEM_MESSAGE}


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
        if not self.temperature >= 0:
            problems.append(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
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
    index = ckpt.ShardIndex(iter_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ckpt.read_param(index, name, meta, model.padded_vocab, dtype=dtype))
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
    layer). The KV heads are repeated here rather than with `enable_gqa`, which not every
    backend takes."""
    b, t, nh, hd = q.shape
    rep = nh // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2),  # (B, heads, T, hd)
        k.float().transpose(1, 2).repeat_interleave(rep, dim=1),  # (B, heads, S, hd)
        v.float().transpose(1, 2).repeat_interleave(rep, dim=1),
        attn_mask=mask[:, None],  # (B, 1, T, S)
    )  # (B, heads, T, hd)
    return out.transpose(1, 2).reshape(b, t, nh * hd).to(q.dtype)


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


# ----------------------------------------------------------------------------------------------
# Prompt file and report


@dataclass
class Prompt:
    text: str  # what the report shows: the (last) user message
    conversation: Conversation
    messages: list | None  # as given, when the line held a conversation
    where: str = ""  # "file:line", for errors about this prompt


def read_prompts(path: str | Path) -> list[Prompt]:
    """JSONL: each line a JSON string (a user message, as Open-Assistant's prompt lottery files),
    or {"prompt": str} or {"messages": [{"role", "content"}, ...]}, either with an optional
    "system"."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"prompt file {path} {what} (--prompts expects a JSONL file)")
    # A byte-order mark (editors on Windows write one) is not part of the first line's JSON.
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: invalid UTF-8 ({e.reason}); save the file as UTF-8"
        ) from None
    prompts = []
    # JSONL lines end at "\n" only: str.splitlines also splits at U+2028/U+2029/U+0085, which
    # JSON leaves unescaped inside strings (json.dumps(..., ensure_ascii=False) writes them raw).
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        system, messages = None, None
        if isinstance(obj, str):
            turns = [("user", obj)]
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            turns, system = [("user", obj["prompt"])], obj.get("system")
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            messages, system = obj["messages"], obj.get("system")
            try:
                turns = [(m["role"], m["content"]) for m in messages]
            except (KeyError, TypeError):
                raise ValueError(f"{where}: each message needs 'role' and 'content'") from None
        else:
            raise ValueError(
                f'{where}: expected a JSON string, {{"prompt": ...}} or {{"messages": [...]}}'
            )
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string, found {system!r:.60}")
        for k, (role, content) in enumerate(turns):
            # A number would otherwise be rendered as text, or taken as a role id.
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(
                    f"{where}: message {k} needs a string 'role' (system, user, assistant, "
                    f"context) and a string 'content', found {role!r:.30} / {content!r:.30}"
                )
        if system is not None and turns[0][0].strip().lower() == "system":
            # Conversation.from_messages keeps a leading system turn when a system message is
            # given, so both would be rendered, one after the other.
            raise ValueError(f"{where}: both a 'system' key and a leading system message; keep one")
        try:
            conv = Conversation.from_messages(turns, system=system)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        users = [text for role, text in turns if role in ("user", "prompter")]
        prompts.append(Prompt(users[-1] if users else turns[-1][1], conv, messages, where))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def sampling_configs(args: argparse.Namespace) -> dict[str, SamplingParams]:
    custom = {
        k: getattr(args, k)
        for k in ("temperature", "top_p", "top_k")
        if getattr(args, k) is not None
    }
    names = args.sampling or (["custom"] if custom else ["greedy", "nucleus9"])
    if custom and "custom" not in names:
        # They only shape the custom configuration; the presets would silently run without them.
        flags = ", ".join(f"--{k}" for k in custom)
        raise ValueError(
            f"{flags} set the custom sampling configuration, which --sampling "
            f"{' '.join(names)} does not run; add custom to --sampling or leave {flags} out"
        )
    out = {}
    for name in names:
        fields = custom if name == "custom" else SAMPLING_PRESETS[name]
        if name == "custom" and "temperature" not in fields:
            fields = {"temperature": 1.0, **fields}
        out[name] = SamplingParams(**fields, max_new_tokens=args.max_new_tokens)
        out[name].validate()
    return out


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    expected = "expected auto, cpu, cuda or cuda:N"
    try:
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
    except RuntimeError:
        raise ValueError(f"--device {device!r}: {expected}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: {expected}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(
                f"--device {device!r}: this machine has {count} CUDA device(s); use --device cpu "
                "(or auto)"
            )
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def build_report(args: argparse.Namespace) -> dict:
    device, dtype = _device_and_dtype(args.device, args.dtype)
    prompts = read_prompts(args.prompts)  # a bad prompt file fails before the model loads
    model, meta, iter_dir = load_model(args.load, device, dtype)
    tok: Tokenizer = checkpoint_tokenizer(meta, args.tokenizer)
    if args.num_prompts and args.num_prompts < len(prompts):
        keep = sorted(random.Random(args.seed).sample(range(len(prompts)), args.num_prompts))
        prompts = [prompts[i] for i in keep]
    system = args.system if args.system is not None else SYSTEM_PRESETS[args.system_preset]
    ids = []
    for p in prompts:
        conv = p.conversation
        if conv.system is None and system:
            conv = Conversation(turns=conv.turns, system=system)
        ids.append(render_prompt(conv, tok))
    # Before any generation, naming the prompt's line (generate only knows list indices).
    check_prompt_lengths(
        ids, model.cfg.max_position_embeddings, [f"the prompt at {p.where}" for p in prompts]
    )
    configs = sampling_configs(args)
    # <|im_end|> closes a ChatML reply; EOS ends a document for a model that was not fine-tuned
    # on ChatML (an imported Llama-2, whose HF config stops there): nothing after it is a reply.
    stop_ids = {tok.im_end_id, tok.eos_id}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results = [[] for _ in prompts]
    total_new, t0 = 0, time.perf_counter()
    for name, params in configs.items():
        samples = 1 if params.greedy else args.num_samples
        runs = [
            generate(model, ids, params, stop_ids, tok.vocab_size, args.batch_size, generator)
            for _ in range(samples)
        ]
        for i in range(len(prompts)):
            comps = [run[i] for run in runs]
            total_new += sum(len(c.tokens) for c in comps)
            results[i].append(
                {
                    "sampling_config": name,
                    "sampling_params": asdict(params),
                    "outputs": [_decode_output(tok, c) for c in comps],
                    "output_tokens": [len(c.tokens) for c in comps],
                    # the ids themselves (stop id included): a token-by-token comparison with
                    # another runtime (transformers, TGI) needs no re-tokenizing of the text
                    "output_ids": [c.tokens for c in comps],
                    "stop_reasons": [c.stop_reason for c in comps],
                }
            )
    seconds = time.perf_counter() - t0
    cfg = meta["model"]
    return {
        "model_name": cfg.get("name", str(args.load)),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "checkpoint": {"path": str(iter_dir), "iteration": meta.get("iteration")},
        "model": cfg,
        "tokenizer": {k: tok.describe()[k] for k in ("model_path", "fingerprint", "vocab_size")},
        "system_message": system,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "stats": {
            "prompts": len(prompts),
            "generated_tokens": total_new,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(total_new / seconds, 1) if seconds > 0 else None,
        },
        "prompts": [
            {
                "prompt": p.text,
                **({"messages": p.messages} if p.messages is not None else {}),
                "prompt_tokens": len(i),
                "results": r,
            }
            for p, i, r in zip(prompts, ids, results)
        ],
    }


def _decode_output(tok: Tokenizer, c: Completion) -> str:
    # The closing <|im_end|> is the stop signal, not part of the reply.
    tokens = c.tokens[:-1] if c.stop_reason == "stop" else c.tokens
    return tok.decode(tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.generate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--load", required=True, help="checkpoint: save dir (follows latest) or iter dir"
    )
    p.add_argument("--prompts", required=True, help="JSONL prompt file")
    p.add_argument("--out", required=True, help="report JSON to write")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one the checkpoint names)")
    p.add_argument(
        "--sampling",
        nargs="+",
        choices=[*SAMPLING_PRESETS, "custom"],
        help="configurations to run (default: greedy nucleus9; custom when "
        "--temperature/--top_p/--top_k are given, which need custom in an explicit list)",
    )
    p.add_argument("--temperature", type=float, help="custom: softmax temperature (0 = greedy)")
    p.add_argument("--top_p", "--top-p", type=float, help="custom: nucleus mass")
    p.add_argument("--top_k", "--top-k", type=int, help="custom: keep the k most likely")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--num_samples",
        "--num-samples",
        type=int,
        default=1,
        help="outputs per prompt for sampled configurations (greedy runs once)",
    )
    p.add_argument(
        "--num_prompts",
        "--num-prompts",
        type=int,
        help="random subset of this many prompts (seeded), as the seed's 250",
    )
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    sys_group = p.add_mutually_exclusive_group()
    sys_group.add_argument("--system", help="system message for prompts that have none")
    sys_group.add_argument(
        "--system_preset",
        "--system-preset",
        choices=list(SYSTEM_PRESETS),
        default="none",
        help="llama2: the model card's recommended message",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 on GPU, fp32 on CPU",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_samples < 1:
        p.error("--batch_size and --num_samples must be >= 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        p.error("--num_prompts must be >= 1 (leave it out to use every prompt)")
    # Sampling flags are checked here too: build_report would only see them after the model
    # (minutes for a 70B checkpoint) has loaded.
    try:
        sampling_configs(args)
    except ValueError as e:
        p.error(str(e))
    # Checked before the model is loaded and the prompts generated, not when the report is due.
    if Path(args.out).is_dir():
        p.error(f"--out {args.out} is a directory; give the report's file name, e.g. report.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args)
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"model.generate: {msg}", file=sys.stderr)
        return 1
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no half-written report left behind
        print(f"model.generate: cannot write the report --out {out}: {e}", file=sys.stderr)
        return 1
    s = report["stats"]
    print(
        f"wrote {out}: {s['prompts']} prompts, {s['generated_tokens']} tokens in {s['seconds']} s "
        f"({s['tokens_per_second']} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
