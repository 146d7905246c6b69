"""Llama-2 decoder, readable top to bottom.

The model works on *flattened tokens*: a micro-batch (batch, seq) becomes (tokens, hidden) with
tokens = batch * seq, and documents are delimited by `cu_seqlens` (packed or padded rows alike).
That layout is what varlen flash attention wants, and it is also what sequence parallelism
splits (the token dimension), so the parallel layers can be swapped in by `parallel/` without
this file knowing: it holds no parallel logic. Linear layers are `kernels.linear.Linear` here
(`nn.Linear` whose weight gradient can go straight into an fp32 buffer, see kernels/linear.py);
`parallel.parallelize` replaces them with column/row-parallel ones and updates the per-module
head counts (`n_heads`, `n_kv_heads`) to the local ones.

Fused projections and their layouts (what HF import/export and TP sharding rely on):
  attention.wqkv.weight: ((heads + 2 * kv_heads) * head_dim, hidden), rows [q | k | v]
  mlp.w13.weight:        (2 * ffn, hidden), rows [gate | up]

A model instance may own only a slice of the layers (pipeline stages): `layers` is a ModuleDict
keyed by the *global* layer index, so parameter names are the same at any pipeline size.
"""

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels.attention import attention
from kernels.linear import Linear
from kernels.rmsnorm import rmsnorm
from kernels.rotary import cos_sin_table, rotary
from kernels.swiglu import swiglu
from model.config import ModelConfig

RECOMPUTE_MODES = ("none", "selective", "full")


