"""model/hf_tokenizer.py behaviour that a hand mutation pass found unpinned: which tokenizer a
checkpoint is exported / generated with, and details of the exported tokenizer files. Each test
names the mistake it catches."""

import json
import shutil
import struct
from pathlib import Path

import pytest

from data.tokenizer import DEFAULT_EXTRA_IDS, DEFAULT_TOKENIZER_PATH, Tokenizer
from model.hf_tokenizer import checkpoint_tokenizer

# -- checkpoint_tokenizer ---------------------------------------------------------------------


def _other_model(tmp_path: Path) -> str:
    """Another SentencePiece model: the sample one plus one appended piece (repeated protobuf
    fields may be appended), so another fingerprint and vocabulary size."""
    piece = "\u2581zzother".encode()
    payload = b"\x0a" + bytes([len(piece)]) + piece + b"\x15" + struct.pack("<f", -1e4)
    path = tmp_path / "other.model"
    path.write_bytes(
        Path(DEFAULT_TOKENIZER_PATH).read_bytes() + b"\x0a" + bytes([len(payload)]) + payload
    )
    return str(path)


@pytest.fixture(scope="module")
def default_tok() -> Tokenizer:
    return Tokenizer(DEFAULT_TOKENIZER_PATH)


def _meta(tok: Tokenizer, **info) -> dict:
    return {"vocab_size": tok.vocab_size, "tokenizer": {"fingerprint": tok.fingerprint, **info}}


def test_an_explicit_tokenizer_path_is_the_one_used(tmp_path, default_tok):
    """`--tokenizer PATH` is used as given (a copy elsewhere with the same bytes matches the
    fingerprint), rather than the model file the checkpoint's meta names."""
    copy = tmp_path / "copy.model"
    shutil.copyfile(DEFAULT_TOKENIZER_PATH, copy)
    tok = checkpoint_tokenizer(_meta(default_tok, model_path=DEFAULT_TOKENIZER_PATH), str(copy))
    assert tok.model_path == str(copy)


def test_an_explicit_tokenizer_path_that_does_not_match_is_refused(tmp_path, default_tok):
    """A `--tokenizer` that is not the checkpoint's is an error naming it, never silently replaced
    by the meta's model file or the committed default (which would export another tokenizer than
    the user asked for, or hide their mistake)."""
    other = _other_model(tmp_path)
    with pytest.raises(ValueError, match=r"no tokenizer matches the checkpoint.*other\.model"):
        checkpoint_tokenizer(_meta(default_tok, model_path=DEFAULT_TOKENIZER_PATH), other)


def test_fingerprint_and_vocabulary_size_must_both_match(tmp_path, default_tok):
    """A recorded fingerprint must match (same vocabulary size is not enough: another model of
    that size would give other token ids); without one, the vocabulary size still must."""
    other = _other_model(tmp_path)
    other_tok = Tokenizer(other)
    meta = {
        "vocab_size": default_tok.vocab_size,
        "tokenizer": {"fingerprint": other_tok.fingerprint},
    }
    with pytest.raises(ValueError, match="no tokenizer matches"):
        checkpoint_tokenizer(meta, DEFAULT_TOKENIZER_PATH)
    with pytest.raises(ValueError, match=rf"vocab {default_tok.vocab_size + 1}"):
        checkpoint_tokenizer({"vocab_size": default_tok.vocab_size + 1, "tokenizer": {}})
    assert checkpoint_tokenizer({"vocab_size": other_tok.vocab_size}, other).model_path == other


def test_the_trainers_extra_ids_key_is_read(default_tok):
    """The trainer's checkpoints record the extra ids as `vocab_extra_ids_list` (its flag's
    name); they decide the vocabulary, so a checkpoint with a third extra id finds its tokenizer."""
    extra = [*DEFAULT_EXTRA_IDS, "<|tool|>"]
    want = Tokenizer(DEFAULT_TOKENIZER_PATH, extra)
    meta = {
        "vocab_size": want.vocab_size,
        "tokenizer": {"fingerprint": want.fingerprint, "vocab_file": DEFAULT_TOKENIZER_PATH,
                      "vocab_extra_ids_list": extra},
    }  # fmt: skip
    tok = checkpoint_tokenizer(meta)
    assert tok.extra_ids == extra and tok.vocab_size == default_tok.vocab_size + 1


