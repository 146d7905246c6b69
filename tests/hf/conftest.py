"""Fixtures: a tokenizer (the committed sample one, or a small synthetic SentencePiece model) and
a tiny random GQA `LlamaForCausalLM` saved by transformers as sharded safetensors."""

import random
import shutil
from pathlib import Path

import pytest
import torch

from data.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer, train_sentencepiece

WORDS = (
    "the quick brown fox jumps over a lazy dog while assistant and user talk about python code "
    "models training data tokens answers questions poems cats gardens rivers numbers 0 1 2 3 42"
).split()


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """Path of a SentencePiece model with Llama's unk 0 / bos 1 / eos 2 and no pad."""
    if Path(DEFAULT_TOKENIZER_PATH).is_file():
        return DEFAULT_TOKENIZER_PATH
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + rng.choice(".?!\n")
        for _ in range(2000)
    ]
    path = tmp_path_factory.mktemp("sp") / "sp.model"
    train_sentencepiece(lines, path, 400)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(sp_model) -> Tokenizer:
    return Tokenizer(sp_model)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # Norm weights away from 1 and matrices at ~1/sqrt(fan_in), so a swapped or misplaced
    # tensor changes the logits and greedy decoding does not sit on near-ties.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, sp_model, tokenizer) -> Path:
    """Tiny Llama (GQA 4 heads / 2 KV heads, linear rope scaling, rope_theta 5000), fp32, saved
    with save_pretrained as several safetensors shards plus index, with tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.base_vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        # `type`, not `rope_type`: transformers 4.40 (the dev floor) accepts only `type` and
        # `factor`; newer versions read `type` as `rope_type`.
        rope_scaling={"type": "linear", "factor": 2.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    _randomize(model, 0)
    out = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    shutil.copyfile(sp_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def imported(tmp_path_factory, hf_dir) -> Path:
    """hf_dir imported as our checkpoint (save dir)."""
    from model.hf import import_hf

    out = tmp_path_factory.mktemp("imported")
    import_hf(hf_dir, out)
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory, imported) -> Path:
    """The imported checkpoint exported back to a HF directory (small shards)."""
    from model.hf import export_hf

    out = tmp_path_factory.mktemp("exported")
    export_hf(imported, out, pad_multiple=128, max_shard_bytes=100_000)
    return out


@pytest.fixture(scope="session")
def our_model(imported):
    from model.sampling import load_model

    model, meta, _ = load_model(imported, torch.device("cpu"), torch.float32)
    return model


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A checkpoint written by train.checkpoint from random weights (no transformers needed)."""
    from model.config import ModelConfig
    from train import checkpoint as ckpt

    cfg = ModelConfig(
        name="hf-test", vocab_size=tokenizer.vocab_size, hidden_size=64, ffn_hidden_size=96,
        num_layers=2, num_attention_heads=4, num_kv_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, shape in cfg.param_shapes(cfg.vocab_size).items():
        t = torch.randn(shape, generator=g)
        sd[name] = 1.0 + 0.3 * t if len(shape) == 1 else t / shape[1] ** 0.5
    out = tmp_path_factory.mktemp("random_ckpt")
    meta = {"model": cfg.to_dict(), "tokenizer": tokenizer.describe()}
    ckpt.write_full_checkpoint(out, 1, sd, meta)
    return out