def _maybe_recompute(enabled: bool, fn: Callable, *args):
    # Non-reentrant checkpoint: works with inputs that do not require grad and keeps RNG state, so
    # a recomputed dropout draws the same mask.
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@torch.no_grad()
def init_parameter(
    cfg: ModelConfig, name: str, t: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Initialise the (full, global) parameter `name` in place, the rule of `Llama.init_weights`;
    called in named_parameters() order with one generator, it reproduces init_weights' draws."""
    if name.endswith("norm.weight"):
        t.fill_(1.0)
    elif name.endswith(("wo.weight", "w2.weight")):
        t.normal_(0.0, cfg.init_std / math.sqrt(2.0 * cfg.num_layers), generator=generator)
    else:
        t.normal_(0.0, cfg.init_std, generator=generator)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads  # local after tensor parallelism
        self.n_kv_heads = cfg.num_kv_heads  # local after tensor parallelism
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.rope_scaling_factor = cfg.rope_scaling_factor
        # Positions never reach this (the trainer checks seq_length, generation stops there), so
        # one cos/sin table of this many rows serves every call (kernels/rotary.py).
        self.max_positions = cfg.max_position_embeddings
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.wqkv = Linear(cfg.hidden_size, qkv_out)
        self.wo = Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
        self.recompute_core = False  # selective recompute of rotary + attention

    def core(
        self, qkv: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ):
        """qkv: (tokens, (heads + 2 kv_heads) * head_dim) -> (tokens, heads * head_dim)."""
        hd = self.head_dim
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(-1, self.n_heads, hd)  # (T, nh, hd)
        k = k.view(-1, self.n_kv_heads, hd)  # (T, nkv, hd)
        v = v.view(-1, self.n_kv_heads, hd)  # (T, nkv, hd)
        q, k = rotary(
            q,
            k,
            positions,
            self.rope_theta,
            self.rope_scaling_factor,
            cos_sin=self.rope_table(q.device),
        )
        out = attention(q, k, v, cu_seqlens, max_seqlen)  # (T, nh, hd)
        return out.reshape(out.shape[0], self.n_heads * hd)

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """The fp32 [cos | sin] table of positions 0..max_positions-1, shared with every layer of
        the same settings on `device`."""
        return cos_sin_table(
            self.max_positions, self.head_dim, self.rope_theta, self.rope_scaling_factor, device
        )

    def forward(self, x, positions, cu_seqlens, max_seqlen):
        qkv = self.wqkv(x)
        out = _maybe_recompute(
            self.recompute_core, self.core, qkv, positions, cu_seqlens, max_seqlen
        )
        return self.wo(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size)  # [gate | up]
        self.w2 = Linear(cfg.ffn_hidden_size, cfg.hidden_size)
        self.recompute_act = False  # selective recompute of the SwiGLU product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _maybe_recompute(self.recompute_act, swiglu, self.w13(x))  # (T, ffn)
        return self.w2(act)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # Hidden dropout on both residual branches (LIMA: rate grows with depth).
        self.dropout = nn.Dropout(cfg.layer_dropout(layer_id))
        self.recompute_norms = False

    def forward(self, h, positions, cu_seqlens, max_seqlen):
        x = _maybe_recompute(self.recompute_norms, self.attention_norm, h)
        h = h + self.dropout(self.attention(x, positions, cu_seqlens, max_seqlen))
        x = _maybe_recompute(self.recompute_norms, self.mlp_norm, h)
        return h + self.dropout(self.mlp(x))


class Llama(nn.Module):
    """The decoder, or one pipeline stage of it.

    layer_ids: the global layer indices this instance owns (default: all);
    pre: owns the embedding; post: owns the final norm and the output head.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        padded_vocab: int | None = None,
        layer_ids: range | None = None,
        pre: bool = True,
        post: bool = True,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.padded_vocab = padded_vocab if padded_vocab is not None else cfg.padded_vocab_size()
        if self.padded_vocab < cfg.vocab_size:
            raise ValueError(
                f"padded_vocab {self.padded_vocab} is below the model's vocab_size "
                f"{cfg.vocab_size}: the embedding and output head need a row per token id"
            )
        layer_ids = layer_ids if layer_ids is not None else range(cfg.num_layers)
        outside = [i for i in layer_ids if not 0 <= i < cfg.num_layers]
        if outside:
            # A stage's ids are global: past the model, LIMA would give rates above the last
            # layer's and the parameter names would match no checkpoint.
            raise ValueError(
                f"layer_ids {list(layer_ids)} include {outside}, outside the model's "
                f"num_layers {cfg.num_layers} (global ids 0..{cfg.num_layers - 1})"
            )
        self.pre, self.post = pre, post
        self.embed = nn.Embedding(self.padded_vocab, cfg.hidden_size) if pre else None
        # The embedding's output gets hidden_dropout whatever --lima_dropout says: Megatron-LLM's
        # embedding layer takes --hidden_dropout, and LIMA's ramp applies to the layers only.
        p = cfg.hidden_dropout if pre else 0.0
        self.embed_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if post else None
        self.output = Linear(cfg.hidden_size, self.padded_vocab) if post else None
        self.recompute_full_layers: set[int] = set()  # global ids of layers recomputed whole

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) for every matrix, std / sqrt(2 L) for the projections into the residual
        stream (wo, w2) as in Megatron; ones for norms. Deterministic given `generator`."""
        for name, p in self.named_parameters():
            init_parameter(self.cfg, name, p, generator)

    def set_recompute(self, granularity: str, method: str = "uniform", num_layers: int = 1) -> None:
        """Megatron's --recompute_granularity/--recompute_method/--recompute_num_layers.

        selective: recompute the cheap, memory-heavy pieces (norm outputs, SwiGLU product,
        rotary + attention core) instead of storing them. full: recompute whole layers; `uniform`
        recomputes every layer (Megatron groups `num_layers` per checkpoint; here each layer is
        its own checkpoint, which stores the same inputs or fewer), `block` the first
        `num_layers` layers of this stage.
        """
        if granularity not in RECOMPUTE_MODES:
            raise ValueError(
                f"recompute granularity {granularity!r}; expected one of {RECOMPUTE_MODES}"
            )
        selective = granularity == "selective"
        for block in self.layers.values():
            block.recompute_norms = selective
            block.attention.recompute_core = selective
            block.mlp.recompute_act = selective
        ids = sorted(int(i) for i in self.layers)
        if granularity != "full":
            self.recompute_full_layers = set()
        elif method == "uniform":
            self.recompute_full_layers = set(ids)
        elif method == "block":
            self.recompute_full_layers = set(ids[:num_layers])
        else:
            raise ValueError(f"recompute method {method!r}; expected 'uniform' or 'block'")

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """x: token ids (batch, seq) or (tokens,) on the first stage, else hidden (tokens, hidden).
        position_ids: same leading shape as the tokens; cu_seqlens: (docs + 1,) int32 over the
        flattened tokens. Returns logits (tokens, padded_vocab) on the last stage, else hidden."""
        positions = position_ids.reshape(-1)
        h = self.embed_dropout(self.embed(x.reshape(-1))) if self.pre else x  # (T, hidden)
        for key, block in self.layers.items():
            full = int(key) in self.recompute_full_layers
            h = _maybe_recompute(full, block, h, positions, cu_seqlens, max_seqlen)
        if not self.post:
            return h
        return self.output(self.norm(h))  # (T, vocab)
