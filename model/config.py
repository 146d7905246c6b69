"""Model configuration: one dataclass and the named presets."""

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Llama-2 architecture. Sizes are global (before tensor parallelism)."""

    name: str = "custom"  # preset name or "custom" / "hf:<path>"
    vocab_size: int = 32007  # tokenizer vocabulary (base + Megatron specials + extra ids), unpadded
    hidden_size: int = 4096  # model width
    ffn_hidden_size: int = 11008  # SwiGLU inner width
    num_layers: int = 32  # transformer blocks
    num_attention_heads: int = 32  # query heads
    num_kv_heads: int = 32  # key/value heads (GQA when fewer than query heads)
    max_position_embeddings: int = 4096  # longest sequence the rotary tables are meant for
    rope_theta: float = 10000.0  # rotary base
    rope_scaling_factor: float = 1.0  # linear position interpolation: positions / factor
    norm_eps: float = 1e-5  # RMSNorm epsilon (the seed's --layernorm_epsilon)
    hidden_dropout: float = 0.0  # on the residual branches (the last layer's with LIMA), embeddings
    attention_dropout: float = 0.0  # must be 0: flash attention has no dropout
    lima_dropout: bool = False  # layer i of L gets hidden_dropout * i / (L - 1); 0 when L = 1
    init_std: float = 0.02  # normal init std; output projections get std / sqrt(2 * layers)
    make_vocab_size_divisible_by: int = 128  # embedding rows padded to a multiple of this x TP

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding/head rows: vocab rounded up to make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def layer_dropout(self, layer: int) -> float:
        """Hidden dropout of layer `layer` (0-based); LIMA ramps it from 0 to hidden_dropout."""
        if not self.lima_dropout:
            return self.hidden_dropout
        if self.num_layers == 1:
            # Megatron-LLM takes torch.linspace(0, hidden_dropout, num_layers)[layer], and a
            # one-point linspace is its start: the single layer is the bottom one, rate 0.
            return 0.0
        return self.hidden_dropout * layer / (self.num_layers - 1)

    def validate(self, tp: int = 1) -> None:
        """Raise ValueError naming the field (and the trainer's flag) when the architecture is
        inconsistent or cannot be split over `tp` tensor-parallel ranks."""
        problems = []
        # Sizes the checks below divide by: a 0 would raise ZeroDivisionError instead.
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_kv_heads"):  # fmt: skip
            if getattr(self, f) < 1:
                problems.append(f"{f} {getattr(self, f)} ({_FLAG[f]}) must be >= 1")
        if tp < 1:
            problems.append(f"tensor parallel size {tp} ({_TP_FLAG}) must be >= 1")
        if problems:
            raise ValueError("invalid model configuration: " + "; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} (--hidden_size) is not divisible by "
                f"num_attention_heads {self.num_attention_heads} (--num_attention_heads)"
            )
        elif self.head_dim % 2:  # only meaningful when head_dim is hidden / heads exactly
            problems.append(
                f"head_dim {self.head_dim} (hidden_size / num_attention_heads) must be even for "
                "rotary embeddings"
            )
        if self.num_attention_heads % self.num_kv_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} (--num_attention_heads) is not a "
                f"multiple of num_kv_heads {self.num_kv_heads} (--num_attention_heads_kv)"
            )
        if self.num_attention_heads % tp or self.num_kv_heads % tp:
            problems.append(
                f"tensor parallel size {tp} ({_TP_FLAG}) must divide num_attention_heads "
                f"({self.num_attention_heads}) and num_kv_heads ({self.num_kv_heads})"
            )
        if self.ffn_hidden_size % tp:
            problems.append(
                f"tensor parallel size {tp} ({_TP_FLAG}) must divide ffn_hidden_size "
                f"{self.ffn_hidden_size} (--ffn_hidden_size)"
            )
        if self.attention_dropout != 0.0:
            problems.append(
                f"attention_dropout={self.attention_dropout}: the flash-attention path has no "
                "dropout; use 0.0 (as the seed does)"
            )
        if not 0.0 <= self.hidden_dropout < 1.0:
            problems.append(f"hidden_dropout={self.hidden_dropout} must be in [0, 1)")
        if problems:
            raise ValueError("invalid model configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def param_shapes(self, padded_vocab: int | None = None) -> dict[str, tuple[int, ...]]:
        """Global (TP=PP=1) parameter names and shapes of `Llama(self, padded_vocab)`, in the
        order of `named_parameters()`, computed without allocating anything."""
        v = padded_vocab if padded_vocab is not None else self.padded_vocab_size()
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_kv_heads) * hd
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, h)}
        for i in range(self.num_layers):
            shapes[f"layers.{i}.attention_norm.weight"] = (h,)
            shapes[f"layers.{i}.attention.wqkv.weight"] = (qkv, h)
            shapes[f"layers.{i}.attention.wo.weight"] = (h, self.num_attention_heads * hd)
            shapes[f"layers.{i}.mlp_norm.weight"] = (h,)
            shapes[f"layers.{i}.mlp.w13.weight"] = (2 * f, h)
            shapes[f"layers.{i}.mlp.w2.weight"] = (h, f)
        shapes["norm.weight"] = (h,)
        shapes["output.weight"] = (v, h)
        return shapes

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], name: str = "hf") -> "ModelConfig":
        """Hugging Face `LlamaConfig` (config.json as a dict) -> ModelConfig.

        `vocab_size` is taken as written; an exported checkpoint's config carries the *padded*
        row count, so callers that know the tokenizer override it with the tokenizer's size.
        Features our model does not have (tied embeddings, biases, non-SiLU activations,
        non-linear rope scaling, another head_dim) are refused, naming the key.
        """
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(
                f"HF config model_type={model_type!r}: only 'llama' configs are supported"
            )
        problems = []
        if d.get("tie_word_embeddings", False):
            problems.append("tie_word_embeddings=true (Llama-2 has an untied output head)")
        if d.get("attention_bias", False) or d.get("mlp_bias", False):
            problems.append("attention_bias/mlp_bias=true (our projections have no bias)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r} (SwiGLU needs 'silu')")
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim * heads != hidden:
            problems.append(f"head_dim={head_dim} differs from hidden_size / num_attention_heads")
        # Older transformers write rope_theta + rope_scaling; newer ones a rope_parameters dict.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        # A key written as null (some hand-edited configs) means its default, as in LlamaConfig.
        theta = _given(d.get("rope_theta"), rope.get("rope_theta"), 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        factor = 1.0
        if kind == "linear":
            factor = float(rope["factor"])
        elif kind != "default":
            problems.append(f"rope_scaling type {kind!r} (only 'linear' interpolation)")
        if problems:
            raise ValueError("unsupported HF Llama config: " + "; ".join(problems))
        return cls(
            name=name,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(hidden),
            ffn_hidden_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(heads),
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            max_position_embeddings=int(_given(d.get("max_position_embeddings"), 4096)),
            rope_theta=float(theta),
            rope_scaling_factor=factor,
            # A missing key means LlamaConfig's default (1e-6, LLaMA-1's), which transformers
            # would run the model with, not Llama-2's 1e-5.
            norm_eps=float(_given(d.get("rms_norm_eps"), 1e-6)),
            attention_dropout=float(_given(d.get("attention_dropout"), 0.0)),
            init_std=float(_given(d.get("initializer_range"), 0.02)),
        )


# The trainer's flag for each size `validate` checks (train/args.py; Megatron-LLM's names).
_FLAG = {
    "num_layers": "--num_layers",
    "hidden_size": "--hidden_size",
    "ffn_hidden_size": "--ffn_hidden_size",
    "num_attention_heads": "--num_attention_heads",
    "num_kv_heads": "--num_attention_heads_kv",
}
_TP_FLAG = "--tensor_model_parallel_size"


def _given(*values):
    """The first value that is not None (a config key absent or written as null)."""
    return next(v for v in values if v is not None)


PRESETS: dict[str, ModelConfig] = {
    # CPU default: small enough to train in minutes on 2 cores; GQA (8 heads, 2 KV heads) so the
    # grouped path is always exercised.
    "tiny": ModelConfig(
        name="tiny",
        hidden_size=256,
        ffn_hidden_size=688,
        num_layers=4,
        num_attention_heads=8,
        num_kv_heads=2,
        max_position_embeddings=1024,
    ),
    "llama2-7b": ModelConfig(
        name="llama2-7b",
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=32,
        max_position_embeddings=4096,
    ),
    "llama2-13b": ModelConfig(
        name="llama2-13b",
        hidden_size=5120,
        ffn_hidden_size=13824,
        num_layers=40,
        num_attention_heads=40,
        num_kv_heads=40,
        max_position_embeddings=4096,
    ),
    "llama2-70b": ModelConfig(
        name="llama2-70b",
        hidden_size=8192,
        ffn_hidden_size=28672,
        num_layers=80,
        num_attention_heads=64,
        num_kv_heads=8,
        max_position_embeddings=4096,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def param_count(cfg: ModelConfig, padded_vocab: int | None = None) -> int:
    """Parameters of the full (unsharded) model, with the padded vocabulary."""
    total = 0
    for shape in cfg.param_shapes(padded_vocab).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
