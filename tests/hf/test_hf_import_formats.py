"""HF import of directories written by older `transformers` versions: the layouts the hub's
Llama-2 checkpoints (and the released SFT model) were saved in."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.hf import export_hf, import_hf
from train import checkpoint as ckpt

transformers = pytest.importorskip("transformers")


def test_import_skips_saved_rotary_inv_freq_buffers(tmp_path, hf_dir, imported):
    """transformers < 4.32 saved every layer's `rotary_emb.inv_freq` buffer with the weights
    (meta-llama/Llama-2-*-hf have them); transformers loads such a directory, so must we."""
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    buffers = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(layers)
    }
    save_file(buffers, str(d / "model-buffers.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(buffers, "model-buffers.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    transformers.AutoModelForCausalLM.from_pretrained(d)  # the reference loader accepts it
    import_hf(d, tmp_path / "out")
    got, _ = ckpt.read_full_state_dict(tmp_path / "out")
    want, _ = ckpt.read_full_state_dict(imported)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _legacy_added_tokens(d, tokenizer, keep_tokenizer_json: bool) -> None:
    """Rewrite an export's tokenizer files as transformers < 4.34 wrote them: no
    `added_tokens_decoder` in tokenizer_config.json; the added tokens in added_tokens.json
    (slow tokenizer) and/or in tokenizer.json's "added_tokens" (fast tokenizer)."""
    path = d / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    del cfg["added_tokens_decoder"]
    path.write_text(json.dumps(cfg))
    if keep_tokenizer_json:
        assert (d / "tokenizer.json").is_file()
    else:
        (d / "tokenizer.json").unlink(missing_ok=True)
        added = {
            tokenizer.piece(i): i for i in range(tokenizer.base_vocab_size, tokenizer.vocab_size)
        }
        (d / "added_tokens.json").write_text(json.dumps(added))


@pytest.mark.parametrize(
    "keep_tokenizer_json", [False, True], ids=["added_tokens.json", "tokenizer.json"]
)
def test_import_keeps_added_token_rows_declared_the_pre_4_34_way(tmp_path, random_ckpt, tokenizer,
                                                                 keep_tokenizer_json):  # fmt: skip
    """The trained rows of the ChatML / Megatron-special tokens survive an import of a model
    whose tokenizer declares them in added_tokens.json or tokenizer.json only (the released SFT
    model predates `added_tokens_decoder`); they used to be replaced by the mean row."""
    export_hf(random_ckpt, tmp_path / "hf")
    _legacy_added_tokens(tmp_path / "hf", tokenizer, keep_tokenizer_json)
    import_hf(tmp_path / "hf", tmp_path / "out")
    got, meta = ckpt.read_full_state_dict(tmp_path / "out")
    want, _ = ckpt.read_full_state_dict(random_ckpt)
    base, vocab = tokenizer.base_vocab_size, tokenizer.vocab_size
    assert meta["hf_import"]["copied_added_token_ids"] == list(range(base, vocab))
    for name in ("embed.weight", "output.weight"):
        assert torch.equal(got[name][:vocab], want[name][:vocab]), name


def test_import_refuses_a_conflicting_legacy_added_token(tmp_path, random_ckpt, tokenizer):
    export_hf(random_ckpt, tmp_path / "hf")
    _legacy_added_tokens(tmp_path / "hf", tokenizer, keep_tokenizer_json=False)
    path = tmp_path / "hf" / "added_tokens.json"
    added = json.loads(path.read_text())
    added["<|im_start|>"], added["<|im_end|>"] = added["<|im_end|>"], added["<|im_start|>"]
    path.write_text(json.dumps(added))
    with pytest.raises(ValueError, match=r"added_tokens\.json: id \d+ is .*vocab_extra_ids_list"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_from_hf_config_defaults_are_transformers_defaults():
    """A key config.json leaves out means what LlamaConfig's default says (transformers builds
    the model from those), e.g. rms_norm_eps 1e-6, not Llama-2's 1e-5."""
    d = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4}  # fmt: skip
    ours = ModelConfig.from_hf_config(d)
    theirs = transformers.LlamaConfig(**d)
    assert ours.norm_eps == theirs.rms_norm_eps
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.init_std == theirs.initializer_range


def test_null_config_keys_mean_their_defaults():
    """`"rope_theta": null` (and the other optional numbers) is a default, not a TypeError."""
    d = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "rope_theta": None, "rms_norm_eps": None,
         "max_position_embeddings": None, "initializer_range": None}  # fmt: skip
    ours = ModelConfig.from_hf_config(d)
    assert (ours.rope_theta, ours.norm_eps, ours.max_position_embeddings) == (10000.0, 1e-6, 4096)
    assert ours.init_std == 0.02


@pytest.mark.parametrize(
    "edit, what",
    [
        ({"rope_theta": 0}, "rope_theta must be > 0"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be > 0"),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, "'factor' must be > 0"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -5}}, "rope_theta must be"),
    ],
)
def test_read_hf_config_refuses_non_positive_rope_and_eps(tmp_path, edit, what):
    from model.hf import read_hf_config

    d = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, **edit}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=what) as e:
        read_hf_config(tmp_path)
    assert "config.json" in str(e.value)
