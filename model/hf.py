"""Hugging Face Llama interop: import a `transformers` Llama directory as our checkpoint, export
ours as one that `transformers`, TGI and vLLM load.

    python -m model.hf import HF_DIR OUT_DIR [--tp N --pp M] [--vocab_extra_ids_list ...]
        [--tokenizer tokenizer.model] [--dtype auto|fp32|bf16|fp16]
    python -m model.hf export CKPT_DIR HF_OUT [--pad-multiple 128] [--max-shard-size 5GB]
        [--tokenizer tokenizer.model] [--dtype auto|fp32|bf16|fp16]

Name and layout map (ours <- HF, per layer i):
  embed.weight                       <- model.embed_tokens.weight   (rows grown, then padded)
  layers.i.attention_norm.weight     <- model.layers.i.input_layernorm.weight
  layers.i.attention.wqkv.weight     <- cat(q_proj, k_proj, v_proj)   rows [q | k | v]
  layers.i.attention.wo.weight       <- o_proj
  layers.i.mlp_norm.weight           <- post_attention_layernorm.weight
  layers.i.mlp.w13.weight            <- cat(gate_proj, up_proj)       rows [gate | up]
  layers.i.mlp.w2.weight             <- down_proj
  norm.weight                        <- model.norm.weight
  output.weight                      <- lm_head.weight               (rows grown, then padded)
HF's Llama checkpoints already store q/k in the half-split ("rotate_half") rotary layout that
kernels/rotary uses, so no row permutation is applied (tests/hf checks logits against HF's).

Both directions hold at most one layer's tensors in memory: import reads single tensors from the
safetensors shards and hands them to the checkpoint writer one at a time, export reads ours the
same way and streams them into HF shards.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from data.tokenizer import DEFAULT_EXTRA_IDS, Tokenizer
from model.config import ModelConfig
from model.hf_io import HFWeights, SafetensorsStream, _read_json, write_hf_shards
from model.hf_tokenizer import checkpoint_tokenizer, write_tokenizer_files
from train import checkpoint as ckpt

ROTARY_BUFFER_SUFFIX = "rotary_emb.inv_freq"  # a derived buffer older checkpoints also hold
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Configs

# config.json keys a Llama config must have (as integers) and those it may have.
_HF_REQUIRED_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_HF_OPTIONAL_INTS = ("num_key_value_heads", "max_position_embeddings", "head_dim")
_HF_OPTIONAL_NUMBERS = ("rope_theta", "rms_norm_eps", "attention_dropout", "initializer_range")


def read_hf_config(hf_dir: Path) -> dict:
    """`HF_DIR/config.json`, checked for the keys and types `ModelConfig.from_hf_config` reads,
    so that a damaged or foreign config is reported by key, not by a KeyError or TypeError."""
    layout = "config.json, model*.safetensors (+ index), tokenizer.model"
    if not hf_dir.is_dir():
        what = "does not exist" if not hf_dir.exists() else "is not a directory"
        raise ValueError(f"{hf_dir} {what}: expected a Hugging Face Llama directory ({layout})")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{hf_dir}: no config.json; expected a Hugging Face Llama directory ({layout})"
        )
    d = _read_json(path)
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{path}: model_type={model_type!r}; only 'llama' models can be imported")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _HF_REQUIRED_INTS:
        if key not in d:
            raise ValueError(f"{path}: no {key!r}; a Llama config.json has {_HF_REQUIRED_INTS}")
    for key in _HF_REQUIRED_INTS + _HF_OPTIONAL_INTS:
        if d.get(key) is not None and not (is_int(d[key]) and d[key] > 0):
            raise ValueError(f"{path}: {key} must be a positive integer, found {d[key]!r}")
    for key in _HF_OPTIONAL_NUMBERS:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"{path}: {key} must be a number, found {v!r}")
        if key in ("rope_theta", "rms_norm_eps") and v is not None and not v > 0:
            raise ValueError(f"{path}: {key} must be > 0, found {v!r}")
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{path}: {key} must be an object or null, found {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        factor = rope.get("factor")
        if kind == "linear" and (isinstance(factor, bool) or not isinstance(factor, int | float)):
            raise ValueError(
                f"{path}: {key} of type 'linear' needs a numeric 'factor', found {factor!r}"
            )
        if kind == "linear" and not factor > 0:
            raise ValueError(f"{path}: {key} 'factor' must be > 0, found {factor!r}")
        theta = rope.get("rope_theta")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, int | float)
                                  or not theta > 0):  # fmt: skip
            raise ValueError(f"{path}: {key}.rope_theta must be a number > 0, found {theta!r}")
    return d


def config_from_hf(hf_config: dict, vocab_size: int, name: str) -> ModelConfig:
    """Our ModelConfig for a HF `config.json`, with the vocabulary of our tokenizer layout."""
    cfg = ModelConfig.from_hf_config(hf_config, name=name)
    return cfg.replace(vocab_size=vocab_size)


def hf_config_from_ours(cfg: ModelConfig, rows: int, dtype: torch.dtype, ids: dict) -> dict:
    """A `LlamaConfig` dict. Written in the flat form (rope_theta / rope_scaling) that both older
    and newer `transformers`, TGI and vLLM read. rope_scaling has exactly `type` and a float
    `factor`: transformers 4.31-4.42 (Llama-2's era) refuse any other key (`rope_type` included)
    and an int factor; newer versions take `type` as `rope_type`. (transformers < 4.33 has no
    rope_theta and runs 10000 whatever is written: Llama-2's value.)"""
    rope_scaling = None
    if cfg.rope_scaling_factor != 1.0:
        rope_scaling = {"type": "linear", "factor": float(cfg.rope_scaling_factor)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": rows,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------------------------
# Vocabulary rows


def vocab_rows(w: torch.Tensor, base: int, vocab: int, copied: list[int]) -> torch.Tensor:
    """HF (rows, hidden) -> ours (vocab, hidden): the base SentencePiece rows [0, base) as they
    are, the HF rows of `copied` (added tokens the HF model already has, at our ids), and every
    other new token initialised as the mean of the base rows (computed in fp32)."""
    out = torch.empty(vocab, w.shape[1], dtype=w.dtype)
    out[:base] = w[:base]
    if vocab > base:
        out[base:] = w[:base].float().mean(dim=0).to(w.dtype)
    if copied:
        out[copied] = w[copied]
    return out


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, hidden) -> (rows, hidden): padding rows replicate row 0 (unk), as the released model."""
    n = w.shape[0]
    if rows < n:
        raise ValueError(f"cannot pad {n} rows down to {rows}")
    return torch.cat([w, w[:1].expand(rows - n, -1)], dim=0)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Import: HF -> ours


def _hf_prefix(i: int) -> str:
    return f"model.layers.{i}."


def import_tensors(
    hf: HFWeights,
    cfg: ModelConfig,
    padded_vocab: int,
    base_vocab: int,
    copied: list[int],
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, full tensor) in `Llama.named_parameters()` order, reading only the HF
    tensors each one needs. Vocabulary matrices: see `vocab_rows`, then padding rows copying
    row 0 up to `padded_vocab`."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)

    def vocab_matrix(hf_name: str) -> torch.Tensor:
        w = cast(hf.get(hf_name))
        return pad_rows(vocab_rows(w, base_vocab, cfg.vocab_size, copied), padded_vocab)

    yield "embed.weight", vocab_matrix("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p = _hf_prefix(i)
        yield f"layers.{i}.attention_norm.weight", cast(hf.get(p + "input_layernorm.weight"))
        qkv = [hf.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        yield f"layers.{i}.attention.wqkv.weight", cast(torch.cat(qkv, dim=0))
        yield f"layers.{i}.attention.wo.weight", cast(hf.get(p + "self_attn.o_proj.weight"))
        yield f"layers.{i}.mlp_norm.weight", cast(hf.get(p + "post_attention_layernorm.weight"))
        gate_up = [hf.get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
        yield f"layers.{i}.mlp.w13.weight", cast(torch.cat(gate_up, dim=0))
        yield f"layers.{i}.mlp.w2.weight", cast(hf.get(p + "mlp.down_proj.weight"))
    yield "norm.weight", cast(hf.get("model.norm.weight"))
    yield "output.weight", vocab_matrix("lm_head.weight")


def hf_added_tokens(hf_dir: Path, tok: Tokenizer, hf_rows: int) -> list[int]:
    """Ids in [base vocab, HF rows) whose rows the import keeps: those the HF tokenizer files
    declare with the same token as ours (e.g. the released SFT model's ChatML rows). A declared
    token that differs from ours is an error; undeclared rows are padding and are dropped."""
    copied = []
    declared = _declared_added_tokens(hf_dir)
    for i in sorted(declared):
        if i < tok.base_vocab_size or i >= hf_rows:
            continue
        token, path = declared[i]
        ours = tok.piece(i) if i < tok.vocab_size else None
        if token != ours:
            raise ValueError(
                f"{path}: id {i} is {token!r} but our layout (base vocabulary, "
                f"Megatron specials, extra ids {tok.extra_ids}) gives {ours!r} there: pass the "
                "--vocab_extra_ids_list the model was trained with"
            )
        copied.append(i)
    return copied


def _declared_added_tokens(hf_dir: Path) -> dict[int, tuple[str, Path]]:
    """id -> (token, file declaring it). transformers >= 4.34 writes the added tokens into
    tokenizer_config.json's `added_tokens_decoder`; older ones (2023's, the released SFT
    model's era) only into added_tokens.json (slow tokenizer) and tokenizer.json's
    "added_tokens" (fast tokenizer), which transformers still reads. All three are consulted,
    in that order; the first file to declare an id gives its token."""
    fix = "fix the file or remove it (the added tokens' rows are then initialised anew)"
    declared: dict[int, tuple[str, Path]] = {}

    def declare(path: Path, pairs: Iterable[tuple[int | str, str]]) -> None:
        for i, token in pairs:
            declared.setdefault(int(i), (token, path))

    path = hf_dir / "tokenizer_config.json"
    if path.is_file():
        decoder = _read_json(path).get("added_tokens_decoder") or {}
        ok = isinstance(decoder, dict) and all(
            i.isdigit() and isinstance(d, dict) and isinstance(d.get("content"), str)
            for i, d in decoder.items()
        )
        if not ok:
            raise ValueError(
                f"{path}: 'added_tokens_decoder' must map ids to {{\"content\": token, ...}} "
                f"(as transformers writes it); {fix}"
            )
        declare(path, ((i, d["content"]) for i, d in decoder.items()))
    path = hf_dir / "added_tokens.json"
    if path.is_file():
        encoder = _read_json(path)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in encoder.values()):
            raise ValueError(f"{path}: expected an object of token -> integer id; {fix}")
        declare(path, ((i, t) for t, i in encoder.items()))
    path = hf_dir / "tokenizer.json"
    if path.is_file():
        added = _read_json(path).get("added_tokens") or []
        ok = isinstance(added, list) and all(
            isinstance(d, dict)
            and isinstance(d.get("id"), int)
            and not isinstance(d["id"], bool)
            and isinstance(d.get("content"), str)
            for d in added
        )
        if not ok:
            raise ValueError(
                f'{path}: \'added_tokens\' must be a list of {{"id": int, "content": token, '
                f"...}} (as the tokenizers library writes it); {fix}"
            )
        declare(path, ((d["id"], d["content"]) for d in added))
    return declared


def check_hf_shapes(hf: HFWeights, cfg: ModelConfig, base_vocab: int) -> int:
    """Validate every HF tensor's shape against the config before converting anything; return
    the HF vocabulary row count."""
    rows = hf.shape("model.embed_tokens.weight")[0]
    if rows < base_vocab:
        raise ValueError(
            f"{hf.dir}: the embedding has {rows} rows but tokenizer.model has {base_vocab} pieces"
        )
    if "lm_head.weight" not in hf:
        raise ValueError(f"{hf.dir}: no lm_head.weight (tied embeddings are not supported)")
    want = hf_shapes(cfg, rows)
    for name, shape in want.items():
        if hf.shape(name) != shape:
            raise ValueError(
                f"{hf.dir}: {name} has shape {hf.shape(name)}, config.json implies {shape}"
            )
    # transformers before 4.32 saved each layer's rotary `inv_freq` buffer with the weights
    # (meta-llama/Llama-2-*-hf hold them); it follows from rope_theta, and transformers itself
    # recomputes it and ignores the stored copy, so it is skipped rather than refused.
    unused = sorted(
        n for n in set(hf.weight_map) - set(want) if not n.endswith(ROTARY_BUFFER_SUFFIX)
    )
    if unused:
        raise ValueError(f"{hf.dir}: tensors the Llama mapping does not use: {unused[:5]}")
    return rows


# ----------------------------------------------------------------------------------------------
# Export: ours -> HF


def export_tensors(
    get: Callable[[str], torch.Tensor], cfg: ModelConfig, rows: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from our tensors (`get(name)` returns one, vocab rows trimmed to
    cfg.vocab_size), splitting the fused projections; vocabulary rows padded to `rows` with
    copies of row 0. Every tensor is its own contiguous copy (safetensors refuses shared ones)."""
    hd = cfg.head_dim
    q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_kv_heads * hd

    def vocab(name: str) -> torch.Tensor:
        return pad_rows(get(name)[: cfg.vocab_size], rows).contiguous()

    yield "model.embed_tokens.weight", vocab("embed.weight")
    for i in range(cfg.num_layers):
        p, ours = _hf_prefix(i), f"layers.{i}."
        yield p + "input_layernorm.weight", get(ours + "attention_norm.weight")
        q, k, v = get(ours + "attention.wqkv.weight").split([q_rows, kv_rows, kv_rows], dim=0)
        yield p + "self_attn.q_proj.weight", q.clone()
        yield p + "self_attn.k_proj.weight", k.clone()
        yield p + "self_attn.v_proj.weight", v.clone()
        yield p + "self_attn.o_proj.weight", get(ours + "attention.wo.weight")
        yield p + "post_attention_layernorm.weight", get(ours + "mlp_norm.weight")
        gate, up = get(ours + "mlp.w13.weight").split(cfg.ffn_hidden_size, dim=0)
        yield p + "mlp.gate_proj.weight", gate.clone()
        yield p + "mlp.up_proj.weight", up.clone()
        yield p + "mlp.down_proj.weight", get(ours + "mlp.w2.weight")
    yield "model.norm.weight", get("norm.weight")
    yield "lm_head.weight", vocab("output.weight")


def hf_shapes(cfg: ModelConfig, rows: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes in export order, without touching any tensor."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (rows, h)}
    for i in range(cfg.num_layers):
        p = _hf_prefix(i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_kv_heads * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_kv_heads * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * hd)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (rows, h)
    return shapes


def check_checkpoint(iter_dir: Path, meta: dict, index: ckpt.ShardIndex, cfg: ModelConfig) -> None:
    """Before anything is written: every shard directory of the saved layout is there, and the
    stored tensors are exactly those, at the global shapes, that meta.json's model config gives
    (a mismatch would otherwise surface as a torch error in the middle of the export, or, with
    fewer layers in the config than on disk, as a model silently missing layers)."""
    where = f"{iter_dir / ckpt.META_FILE}'s model config"
    layout = meta.get("layout") or {}
    tp, pp = layout.get("tp"), layout.get("pp")
    if isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1:
        want = [ckpt.shard_dir_name(t, p) for t in range(tp) for p in range(pp)]
        gone = [d for d in want if not (iter_dir / d / ckpt.MODEL_FILE).is_file()]
        if gone:
            verb = "is" if len(gone) == 1 else "are"
            raise ValueError(
                f"{iter_dir}: saved at TP {tp} / PP {pp} (meta.json 'layout'), but {gone[:8]} "
                f"{verb} missing: the copy is incomplete; copy the missing mp_rank_* directories "
                "or export another iteration"
            )
    shapes = cfg.param_shapes(cfg.vocab_size)
    stored = set(index.names("model"))
    missing = [n for n in shapes if n not in stored]
    if missing:
        raise ValueError(
            f"{iter_dir}: the checkpoint lacks {missing[:5]} that {where} needs (a pipeline "
            "stage's shard directories missing, or a meta.json from another model)"
        )
    unknown = sorted(n for n in stored if n not in shapes)
    if unknown:
        raise ValueError(
            f"{iter_dir}: holds tensors that its meta.json's model config (num_layers "
            f"{cfg.num_layers}) has no place for: {unknown[:5]}: meta.json does not describe "
            "these weights; restore the meta.json the run saved"
        )
    for name, shape in shapes.items():
        got = tuple(index.global_shape(name))
        if name in ckpt.VOCAB_PARAMS:  # any padding of the real rows
            ok = len(got) == 2 and got[0] >= shape[0] and got[1] == shape[1]
            expected = f"({shape[0]} or more, {shape[1]})"
        else:
            ok, expected = got == shape, str(shape)
        if not ok:
            file = index.entries[("model", name)][0].file
            raise ValueError(
                f"{file}: {name} has shape {got} but {where} (hidden_size {cfg.hidden_size}, "
                f"ffn_hidden_size {cfg.ffn_hidden_size}, num_attention_heads "
                f"{cfg.num_attention_heads}, num_kv_heads {cfg.num_kv_heads}) implies {expected}: "
                "meta.json does not describe these weights; restore the meta.json the run saved"
            )


def generation_config(tok: Tokenizer) -> dict:
    """generation_config.json: `generate`, TGI and vLLM stop at any of its eos ids. A ChatML
    reply ends with <|im_end|>; </s> ends a document: model.generate stops at both, and so do
    they. (The first id is the one config.json and the tokenizer name as eos.)"""
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.im_end_id, tok.eos_id],
        "pad_token_id": tok.pad_id,
    }


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index((m.group(2) or " ").upper())
    size = int(float(m.group(1)) * base**power)
    if size < 1:  # 0 would put every tensor in a shard of its own
        raise argparse.ArgumentTypeError(f"size {text!r}: must be at least 1 byte, e.g. 5GB")
    return size


# ----------------------------------------------------------------------------------------------
# Commands


def _dtype_arg(name: str, found: torch.dtype) -> torch.dtype:
    return found if name == "auto" else DTYPES[name]


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    vocab_extra_ids_list: str | list[str] | None = DEFAULT_EXTRA_IDS,
    tokenizer_path: str | None = None,
    dtype: str = "auto",
) -> Path:
    """Convert a HF Llama directory into a checkpoint (TP=1, PP=1 on disk; `--load` reshards it
    to whatever layout the run uses). Returns the iteration directory."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if tp < 1 or pp < 1:
        flag, value = ("--tp", tp) if tp < 1 else ("--pp", pp)
        raise ValueError(f"{flag} {value}: must be at least 1")
    _check_import_target(out_dir)
    hf_config = read_hf_config(hf_dir)
    tok = Tokenizer(tokenizer_path or str(hf_dir / "tokenizer.model"), vocab_extra_ids_list)
    try:
        cfg = config_from_hf(hf_config, tok.vocab_size, name=f"hf:{hf_dir.resolve()}")
    except ValueError as e:  # an unsupported feature: name the file it comes from
        raise ValueError(f"{hf_dir / 'config.json'}: {e}") from None
    split = (cfg.num_attention_heads, cfg.num_kv_heads, cfg.ffn_hidden_size)
    if any(n % tp for n in split):
        g = math.gcd(*split)
        fits = [d for d in range(1, g + 1) if g % d == 0]
        raise ValueError(
            f"--tp {tp}: must divide num_attention_heads {split[0]}, num_key_value_heads "
            f"{split[1]} and intermediate_size {split[2]} of {hf_dir / 'config.json'}; "
            f"possible: {', '.join(map(str, fits))}"
        )
    cfg.validate(tp)
    if pp < 1 or cfg.num_layers % pp:
        raise ValueError(f"--pp {pp}: must divide num_layers ({cfg.num_layers})")
    hf = HFWeights(hf_dir)
    hf_rows = check_hf_shapes(hf, cfg, tok.base_vocab_size)
    copied = hf_added_tokens(hf_dir, tok, hf_rows)
    out_dtype = _dtype_arg(dtype, hf.dtype("model.embed_tokens.weight"))
    padded = cfg.padded_vocab_size(1)
    meta = {
        "format": ckpt.FORMAT,
        "version": ckpt.FORMAT_VERSION,
        "iteration": 0,
        "model": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": padded,
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "has_optimizer": False,
        "has_trainer_state": False,
        "tokenizer": tok.describe(),
        "hf_import": {
            "source": str(hf_dir.resolve()),
            "hf_vocab_rows": hf_rows,
            "copied_added_token_ids": copied,
            "new_token_rows": "mean of the base vocabulary rows",
            "padding_rows": "copies of row 0",
            "dtype": str(out_dtype).removeprefix("torch."),
            "requested_layout": {"tp": tp, "pp": pp},
        },
    }
    shapes = cfg.param_shapes(padded)
    final = out_dir / ckpt.iteration_dir_name(0)
    if final.exists():
        raise FileExistsError(f"{final} already exists: import into an empty directory")
    tmp = out_dir / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / ckpt.shard_dir_name(0, 0)).mkdir(parents=True)
    layouts = {
        n: {"name": n, "global_shape": list(s), "tp_dim": None, "pieces": None}
        for n, s in shapes.items()
    }
    stream = SafetensorsStream(
        tmp / ckpt.shard_dir_name(0, 0) / ckpt.MODEL_FILE,
        shapes,
        out_dtype,
        {"format": ckpt.FORMAT, "tensors": json.dumps(layouts, sort_keys=True)},
    )
    try:
        with torch.no_grad():
            for name, t in import_tensors(hf, cfg, padded, tok.base_vocab_size, copied, out_dtype):
                stream.write(name, t)
        stream.close()
        (tmp / ckpt.META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed import leaves no partial iteration
        raise
    (out_dir / ckpt.LATEST_FILE).write_text("0\n")
    return final


def _check_import_target(out_dir: Path) -> None:
    """Import writes iter_0000000 and the `latest` file: refuse a folder that is a file or that
    already holds a checkpoint (a training run's `latest` would be pointed at the import)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory: import into an empty directory")
    held = [out_dir / ckpt.LATEST_FILE, out_dir / ckpt.iteration_dir_name(0)]
    held = [p.name for p in held if p.exists()]
    held += sorted(p.name for p in out_dir.glob("iter_*") if p.name not in held)
    if held:
        raise FileExistsError(
            f"{out_dir / held[0]} already exists ({out_dir} holds a checkpoint): import into an "
            "empty directory"
        )


def export_hf(
    ckpt_path: str | Path,
    hf_out: str | Path,
    pad_multiple: int = 128,
    max_shard_bytes: int = 5 * 10**9,
    tokenizer_path: str | None = None,
    dtype: str = "auto",
) -> Path:
    """Write a `transformers` Llama directory from a checkpoint (a save dir or an iteration
    dir, any TP/PP layout), reading one tensor at a time."""
    hf_out = Path(hf_out)
    if hf_out.exists() and not hf_out.is_dir():
        raise FileExistsError(f"{hf_out} exists and is not a directory: export into an empty one")
    if hf_out.is_dir():
        held = sorted(p.name for p in hf_out.iterdir())
        if held:
            raise FileExistsError(
                f"{hf_out} already holds {held[:3]}: export into an empty directory"
            )
    iter_dir = ckpt.resolve_iteration_dir(ckpt_path)
    meta = ckpt.read_meta(iter_dir)
    cfg = ModelConfig.from_dict(meta["model"])
    tok = checkpoint_tokenizer(meta, tokenizer_path)
    if pad_multiple < 1:
        raise ValueError(f"--pad-multiple {pad_multiple}: must be >= 1")
    index = ckpt.ShardIndex(iter_dir, optimizer=False)
    check_checkpoint(iter_dir, meta, index, cfg)
    rows = round_up(cfg.vocab_size, pad_multiple)
    found = index.read("norm.weight").dtype
    out_dtype = _dtype_arg(dtype, found)
    # Everything is written into a hidden sibling folder that becomes hf_out only when complete,
    # so a failed export leaves no half-written model where transformers would look for one.
    target = hf_out.resolve()  # "." has no name to derive the temporary one from
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier failed export's leftovers
    tmp.mkdir()

    def get(name: str) -> torch.Tensor:
        t = index.read(name)
        return t[: cfg.vocab_size] if name in ckpt.VOCAB_PARAMS else t

    try:
        with torch.no_grad():
            write_hf_shards(
                tmp,
                export_tensors(get, cfg, rows),
                hf_shapes(cfg, rows),
                out_dtype,
                max_shard_bytes,
            )
        ids = {"bos": tok.bos_id, "eos": tok.im_end_id, "pad": tok.pad_id}
        hf_config = hf_config_from_ours(cfg, rows, out_dtype, ids)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = generation_config(tok)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer_files(tmp, tok, cfg.max_position_embeddings)
        if target.is_dir():  # empty (checked above): keep the folder, move the files in
            for p in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(p, target / p.name)  # config.json last: loadable once complete
            tmp.rmdir()
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import", help="HF Llama directory -> our checkpoint (for --load --finetune)"
    )
    imp.add_argument("hf_dir", help="config.json, model*.safetensors (+ index), tokenizer.model")
    imp.add_argument("out_dir", help="save directory to create (gets iter_0000000/)")
    imp.add_argument("--tp", type=int, default=1, help="tensor parallel size the run will use")
    imp.add_argument("--pp", type=int, default=1, help="pipeline parallel size the run will use")
    imp.add_argument(
        "--vocab_extra_ids_list",
        default=",".join(DEFAULT_EXTRA_IDS),
        help="extra tokens after the Megatron specials (default: %(default)s)",
    )
    imp.add_argument("--tokenizer", help="tokenizer.model (default: HF_DIR/tokenizer.model)")
    imp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: as stored")
    exp = sub.add_parser("export", help="our checkpoint -> HF Llama directory")
    exp.add_argument("ckpt_dir", help="save directory (follows latest) or iter_XXXXXXX directory")
    exp.add_argument("hf_out", help="output directory")
    exp.add_argument(
        "--pad-multiple",
        "--pad_multiple",
        type=int,
        default=128,
        dest="pad_multiple",
        help="vocabulary rows padded (copies of row 0) to a multiple of this (default 128)",
    )
    exp.add_argument(
        "--max-shard-size",
        "--max_shard_size",
        type=parse_size,
        default="5GB",
        dest="max_shard_size",
        help="largest safetensors shard (default 5GB)",
    )
    exp.add_argument("--tokenizer", help="tokenizer.model (default: the one the checkpoint names)")
    exp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: as stored")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            d = import_hf(
                args.hf_dir,
                args.out_dir,
                args.tp,
                args.pp,
                args.vocab_extra_ids_list,
                args.tokenizer,
                args.dtype,
            )
            print(f"wrote {d}")
            print(
                f"train from it with: --load {args.out_dir} --finetune "
                f"--tensor_model_parallel_size {args.tp} --pipeline_model_parallel_size {args.pp}"
            )
        else:
            d = export_hf(
                args.ckpt_dir,
                args.hf_out,
                args.pad_multiple,
                args.max_shard_size,
                args.tokenizer,
                args.dtype,
            )
            print(f"wrote {d}")
    except (OSError, ValueError, KeyError) as e:
        # str(KeyError) is the repr of its message: print the message itself.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"model.hf {args.command}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