def test_a_model_file_that_moved_falls_back_to_the_next_candidate(tmp_path, default_tok):
    """A checkpoint copied from another machine names a model file that is not here: the next
    candidate (the default) is tried instead of failing on the missing file."""
    meta = _meta(default_tok, model_path=str(tmp_path / "gone" / "tokenizer.model"))
    assert checkpoint_tokenizer(meta).model_path == DEFAULT_TOKENIZER_PATH


# -- the exported files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_tok):
    from model.hf_tokenizer import write_tokenizer_files

    out = tmp_path_factory.mktemp("tok_files")
    write_tokenizer_files(out, default_tok, 777)
    return out


def test_tokenizer_config_settings(exported, default_tok):
    """The config settings a loader reads beside tokenizer.json: no BOS/EOS added (our samples
    have none; a slow LlamaTokenizer would add them otherwise), `legacy` SentencePiece
    behaviour, no clean-up of spaces (which would change decoded text), the given maximum length,
    and the extra ids (ChatML) as additional special tokens."""
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"], config["legacy"]) == (
        False,
        False,
        True,
    )
    assert config["clean_up_tokenization_spaces"] is False
    assert config["model_max_length"] == 777
    assert config["additional_special_tokens"] == list(default_tok.extra_ids)
    specials = json.loads((exported / "special_tokens_map.json").read_text())
    assert specials["additional_special_tokens"] == list(default_tok.extra_ids)


def test_decoding_keeps_spaces_and_skips_specials(exported, default_tok):
    """Loaded by transformers, decoding gives our text back (no " ." -> "." clean-up), and
    `skip_special_tokens=True` drops the special tokens (they are declared special)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    text = "a , b . c ' d n't"
    assert hf.decode(default_tok.encode(text)) == text
    ids = default_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert "<|im_end|>" not in hf.decode(ids, skip_special_tokens=True)
    assert "hi" in hf.decode(ids, skip_special_tokens=True)


def test_chat_template_drops_only_a_leading_empty_system_message_and_names_unknown_roles():
    """data/chat.py drops an empty system message only in first place; a later one is rendered
    (as `turn_strings` renders it). An unknown role fails with the message that says which roles
    are read, not a Jinja lookup error."""
    jinja2 = pytest.importorskip("jinja2")
    from model.hf_tokenizer import CHATML_TEMPLATE

    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHATML_TEMPLATE)
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": ""},
    ]
    text = template.render(messages=messages, add_generation_prompt=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>system\n<|im_end|>\n"
    with pytest.raises(ValueError, match="unknown role tool: expected system, user"):
        template.render(messages=[{"role": "tool", "content": "x"}], add_generation_prompt=False)


def test_added_tokens_are_declared_special_in_the_config(exported):
    """Every added token is `special` in tokenizer_config.json too: a slow LlamaTokenizer (no
    tokenizer.json) reads only the config, and skips them on decode only when so declared."""
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert all(
        d["special"] and not d["normalized"] for d in config["added_tokens_decoder"].values()
    )


def _field(number: int, wire: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def test_model_type_is_read_past_long_and_fixed_width_fields():
    """The protobuf reader follows multi-byte varint lengths (a TrainerSpec whose `input` paths
    are longer than 127 bytes) and 8-byte fields, so it finds the model type after them."""
    from model.hf_tokenizer import _spm_model_type

    spec = _field(1, 2, b"/data/" + b"x" * 200 + b".txt") + _field(3, 0, b"\x02")
    proto = _field(9, 1, b"\x07" * 8) + _field(2, 2, spec) + _field(3, 2, b"\x0a\x00")
    assert _spm_model_type(proto) == 2
    assert _spm_model_type(_field(2, 2, _field(1, 2, b"y" * 300))) == 1  # no model_type: unigram
