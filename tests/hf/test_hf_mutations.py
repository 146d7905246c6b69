"""model.hf details the round trips through transformers do not pin down: the rows of new and
padding tokens, added tokens at the edge of the HF rows, config.json's values (rope scaling
below 1 included), bad sizes, a checkpoint with fewer vocabulary rows than its config, and the
order an export fills an existing folder."""

import json
import os

import pytest
import torch

from model.config import ModelConfig
from model.hf import (
    check_hf_shapes,
    export_hf,
    hf_added_tokens,
    hf_config_from_ours,
    pad_rows,
    vocab_rows,
)
from train import checkpoint as ckpt


def test_new_token_rows_are_the_mean_of_the_base_rows_alone():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0], [100.0, 100.0], [-7.0, 0.0]])
    out = vocab_rows(w, base=3, vocab=6, copied=[4])
    assert torch.equal(out[:3], w[:3])
    assert torch.equal(out[4], w[4])  # declared by the HF tokenizer files: kept
    mean = torch.tensor([(1 + 3 + 5) / 3, (2 + 4 + 9) / 3])  # not HF's undeclared rows 3 and 4
    assert torch.equal(out[3], mean) and torch.equal(out[5], mean)


def test_pad_rows_copies_row_0_and_never_drops_rows():
    w = torch.arange(6.0).view(3, 2)
    assert torch.equal(pad_rows(w, 5), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1], [0, 1.0]]))
    assert torch.equal(pad_rows(w, 3), w)
    with pytest.raises(ValueError, match="cannot pad 3 rows down to 2"):
        pad_rows(w, 2)


def test_added_tokens_past_the_hf_rows_are_not_copied(tmp_path, tokenizer):
    base = tokenizer.base_vocab_size
    assert tokenizer.vocab_size > base + 6
    ids = (base + 5, base + 6)  # the first extra id <|im_start|>, then <|im_end|>
    (tmp_path / "added_tokens.json").write_text(json.dumps({tokenizer.piece(i): i for i in ids}))
    assert hf_added_tokens(tmp_path, tokenizer, hf_rows=base + 6) == [base + 5]
    assert hf_added_tokens(tmp_path, tokenizer, hf_rows=base + 7) == [base + 5, base + 6]


def test_rope_scaling_is_written_whenever_the_factor_is_not_1():
    ids = {"bos": 1, "eos": 2, "pad": 0}
    for factor, want in ((1.0, None), (0.5, {"type": "linear", "factor": 0.5}),
                         (4, {"type": "linear", "factor": 4.0})):  # fmt: skip
        d = hf_config_from_ours(ModelConfig(rope_scaling_factor=factor), 128, torch.float32, ids)
        assert d["rope_scaling"] == want
        assert want is None or type(d["rope_scaling"]["factor"]) is float  # 4.31-4.42 want a float


def test_an_embedding_smaller_than_the_tokenizer_is_refused():
    class Weights:  # the one lookup check_hf_shapes makes before refusing
        dir = "hf"

        def shape(self, name):
            return {"model.embed_tokens.weight": (399, 64)}[name]

    with pytest.raises(ValueError, match="the embedding has 399 rows but tokenizer.model has 400"):
        check_hf_shapes(Weights(), ModelConfig(), base_vocab=400)


def test_export_refuses_fewer_vocabulary_rows_than_the_config(tmp_path, random_ckpt):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(random_ckpt, d)
    iter_dir = ckpt.resolve_iteration_dir(d)
    meta = json.loads((iter_dir / ckpt.META_FILE).read_text())
    rows = ckpt.ShardIndex(iter_dir, optimizer=False).global_shape("embed.weight")[0]
    meta["model"]["vocab_size"] = rows + 1  # a meta.json claiming one token more than stored
    (iter_dir / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"\({rows + 1} or more, 64\)"):
        export_hf(d, tmp_path / "hf")


def test_export_into_an_empty_folder_moves_config_json_last(tmp_path, random_ckpt, monkeypatch):
    """transformers takes a folder with config.json for a model: it must come when all is there."""
    moved = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(a)),
                                                     replace(a, b)))  # fmt: skip
    (tmp_path / "hf").mkdir()
    export_hf(random_ckpt, tmp_path / "hf")
    assert len(moved) > 3 and moved[-1] == "config.json" and moved.count("config.json") == 1


def test_config_json_carries_every_architecture_value():
    cfg = ModelConfig(hidden_size=96, ffn_hidden_size=200, num_layers=3, num_attention_heads=6,
                      num_kv_heads=2, max_position_embeddings=777, norm_eps=3e-6,
                      rope_theta=12345.0, init_std=0.011)  # fmt: skip
    d = hf_config_from_ours(cfg, 256, torch.bfloat16, {"bos": 1, "eos": 7, "pad": 5})
    assert (d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]) == (96, 200, 3)
    assert (d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]) == (6, 2, 16)
    assert (d["max_position_embeddings"], d["rms_norm_eps"], d["rope_theta"]) == (777, 3e-6, 12345)
    assert (d["initializer_range"], d["vocab_size"], d["torch_dtype"]) == (0.011, 256, "bfloat16")
    assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (1, 7, 5)


def test_non_positive_sizes_are_refused(tmp_path):
    from model.hf import read_hf_config

    config = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 0}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_key_value_heads must be a positive integer"):
        read_hf_config(tmp_path)


def test_export_refuses_a_pad_multiple_below_1(tmp_path, random_ckpt):
    with pytest.raises(ValueError, match="--pad-multiple 0: must be >= 1"):
        export_hf(random_ckpt, tmp_path / "hf", pad_multiple=0)


def test_import_records_the_hf_row_count(imported, tokenizer):
    meta = ckpt.read_meta(ckpt.resolve_iteration_dir(imported))
    assert meta["hf_import"]["hf_vocab_rows"] == tokenizer.base_vocab_size  # the HF model's rows
    assert meta["padded_vocab_size"] != tokenizer.base_vocab_size
